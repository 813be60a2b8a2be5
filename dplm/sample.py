"""Constrained sampling: the model's distribution, restricted at each token to valid rows.

At every decoding step each row is in a grammar state (which column, and how far into its
value). The state allows a set of tokens: the column's next possible value tokens, the
separator once the value may end, EOS after the last column. Logits outside that set are
masked to -inf and the token is sampled from the renormalized distribution, so the model's
probabilities decide every value and no repair step is needed. Masks are cached per state.
Every field's grammar is finite, so a row ends within `max_row_tokens` steps: no hang.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import pandas as pd
import torch
from tqdm.auto import tqdm

from dplm.schema import format_number
from dplm.serialize import ParseError, RowCodec


@dataclass
class SampleStats:
    rows_generated: int
    rows_returned: int
    seconds: float

    @property
    def generated_per_returned(self) -> float:
        return self.rows_generated / max(1, self.rows_returned)

    @property
    def valid_rate(self) -> float:
        return self.rows_returned / max(1, self.rows_generated)


class RowGrammar:
    """The whole-row automaton over `codec`'s fields, with one vocabulary mask per state."""

    def __init__(self, codec: RowCodec, vocab_size: int, device):
        self.codec = codec
        self.fields = codec.fields
        self.vocab_size = vocab_size
        self.device = device
        self._masks: dict = {}  # one vocabulary mask per distinct allowed set
        self._keys: dict = {}  # state -> mask key
        self._done_mask = self._mask([codec.eos_id])

    def _mask(self, ids) -> torch.Tensor:
        mask = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
        mask[list(ids)] = True
        return mask

    def start(self):
        return (0, self.fields[0].start())

    def mask(self, state) -> torch.Tensor:
        if state is None:
            return self._done_mask
        column, inner = state
        key = self._keys.get(state)
        if key is None:
            if len(self._keys) > 200_000:  # bound memory: number prefixes are many
                self._keys.clear()
            key = self._keys[state] = (column, self.fields[column].mask_key(inner))
        if key not in self._masks:
            ids, can_end = self.fields[column].next_tokens(inner)
            if can_end:
                ids = list(ids) + [self.codec.sep_id if column < len(self.fields) - 1 else self.codec.eos_id]
            self._masks[key] = self._mask(ids)
        return self._masks[key]

    def advance(self, state, token: int):
        """Next state; None once the row has ended."""
        column, inner = state
        if token == self.codec.eos_id:
            return None
        if token == self.codec.sep_id:  # never part of a value (see serialize), so it ends the field
            return (column + 1, self.fields[column + 1].start())
        return (column, self.fields[column].advance(inner, token))

    def max_row_tokens(self) -> int:
        """An upper bound on the tokens of one row (values + separators + EOS)."""
        total = len(self.fields)
        for f in self.fields:
            col = f.col
            if col.kind == "categorical":
                total += max(len(ids) for ids in f.category_ids.values())
            elif col.kind == "text":
                total += col.max_tokens
            elif col.kind == "datetime":
                total += 10
            else:
                total += max(len(format_number(v, col.precision)) for v in (float(col.min), float(col.max))) + 1
        return total


@torch.no_grad()
def generate_sequences(model, grammar: RowGrammar, num: int, temperature: float, generator: torch.Generator,
                       device) -> list[list[int]]:
    """`num` token sequences (BOS ... EOS) sampled under the grammar, one batch, KV-cached."""
    codec = grammar.codec
    tokens = torch.full((num, 1), codec.bos_id, dtype=torch.long, device=device)
    states = [grammar.start()] * num
    out = [[codec.bos_id] for _ in range(num)]
    cache = None
    cache_name = _cache_argument(model)
    for _ in range(grammar.max_row_tokens()):
        result = model(input_ids=tokens, use_cache=True, logits_to_keep=1, **{cache_name: cache})
        cache = getattr(result, cache_name)
        logits = result.logits[:, -1].float() / temperature
        masks = torch.stack([grammar.mask(s) for s in states])
        logits = logits[:, : grammar.vocab_size].masked_fill(~masks, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        next_tokens = torch.multinomial(probs.cpu(), 1, generator=generator).flatten()
        for i, t in enumerate(next_tokens.tolist()):
            if states[i] is not None:
                out[i].append(t)
                states[i] = grammar.advance(states[i], t)
        if all(s is None for s in states):
            break
        tokens = next_tokens.to(device)[:, None]
    return out


def _cache_argument(model) -> str:
    """transformers 5 renamed the KV-cache argument and output from `past_key_values` to `cache`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def sample_rows(model, codec: RowCodec, num_rows: int, batch_size: int = 64, temperature: float = 1.0,
                seed: int = 0, device=None, progress: bool = True) -> tuple[pd.DataFrame, SampleStats]:
    """`num_rows` valid rows as a typed DataFrame, plus how many rows were generated for them."""
    device = device or next(model.parameters()).device
    vocab_size = model.get_output_embeddings().weight.shape[0]
    grammar = RowGrammar(codec, vocab_size, device)
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    rows, generated = [], 0
    max_generated = 10 * num_rows + 10 * batch_size  # bound: sampling never loops forever
    start = time.perf_counter()
    bar = tqdm(total=num_rows, disable=not progress, unit="row", desc="sampling", dynamic_ncols=True)
    while len(rows) < num_rows:
        if generated >= max_generated:
            raise RuntimeError(
                f"only {len(rows)} of {num_rows} rows were valid after generating {generated}; "
                "the model or schema produces mostly invalid rows"
            )
        want = min(batch_size, num_rows - len(rows))
        for ids in generate_sequences(model, grammar, want, temperature, generator, device):
            generated += 1
            try:
                row = codec.decode(ids)
            except ParseError:
                continue
            rows.append(row)
            bar.update(1)
    bar.close()
    stats = SampleStats(rows_generated=generated, rows_returned=len(rows), seconds=time.perf_counter() - start)
    return to_frame(rows, codec.schema), stats


def to_frame(rows: list[dict], schema) -> pd.DataFrame:
    """Typed DataFrame in schema order (nullable integers as Int64)."""
    df = pd.DataFrame(rows, columns=schema.names)
    for col in schema.columns:
        if col.kind == "integer":
            df[col.name] = df[col.name].astype("Int64")
        elif col.kind == "float":
            df[col.name] = df[col.name].astype(float)
        elif col.kind == "datetime":
            df[col.name] = pd.to_datetime(df[col.name])
    return df
