"""Constrained sampling: the model's distribution, restricted at each token to valid rows.

At every decoding step each row is in a grammar state (which column, and how far into its
value). The state allows a set of tokens: the column's next possible value tokens, the
separator once the value may end, EOS after the last column. Logits outside that set are
masked to -inf and the token is sampled from the renormalized distribution, so the model's
probabilities decide every value and no repair step is needed. The automaton is compiled
into tables on the device when it is small enough (`CompiledGrammar`), else walked in
Python (`LazyGrammar`); the automaton is the codec's (rows: `serialize.RowCodec`, a
subject's history: `histories.HistoryCodec`). Every field's grammar is finite, so a row ends within
`max_row_tokens` steps: no hang.
"""

from __future__ import annotations

import copy
import inspect
import time
from dataclasses import dataclass

import pandas as pd
import torch

from dplm.model import output_head
from dplm.progress import progress as progress_display
from dplm.schema import check_given
from dplm.serialize import ParseError, RowCodec
from dplm.train import GrammarMasks

NUCLEUS_CANDIDATES = 256  # tokens `nucleus` ranks first


@dataclass
class SampleStats:
    rows_generated: int
    rows_returned: int  # valid rows
    seconds: float
    rows_kept: int | None = None  # of the valid rows, those kept by the calibration (Synthesizer.sample)

    @property
    def generated_per_returned(self) -> float:
        return self.rows_generated / max(1, self.rows_returned)

    @property
    def valid_rate(self) -> float:
        return self.rows_returned / max(1, self.rows_generated)


class LazyGrammar:
    """A codec's automaton (`RowCodec` or `histories.HistoryCodec`: `start_state`, `allowed`,
    `next_state`, `mask_key`, `column_of`, `max_tokens`), walked lazily in Python.

    `token_ids[j]` is the token that the model's logit j scores (the whole vocabulary, or a
    `RestrictedHead`'s tokens). Masks are built on first use, one per distinct allowed set,
    and kept in one table on the device, so a step gathers its batch's masks with one index."""

    def __init__(self, codec, token_ids: list[int], device):
        self.codec = codec
        self.token_ids = torch.tensor(token_ids, dtype=torch.long, device=device)
        self.position = {t: j for j, t in enumerate(token_ids)}
        self.device = device
        self._rows: list[torch.Tensor] = []  # distinct masks, in order of first use
        self._row_of_key: dict = {}  # mask key -> index in _rows
        self._keys: dict = {}  # state -> mask key
        self._table: torch.Tensor | None = None  # _rows stacked, rebuilt when a mask is added

    def mask_index(self, state) -> int:
        """Row of the mask table that holds the tokens allowed in `state`."""
        key = self._keys.get(state)
        if key is None:
            if len(self._keys) > 200_000:  # bound memory: number prefixes are many
                self._keys.clear()
            key = self._keys[state] = self.codec.mask_key(state)
        if key not in self._row_of_key:
            mask = torch.zeros(len(self.position), dtype=torch.bool)
            mask[[self.position[t] for t in self.codec.allowed(state)]] = True
            self._row_of_key[key] = len(self._rows)
            self._rows.append(mask)
            self._table = None
        return self._row_of_key[key]

    # The batch interface that generate_sequences uses (CompiledGrammar has the same).

    def initial(self, num: int) -> list:
        return [self.codec.start_state()] * num

    def masks(self, states: list) -> torch.Tensor:
        rows = torch.tensor([self.mask_index(s) for s in states], device=self.device)
        if self._table is None:
            self._table = torch.stack(self._rows).to(self.device)
        return self._table[rows]

    def advance(self, states: list, positions: torch.Tensor) -> list:
        tokens = self.token_ids[positions].tolist()
        return [self.codec.next_state(s, t) for s, t in zip(states, tokens)]

    def ended(self, states: list) -> torch.Tensor:
        return torch.tensor([s is None for s in states], device=self.device)

    def columns(self, states: list) -> torch.Tensor:
        """Each sequence's column (the number of columns once it has ended)."""
        return torch.tensor([self.codec.column_of(s) for s in states], device=self.device)

    def select(self, states: list, rows: torch.Tensor) -> list:
        return [states[i] for i in rows.tolist()]

    def max_row_tokens(self) -> int:
        return self.codec.max_tokens()


class CompiledGrammar:
    """The same automaton compiled into tables on the device: `allowed[s]` (a mask over the
    logits) and `next[s, j]` (the state after logit j), so a decoding step applies the
    schema to the whole batch with two gathers and no Python per row.

    States are found by a breadth-first walk from the start, merging states whose codec
    `state_key`s are equal (trie nodes, token counts, digit-DP summaries of integers, date
    and small-number prefixes). `build` returns None when the tables would pass
    `max_entries` transitions (a float column with a huge range, long text fields over a
    large vocabulary); the LazyGrammar serves those schemas.
    """

    def __init__(self, lazy: LazyGrammar, allowed: torch.Tensor, next_state: torch.Tensor, column: torch.Tensor,
                 start: int, done: int):
        self.codec, self.token_ids, self.device = lazy.codec, lazy.token_ids, lazy.device
        self.allowed, self.next, self.column, self.start, self.done = allowed, next_state, column, start, done
        self.max_row_tokens = lazy.max_row_tokens
        self.position = lazy.position  # token id -> logit index

    @classmethod
    def build(cls, codec, token_ids: list[int], device, max_entries: int = 1_000_000) -> CompiledGrammar | None:
        lazy = LazyGrammar(codec, token_ids, device)
        keys = {codec.state_key(None): 0}
        examples = [None]  # one state per key, to expand
        transitions = [{codec.eos_id: 0}]  # per state: allowed token -> next state
        entries = 0

        def index(state) -> int:
            key = codec.state_key(state)
            if key not in keys:
                keys[key] = len(examples)
                examples.append(state)
            return keys[key]

        start = index(lazy.initial(1)[0])
        i = 1
        while i < len(examples):
            ids = codec.allowed(examples[i])
            entries += len(ids)
            if entries > max_entries or len(examples) * len(token_ids) > 50 * max_entries:
                return None
            transitions.append({t: index(codec.next_state(examples[i], t)) for t in ids})
            i += 1
        allowed = torch.zeros((len(examples), len(token_ids)), dtype=torch.bool)
        next_state = torch.zeros((len(examples), len(token_ids)), dtype=torch.long)
        for s, row in enumerate(transitions):
            positions = [lazy.position[t] for t in row]
            allowed[s, positions] = True
            next_state[s, positions] = torch.tensor(list(row.values()))
        return cls(lazy, allowed.to(device), next_state.to(device), lazy.columns(examples).to(device), start, 0)

    def initial(self, num: int) -> torch.Tensor:
        return torch.full((num,), self.start, dtype=torch.long, device=self.device)

    def masks(self, states: torch.Tensor) -> torch.Tensor:
        return self.allowed[states]

    def advance(self, states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.next[states, positions]

    def ended(self, states: torch.Tensor) -> torch.Tensor:
        return states == self.done

    def columns(self, states: torch.Tensor) -> torch.Tensor:
        return self.column[states]

    def select(self, states: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return states[rows]


def grammar_masks(codec, token_ids: list[int], sequences: list[list[int]], device,
                  orders: list[list[int]] | None = None) -> GrammarMasks | None:
    """The grammar states of every position of `sequences` (BOS ... EOS), for a loss over the
    allowed tokens (`train.GrammarMasks`); None when the automaton does not compile. With
    `orders`, rows written each in its own column order (`any_order_masks`)."""
    if orders is not None:
        return any_order_masks(codec, token_ids, sequences, orders, device)
    compiled = CompiledGrammar.build(codec, token_ids, device)
    if compiled is None:
        return None
    table = compiled.next.tolist()
    states = []
    for ids in sequences:
        state, row = compiled.start, [compiled.start]
        for token in ids[1:-1]:
            state = table[state][compiled.position[token]]
            row.append(state)
        states.append(row + [compiled.done])  # EOS: the row's last state, never a prediction's
    return GrammarMasks(compiled.allowed, states, compiled.done)


def any_order_masks(codec: RowCodec, token_ids: list[int], sequences: list[list[int]], orders: list[list[int]],
                    device) -> GrammarMasks:
    """`grammar_masks` for rows written each in its own column order (`RowCodec.encode_table`'s
    `orders`; `codec.any_order()`): at every position the tokens the row's current column
    allows, and EOS once its last column is complete. One mask per (column, field mask key):
    a field's tokens do not depend on the columns written before it."""
    position = {t: i for i, t in enumerate(token_ids)}
    keys, allowed = {}, []

    def mask(key, ids) -> int:
        if key not in keys:
            keys[key] = len(allowed)
            row = torch.zeros(len(token_ids), dtype=torch.bool)
            row[[position[t] for t in ids]] = True
            allowed.append(row)
        return keys[key]

    done = mask("done", [codec.eos_id])
    states = []
    for ids, order in zip(sequences, orders):
        row, tokens = [], iter(ids[1:-1])
        for column in order:
            field = codec.fields[column]
            inner = field.start()
            while not field.complete(inner):
                row.append(mask((column, field.mask_key(inner)), field.next_tokens(inner)[0]))
                inner = field.advance(inner, next(tokens))
        states.append(row + [done, done])  # before EOS only EOS is allowed, as after it (padding)
    return GrammarMasks(torch.stack(allowed).to(device), states, done)


def row_grammar(codec, token_ids: list[int], device) -> CompiledGrammar | LazyGrammar:
    """The compiled grammar when the codec's automaton is small enough, else the lazy one."""
    return CompiledGrammar.build(codec, token_ids, device) or LazyGrammar(codec, token_ids, device)


class GivenValues:
    """Values to keep in the rows being generated (conditional generation), as the tokens that
    write them, and how to draw the other columns from the model's own conditional.

    Where a given column comes after a free one in the schema order, forcing its value alone
    would leave the columns before it drawn without knowing it (a female 'Husband'). So each
    given row is drawn as `candidates` particles: every particle writes the given values where
    its row reaches them, weighted by the model's probability of those tokens, and once every
    particle has passed the last given column one particle per row is kept, drawn by weight
    (importance resampling: the kept prefix follows the model's p(free columns | given values)
    as candidates grow; exact with one candidate when no free column precedes a given one).
    The kept particle's remaining columns are then written as usual."""

    def __init__(self, codec: RowCodec, grammar, given: pd.DataFrame, candidates: int):
        fields, n = codec.fields, len(codec.fields)  # the columns that may be given (a history's: before its rows)
        names = [f.col.name for f in fields]
        index = [names.index(c) for c in given.columns]
        written = {}
        for j in index:  # each value's tokens, then the token that ends its field
            written[j] = [fields[j].encode(v) + codec.ending(j) for v in given[fields[j].col.name]]
        width = max(len(ids) for column in written.values() for ids in column)
        self.positions = torch.zeros((len(given), n + 1, width), dtype=torch.long)  # logit index of each token
        for j, column in written.items():
            for g, ids in enumerate(column):
                self.positions[g, j, : len(ids)] = torch.tensor([grammar.position[t] for t in ids])
        self.positions = self.positions.to(grammar.device)
        self.given = torch.zeros(n + 1, dtype=torch.bool, device=grammar.device)  # per column (+ ended)
        self.given[index] = True
        self.last = max(index)
        self.resample = any(j < self.last for j in range(n) if j not in index)
        self.candidates = candidates if self.resample else 1

    def select(self, rows: torch.Tensor) -> GivenValues:
        """The same, for these given rows (a batch)."""
        part = copy.copy(self)
        part.positions = self.positions[rows]
        return part

    def force(self, logits: torch.Tensor, particles: torch.Tensor, column: torch.Tensor, offset: torch.Tensor):
        """Where a particle is inside a given column, only its given token may be drawn: the
        logits with that forced, and each particle's log-probability of the forced token (0
        elsewhere), the importance weight's factor."""
        forced = self.given[column]
        target = self.positions[particles // self.candidates, column, offset.clamp(max=self.positions.shape[2] - 1)]
        log_prob = torch.zeros(len(logits), device=logits.device)
        if self.resample and forced.any():  # weights only matter then, and only where a value is forced
            log_prob = torch.where(forced, torch.log_softmax(logits, -1).gather(1, target[:, None])[:, 0], 0.0)
        only_target = torch.full_like(logits, float("-inf")).scatter_(1, target[:, None], 0.0)
        return torch.where(forced[:, None], only_target, logits), log_prob

    def choose(self, log_weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One particle per given row, drawn in proportion to its weight."""
        weights = torch.softmax(log_weight.view(-1, self.candidates), dim=-1)
        picks = torch.multinomial(weights, 1, generator=generator).flatten()
        return picks + torch.arange(len(picks), device=picks.device) * self.candidates


@torch.no_grad()
def generate_sequences(model, grammar: CompiledGrammar | LazyGrammar, num: int, temperature: float,
                       generator: torch.Generator, device, given: GivenValues | None = None,
                       top_p: float = 1.0) -> list[list[int]]:
    """`num` token sequences (BOS ... EOS) sampled under the grammar, one batch, KV-cached.
    `generator` lives on `device`. Rows that have ended leave the batch (with their cache
    rows), so the model computes only rows still being written. With `given` (for `num` given
    rows) the given values are kept and the rest drawn conditionally (see `GivenValues`). With
    `top_p` < 1 each token is drawn from the smallest set of allowed tokens holding that share
    of the probability (nucleus sampling: fluency for text, at the cost of its rarer words)."""
    codec = grammar.codec
    max_tokens = grammar.max_row_tokens()
    particles = num * (given.candidates if given else 1)
    out = torch.full((particles, max_tokens + 1), codec.eos_id, dtype=torch.long, device=device)
    out[:, 0] = codec.bos_id
    rows = torch.arange(particles, device=device)  # the batch's rows, as indices into `out`
    tokens = out[:, :1]
    states = grammar.initial(particles)
    cache = preallocated_cache(min(max_tokens + 1, 128))  # long text rows grow it as they need
    cache_name = _cache_argument(model)
    forbidden = torch.zeros((), dtype=torch.long, device=device)  # draws outside the mask: must stay 0
    kept = None if given and given.resample else torch.arange(num, device=device)  # one particle per row
    if given:
        log_weight = torch.zeros(particles, device=device)
        column, offset = grammar.columns(states), torch.zeros(particles, dtype=torch.long, device=device)
    for step in range(max_tokens):
        result = model(input_ids=tokens, use_cache=True, logits_to_keep=1, **{cache_name: cache})
        allowed = grammar.masks(states)
        logits = (result.logits[:, -1].float() / temperature).masked_fill(~allowed, float("-inf"))
        if given:
            logits, log_prob = given.force(logits, rows, column, offset)
            log_weight[rows] += log_prob
        probs = torch.softmax(logits, dim=-1)
        if top_p < 1.0:
            probs = nucleus(probs, top_p)
        positions = torch.multinomial(probs, 1, generator=generator).flatten()
        forbidden += (~allowed.gather(1, positions[:, None])).sum()
        tokens = grammar.token_ids[positions][:, None]
        out[rows, step + 1] = tokens[:, 0]
        states = grammar.advance(states, positions)
        if given:  # tokens written so far in each row's current column
            column, previous = grammar.columns(states), column
            offset = torch.where(column == previous, offset + 1, 0)
        if step % 4 == 3:  # checking costs a device sync: not every step
            keep = None
            if kept is None and bool((column > given.last).all()):  # every particle is past the given values
                kept = given.choose(log_weight, generator)
                keep = torch.isin(rows, kept) & ~grammar.ended(states)
            else:
                live = ~grammar.ended(states)
                if not live.any():
                    break
                keep = live if live.sum() <= 0.9 * len(rows) else None  # dropping rows copies the cache: when it pays
            if keep is not None:
                keep = keep.nonzero().flatten()
                if len(keep) == 0:
                    break
                rows, tokens, states = rows[keep], tokens[keep], grammar.select(states, keep)
                if given:
                    column, offset = column[keep], offset[keep]
                cache.keep_rows(keep)
    if forbidden.item():  # a broken draw would otherwise surface only as invalid rows
        raise RuntimeError(f"the sampler drew {forbidden.item()} tokens the schema's grammar forbids on {device}")
    if kept is None:  # the last given column ends the row: choose among finished particles
        kept = given.choose(log_weight, generator)
    return [row[: row.index(codec.eos_id) + 1] for row in out[kept].tolist()]


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Each row's probabilities cut to its most likely tokens whose total reaches `top_p` (at least
    one), renormalised."""
    # The most likely NUCLEUS_CANDIDATES tokens usually hold top_p: ranking them alone is exact then
    # and far cheaper than sorting SmolLM2's 49,152 logits a token; otherwise sort them all.
    sorted_probs, order = probs.topk(min(NUCLEUS_CANDIDATES, probs.shape[-1]), dim=-1)
    if bool((sorted_probs.sum(-1) < top_p).any()):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs  # the mass of the tokens ranked above each
    sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
    cut = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return cut / cut.sum(-1, keepdim=True)


def preallocated_cache(tokens: int):
    """A KV cache whose layers write each step into buffers with room for `tokens` positions
    (doubled if a row runs longer) and attend over the filled prefix, a view. transformers'
    default cache concatenates every layer's keys and values each step, copying the whole
    cache: on 2 CPU cores that was 46 % of sampling time. Unlike its StaticCache, attention
    never spans unfilled positions, so no mask is needed. `keep_rows` drops ended rows."""
    from transformers.cache_utils import Cache, DynamicLayer  # heavy: imported when sampling starts

    class PreallocatedLayer(DynamicLayer):
        # DynamicLayer's own initialisation changed signature across transformers versions;
        # this layer sets up the little it needs itself.
        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.is_initialized, self.device, self.dtype = True, key_states.device, key_states.dtype
                self.length = 0
                self.key_buffer = self.value_buffer = key_states.new_empty(0, 0, 0, 0)
            start = self.length
            end = self.length = start + key_states.shape[-2]
            if end > self.key_buffer.shape[2]:
                capacity = max(end, tokens, 2 * self.key_buffer.shape[2])
                self.key_buffer = self._grown(self.key_buffer, key_states, start, capacity)
                self.value_buffer = self._grown(self.value_buffer, value_states, start, capacity)
            self.key_buffer[:, :, start:end] = key_states
            self.value_buffer[:, :, start:end] = value_states
            self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
            return self.keys, self.values

        @staticmethod
        def _grown(buffer, new, filled: int, capacity: int):
            grown = new.new_empty(new.shape[0], new.shape[1], capacity, new.shape[3])
            if filled:
                grown[:, :, :filled] = buffer[:, :, :filled]
            return grown

        def get_seq_length(self) -> int:
            return self.length if self.is_initialized else 0

        def keep_rows(self, rows):
            self.key_buffer, self.value_buffer = self.key_buffer[rows], self.value_buffer[rows]
            self.keys, self.values = self.key_buffer[:, :, :self.length], self.value_buffer[:, :, :self.length]

    class PreallocatedCache(Cache):
        def keep_rows(self, rows: torch.Tensor) -> None:
            """Keep only these batch rows (indices) of every layer."""
            for layer in self.layers:
                layer.keep_rows(rows)

    return PreallocatedCache(layer_class_to_replicate=PreallocatedLayer)  # a layer per attention layer, on first use


def _cache_argument(model) -> str:
    """transformers 5 renamed the KV-cache argument and output from `past_key_values` to `cache`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def sample_rows(model, codec: RowCodec, num_rows: int, batch_size: int = 64, temperature: float = 1.0,
                seed: int = 0, device=None, progress: bool = True, given: pd.DataFrame | None = None,
                candidates: int = 16, keep=None, top_p: float = 1.0) -> tuple[pd.DataFrame, SampleStats]:
    """`num_rows` valid rows as a typed DataFrame, plus how many rows were generated for them.

    With `given` (a DataFrame of some of the schema's columns) one row per given row: its
    given values kept, the other columns drawn from the model conditionally on them, with
    `candidates` particles per row where needed (`GivenValues`); `num_rows` is ignored.
    `keep(rows) -> bool mask` (the table's rules, `marginals.Rules.kept`): a row it refuses is
    drawn again, as one that does not parse is. `top_p`: nucleus sampling (`generate_sequences`)."""
    device = device or next(model.parameters()).device
    grammar = row_grammar(codec, output_token_ids(model), device)
    generator = torch.Generator(device=device).manual_seed(seed)
    model.eval()
    if given is not None:
        given = check_given(given, codec.schema)
        values = GivenValues(codec, grammar, given, candidates)
        num_rows, batch_size = len(given), max(1, batch_size // values.candidates)
    rows: list = [None] * num_rows
    pending = list(range(num_rows))  # rows not yet filled (a row that fails to parse is drawn again)
    generated = 0
    max_generated = 10 * num_rows + 10 * batch_size  # bound: sampling never loops forever
    start = time.perf_counter()
    bar = progress_display(num_rows, "sampling", "rows", progress)
    while pending:
        if generated >= max_generated:
            raise RuntimeError(
                f"only {num_rows - len(pending)} of {num_rows} rows were valid after generating {generated}; "
                "the model or schema produces mostly invalid rows"
            )
        batch, pending = pending[:batch_size], pending[batch_size:]
        part = values.select(torch.tensor(batch, device=device)) if given is not None else None
        decoded = []
        for i, ids in zip(batch, generate_sequences(model, grammar, len(batch), temperature, generator, device, part,
                                                    top_p)):
            generated += 1
            try:
                rows[i] = codec.decode(ids)
            except ParseError:
                pending.append(i)
                continue
            if given is not None:  # exactly as given (a text longer than its cap was written cut)
                rows[i].update(given.iloc[i].to_dict())
            decoded.append(i)
        if keep is not None and decoded:
            for i, ok in zip(decoded, keep(to_frame([rows[i] for i in decoded], codec.schema, order=False))):
                if not ok:
                    rows[i] = None
                    pending.append(i)
        bar.update(sum(rows[i] is not None for i in decoded))
    bar.close()
    stats = SampleStats(rows_generated=generated, rows_returned=num_rows, seconds=time.perf_counter() - start)
    return to_frame(rows, codec.schema), stats


def output_token_ids(model) -> list[int]:
    """The token scored by each of the model's logits."""
    head = output_head(model)
    return head.token_ids.tolist() if head is not None else list(range(model.get_output_embeddings().weight.shape[0]))


def to_frame(rows: list[dict], schema, order: bool = True) -> pd.DataFrame:
    """Typed DataFrame in the schema's output order (or its own, `order=False`; nullable
    integers as Int64)."""
    df = pd.DataFrame(rows, columns=schema.names)
    for col in schema.columns:
        if col.kind == "integer":
            df[col.name] = df[col.name].astype("Int64")
        elif col.kind == "float":
            df[col.name] = df[col.name].astype(float)
        elif col.kind == "datetime":
            df[col.name] = pd.to_datetime(df[col.name])
    return df[schema.output_order] if schema.output_order and order else df
