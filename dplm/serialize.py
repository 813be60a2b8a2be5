"""Rows <-> token ids, and the grammar that constrains sampling to valid rows.

A row is `BOS v1 SEP v2 SEP ... vn EOS`: values in schema order, no column names (the
position says which column a value belongs to), `|` as the separator. Each value is
tokenized on its own, so its tokens never merge with a neighbour and the sequence can be
split on the separator id:

* numbers and dates are written one character per token (digits, '-', '.'), so the
  grammar can restrict them digit by digit to the column's range and precision;
* categories and text are escaped (`\\` -> `\\\\`, `|` -> `\\s`, newline -> `\\n`) so
  the separator character never occurs inside a value, then tokenized normally; a text
  longer than its column's `max_tokens` is cut there (between escapes) and counted
  (`RowCodec.values_cut`); the grammar tracks an escape across tokens (`escape_walk`), so
  sampled text never holds a bad one;
* a missing value is an empty field, except in a nullable text column, where the empty
  field is the empty text and a missing one is written `\\0` (an escape no text produces).

With value tokens (`model.value_tokens`), a column whose values are few (the categories,
or a number or date column of at most `MAX_VALUE_TOKENS` values) gets one new token per
value, `<|column=value|>` (and `<|column|>` for a missing value), and a wider number or date
column is written by place value (`place_layout`): its scaled integer (`scaled_bounds`: an
integer itself, a float times 10**precision, a date as days after its column's min) less the
column's lowest, in the fewest places of a base of at most `MAX_VALUE_TOKENS`, each place a
token of its own per column (`<|price#0=12|><|price#1=40|>` for a price of 326 + 12 * 137 +
40). A token then says its column, its place and its digit, and where the number ends; such
fields end by themselves, so no separator follows them: a census row is 23 tokens, none of
them separators (57 without value tokens), a diamonds row 19. The new tokens come from the
schema alone; `model.init_value_embeddings` starts each from its text's embedding.

The same token sequences are used for training and as the grammar's language, so a
constrained sampler can produce exactly the sequences the model was trained on.
"""

from __future__ import annotations

import bisect
import datetime as dt
import math
import re

import numpy as np
import pandas as pd
from tokenizers import AddedToken

from dplm.rules import constraints
from dplm.schema import DATE_FORMAT, Column, Schema, format_number

SEPARATOR = "|"
MISSING_TEXT = "\\0"  # a missing value of a nullable text column (escape() never writes it)
NUMBER_CHARS = "0123456789.-"
MAX_VALUE_TOKENS = 256  # integer columns with at most this many values get a token per value


def scaled_bounds(col: Column) -> tuple[int, int] | None:
    """A number or date column's values as integers: integers themselves, floats times
    10**precision, dates as days after `min`; (lowest, highest). None for other kinds."""
    if col.kind == "datetime":
        return 0, (pd.Timestamp(col.max) - pd.Timestamp(col.min)).days
    if col.kind in ("integer", "float"):
        scale = 10**col.precision
        return int(round(float(col.min) * scale)), int(round(float(col.max) * scale))
    return None


def to_scaled(col: Column, value) -> int:
    """A number or date as its integer in `scaled_bounds`."""
    if col.kind == "datetime":
        return (pd.Timestamp(value).normalize() - pd.Timestamp(col.min)).days
    return int(round(float(value) * 10**col.precision))


def to_scaled_many(col: Column, values: pd.Series) -> np.ndarray:
    """`to_scaled` of many values at once."""
    if col.kind == "datetime":
        return ((pd.to_datetime(values).dt.normalize() - pd.Timestamp(col.min)).dt.days).to_numpy(dtype=np.int64)
    return np.round(pd.to_numeric(values).to_numpy(dtype=float) * 10**col.precision).astype(np.int64)


def from_scaled(col: Column, scaled: int):
    """The value of a scaled integer: int, float (at the column's precision) or Timestamp."""
    if col.kind == "datetime":
        return pd.Timestamp(col.min) + pd.Timedelta(days=scaled)
    if col.kind == "float":
        return round(scaled / 10**col.precision, col.precision)
    return int(scaled)


def _value_text(col: Column, value) -> str:
    """The text a value token of a number or date column stands for."""
    if col.kind == "datetime":
        return pd.Timestamp(value).strftime(DATE_FORMAT)
    return format_number(value, col.precision)


def place_layout(col: Column) -> tuple[int, int] | None:
    """(places, base) of a number or date column too wide for a token per value (value tokens):
    its scaled integer less the lowest (`scaled_bounds`) is written in base `base` as `places`
    tokens, each a token of its own per column and place (`<|price#0=12|>`), the fewest places
    whose base stays within `MAX_VALUE_TOKENS` (price 326-18,823: 2 places of base 137). None
    for the other columns."""
    bounds = scaled_bounds(col)
    if bounds is None or token_values(col) is not None:
        return None
    values = bounds[1] - bounds[0] + 1
    places = math.ceil(math.log(values) / math.log(MAX_VALUE_TOKENS))
    base = max(2, math.ceil(values ** (1 / places) - 1e-9))
    while base**places < values:
        base += 1
    return places, base


def token_values(col: Column) -> list[str] | None:
    """The values of a column that gets one token per value (its categories, or every value of
    a number or date column of at most `MAX_VALUE_TOKENS` values), as text; None for the others."""
    if col.kind == "categorical":
        return list(col.categories)
    bounds = scaled_bounds(col)
    if bounds is not None and bounds[1] - bounds[0] < MAX_VALUE_TOKENS:
        return [_value_text(col, from_scaled(col, v)) for v in range(bounds[0], bounds[1] + 1)]
    return None


class ParseError(ValueError):
    """Model output that is not a valid row."""


def escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace(SEPARATOR, "\\s").replace("\n", "\\n")


_UNESCAPE = {"\\": "\\", "s": SEPARATOR, "n": "\n"}


def unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            if i + 1 >= len(text) or text[i + 1] not in _UNESCAPE:
                raise ParseError(f"bad escape in {text!r}")
            out.append(_UNESCAPE[text[i + 1]])
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def escape_walk(text: str, open_: bool) -> bool | None:
    """After `text`, written where an escape is open (`open_`: the text so far ends in an
    unpaired backslash) or not: whether one is open, or None for a bad escape."""
    for ch in text:
        if open_:
            if ch not in _UNESCAPE:
                return None
            open_ = False
        else:
            open_ = ch == "\\"
    return open_


def _is_missing(value) -> bool:
    return value is None or value is pd.NaT or (isinstance(value, float) and value != value) or value is pd.NA


class RowCodec:
    """Encode rows to token ids and decode token ids to typed rows, for one schema.

    With `value_tokens` the schema's few-valued columns get a token per value, added to
    `tokenizer` (idempotent: a tokenizer saved with them maps them to the same ids)."""

    def __init__(self, schema: Schema, tokenizer, value_tokens: bool = False):
        self.schema = schema
        self.tokenizer = tokenizer
        self.value_tokens = value_tokens
        self.bos_id = tokenizer.convert_tokens_to_ids(tokenizer.bos_token)
        self.eos_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
        self.sep_id = self._single_token(SEPARATOR)
        self.char_ids = {c: self._single_token(c) for c in NUMBER_CHARS}
        self.id_chars = {i: c for c, i in self.char_ids.items()}
        if value_tokens:
            names = [name for col in schema.columns
                     for name in [*value_token_names(col).values(), *sum(place_token_names(col), [])]]
            tokenizer.add_tokens([AddedToken(n, special=True, normalized=False) for n in names], special_tokens=True)
        self.fields = [FieldGrammar(col, self) for col in schema.columns]
        if any(col.kind == "text" for col in schema.columns):
            # Text may use any ordinary token that cannot contain the separator: no special or
            # added token (SmolLM2's <issue_comment> and the like, the value tokens).
            special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
            texts = {i: tokenizer.convert_tokens_to_string([tok])
                     for i, tok in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
                     if i not in special}
            texts = {i: text for i, text in texts.items() if SEPARATOR not in text}
            self.text_token_ids = list(texts)
            # Escapes span tokens (a token may end in an open backslash): per token, whether it
            # continues a text with (1) or without (0) an open backslash, and whether it leaves one.
            self.text_escapes = {i: (escape_walk(t, False), escape_walk(t, True)) for i, t in texts.items()}
            self.text_ids_by = {(open_, last): [i for i, walks in self.text_escapes.items()
                                                if walks[open_] is not None and not (last and walks[open_])]
                                for open_ in (0, 1) for last in (False, True)}

    def value_token_texts(self) -> dict[int, list[int]]:
        """Each value token's id -> the ordinary tokens of its text (the column name for the
        missing-value token): where its embedding starts."""
        out = {}
        for field in self.fields:
            name = self.tokenize(escape(field.col.name))
            for value, token in field.value_ids.items():
                out[token] = name if value is None else self.tokenize(escape(value)) or name
            for place in field.place_ids:
                out.update({token: self.tokenize(str(digit)) for digit, token in enumerate(place)})
        return out

    def output_token_ids(self) -> list[int]:
        """Every token id a row can contain after BOS (what a model must be able to score)."""
        ids = {self.sep_id, self.eos_id}
        for field in self.fields:
            ids.update(field.value_ids.values())
            if field.single:
                continue
            if field.width:
                ids.update(t for place in field.place_ids for t in place)
            elif field.kind == "categorical":
                ids.update(t for tokens in field.category_ids.values() for t in tokens)
            elif field.kind == "text":
                ids.update(self.text_token_ids)
            else:
                ids.update(self.char_ids.values())
        return sorted(ids)

    def _single_token(self, text: str) -> int:
        ids = self.tokenize(text)
        if len(ids) != 1:
            raise ValueError(f"tokenizer must encode {text!r} as one token, got {ids}")
        return ids[0]

    def tokenize(self, text: str) -> list[int]:
        if not text:
            return []
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids

    # ---- encoding ---------------------------------------------------------------------

    def encode(self, row, order: list[int] | None = None) -> list[int]:
        """One row (a mapping or sequence in schema order) -> token ids; with `order` (column
        indexes) its values written in that order instead (`any_order`)."""
        return self.encode_with_spans(row, order)[0]

    def encode_with_spans(self, row, order: list[int] | None = None) -> tuple[list[int], list[tuple[int, int]]]:
        """The row's token ids and, per column, the [start, end) positions of its value's tokens."""
        values = [row[c.name] for c in self.schema.columns] if hasattr(row, "keys") else list(row)
        order = range(len(self.fields)) if order is None else order
        ids, spans = [self.bos_id], [None] * len(self.fields)
        for k, i in enumerate(order):
            start = len(ids)
            ids.extend(self.fields[i].encode(values[i]))
            spans[i] = (start, len(ids))
            ids.extend(self.ending(i, last=k == len(self.fields) - 1))
        return ids, spans

    def ending(self, column: int, last: bool | None = None) -> list[int]:
        """The token after a column's value: EOS after the row's `last` column (default: the
        schema's last), else the separator, except after a self-delimiting field (none)."""
        if last is None:
            last = column == len(self.fields) - 1
        if last:
            return [self.eos_id]
        return [] if self.fields[column].self_delimiting else [self.sep_id]

    def any_order(self) -> bool:
        """Whether rows may be written in any column order (`encode`'s `order`): every field
        ends by itself and its tokens are its column's own (value tokens, no text)."""
        return all(field.self_delimiting for field in self.fields)

    def encode_table(self, df: pd.DataFrame, orders: list[list[int]] | None = None) -> list[list[int]]:
        """Every row's token ids (row i in `orders[i]`, given); `values_cut` then counts the texts
        this table had cut."""
        for field in self.fields:
            field.values_cut = 0
        rows = df[self.schema.names].itertuples(index=False, name=None)
        return [self.encode(row, order) for row, order in zip(rows, orders or [None] * len(df))]

    def values_cut(self) -> dict[str, int]:
        """Text values cut at their column's `max_tokens` since the last `encode_table`, per column."""
        return {f.col.name: f.values_cut for f in self.fields if f.values_cut}

    # ---- the grammar: the automaton a sampler walks (`sample.LazyGrammar`) ---------------
    # A state is (column, field state), or None once the row has ended.

    def start_state(self):
        return (0, self.fields[0].start())

    def allowed(self, state) -> list[int]:
        """The token ids allowed in `state`: the field's next value tokens, plus the token that
        ends the field (separator, or EOS after the last column) once the value may end."""
        if state is None:
            return [self.eos_id]
        column, inner = state
        ids, can_end = self.fields[column].next_tokens(inner)
        if not can_end:
            return list(ids)
        # A self-delimiting field moves on by itself (see next_state): it ends only the row, with EOS.
        return list(ids) + [self.sep_id if column < len(self.fields) - 1 else self.eos_id]

    def next_state(self, state, token: int):
        """The state after `token`; None once the row has ended."""
        if state is None or token == self.eos_id:
            return None
        column, inner = state
        field = self.fields[column]
        if token == self.sep_id and not field.self_delimiting:  # never part of a value (see module docstring)
            return (column + 1, self.fields[column + 1].start())
        inner = field.advance(inner, token)
        if field.self_delimiting and field.complete(inner) and column < len(self.fields) - 1:  # no separator
            return (column + 1, self.fields[column + 1].start())
        return (column, inner)

    def state_key(self, state):
        """Equal keys: one state of the finite automaton (see `FieldGrammar.state_key`)."""
        return "done" if state is None else (state[0], self.fields[state[0]].state_key(state[1]))

    def mask_key(self, state):
        """A key that determines `allowed(state)` (masks are cached per key)."""
        return "done" if state is None else (state[0], self.fields[state[0]].mask_key(state[1]))

    def column_of(self, state) -> int:
        """The state's column (the number of columns once the row has ended)."""
        return len(self.fields) if state is None else state[0]

    def max_tokens(self) -> int:
        """An upper bound on the tokens of one row after BOS (values, separators, EOS)."""
        return len(self.fields) + sum(f.max_value_tokens() for f in self.fields)

    # ---- decoding ---------------------------------------------------------------------

    def text(self, ids: list[int]) -> str:
        """The row as a prompt string (what the model sees, special tokens included)."""
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def decode(self, ids: list[int]) -> dict:
        """Token ids (with or without BOS, ending in EOS) -> typed row; ParseError if invalid."""
        ids = list(ids)
        if ids and ids[0] == self.bos_id:
            ids = ids[1:]
        if self.eos_id not in ids:
            raise ParseError("row has no end token")
        ids = ids[: ids.index(self.eos_id)]
        row, i, last = {}, 0, len(self.fields) - 1
        for k, field in enumerate(self.fields):
            if field.self_delimiting:  # a known number of tokens, no separator
                end = following = i + (1 if field.single or ids[i: i + 1] == [field.value_ids.get(None)]
                                       else field.width)
            else:
                end = ids.index(self.sep_id, i) if self.sep_id in ids[i:] else len(ids)
                if (k < last) != (end < len(ids)):
                    raise ParseError(f"row has {'more' if k == last else 'fewer'} fields than the schema's "
                                     f"{len(self.fields)}")
                following = end + 1
            if end > len(ids):
                raise ParseError(f"row ends before column '{field.col.name}'")
            row[field.col.name] = field.parse(ids[i:end])
            i = following
        if i < len(ids):
            raise ParseError(f"row has more tokens than the schema's {len(self.fields)} fields")
        return row


UNWRITTEN = ("unwritten",)  # in a constrained row's memory: a column not written yet


class ConstrainedRowCodec(RowCodec):
    """A `RowCodec` whose grammar keeps the schema's declared rules (`rules.Constraints`): a
    state also holds the values of the columns the rules read (its memory), and each column's
    tokens are kept to the domain those values leave it (`FieldGrammar.next_tokens_within`), so
    every row written keeps every rule, in whatever column order the codec writes (a rule
    narrows the later of its columns). Encoding is the plain codec's, and so are the training
    masks of rows written each in its own order (`sample.any_order_masks`: per field, a superset
    of these; the training rows keep the rules)."""

    def __init__(self, schema: Schema, tokenizer, value_tokens: bool, constraints):
        super().__init__(schema, tokenizer, value_tokens)
        self.constraints = constraints
        self.reads = [name for name in constraints.reads if name in schema.names]
        self._slot = {name: i for i, name in enumerate(self.reads)}
        # A value is kept only until the last column that a rule ties to it is written: fewer
        # states, so the grammar still compiles (`sample.CompiledGrammar`).
        position = {name: i for i, name in enumerate(schema.names)}
        self._forget_after = {i: [self._slot[name] for name in self.reads if max(
            position[c] for rule in constraints.rules if name in rule.columns for c in rule.columns) == i]
            for i in range(len(schema.names))}
        self._ruled = {i for i, f in enumerate(self.fields) if f.col.name in self._slot}

    def _scale(self, name: str, value) -> int:
        col = self.schema[name]
        return to_scaled(col, pd.Timestamp(value) if col.kind == "datetime" else float(value))

    def domain(self, state):
        """The domain the state's column may take, given its memory (None: unrestricted)."""
        column, _, memory = state
        written = {name: value for name, value in zip(self.reads, memory) if value is not UNWRITTEN}
        return self.constraints.domain(self.fields[column].col.name, written, self._scale)

    def start_state(self):
        return (0, self.fields[0].start(), (UNWRITTEN,) * len(self.reads))

    def allowed(self, state) -> list[int]:
        if state is None:
            return [self.eos_id]
        column, inner, _ = state
        ids, can_end = self.fields[column].next_tokens_within(inner, self.domain(state))
        if not can_end:
            return list(ids)
        return list(ids) + [self.sep_id if column < len(self.fields) - 1 else self.eos_id]

    def next_state(self, state, token: int):
        if state is None or token == self.eos_id:
            return None
        column, inner, memory = state
        field = self.fields[column]
        if token == self.sep_id and not field.self_delimiting:
            return (column + 1, self.fields[column + 1].start(), self._remember(memory, column, inner, token))
        advanced = field.advance(inner, token)
        if field.self_delimiting and field.complete(advanced) and column < len(self.fields) - 1:
            return (column + 1, self.fields[column + 1].start(), self._remember(memory, column, inner, token))
        return (column, advanced, memory)

    def _remember(self, memory: tuple, column: int, inner, token: int) -> tuple:
        """`memory` with the value of the column just completed, if a rule reads it, and without
        the values no column still to come needs."""
        memory = list(memory)
        name = self.fields[column].col.name
        if name in self._slot:
            memory[self._slot[name]] = self.constraints.remembered(name, self.fields[column].value_of(inner, token))
        for slot in self._forget_after[column]:
            memory[slot] = UNWRITTEN
        return tuple(memory)

    def state_key(self, state):
        if state is None:
            return "done"
        column, inner, memory = state
        # A column a rule may narrow keeps its exact state: the field's own key merges states
        # by the column's bounds (place or digit summaries), not by the narrower ones of a rule.
        return (column, inner if column in self._ruled else self.fields[column].state_key(inner), memory)

    def mask_key(self, state):
        if state is None:
            return "done"
        column, inner, _ = state
        return (column, self.fields[column].domain_key(inner, self.domain(state)))

    def column_of(self, state) -> int:
        return len(self.fields) if state is None else state[0]


def row_codec(schema: Schema, tokenizer, value_tokens: bool) -> RowCodec:
    """The codec of the columns the model writes (`Schema.modelled`): a `ConstrainedRowCodec`
    where the schema declares rules between them, else a `RowCodec`."""
    modelled = schema.modelled()
    kept = constraints(modelled.rules)
    return ConstrainedRowCodec(modelled, tokenizer, value_tokens, kept) if kept else \
        RowCodec(modelled, tokenizer, value_tokens)


class FieldGrammar:
    """Which tokens may come next inside one column's value, and how to parse it.

    States are small hashable values (a trie node, a character prefix, a token count) so
    that a sampler can cache one vocabulary mask per state.
    """

    def __init__(self, col: Column, codec: RowCodec):
        self.col = col
        self.codec = codec
        self.kind = col.kind
        self._digit_bounds = None
        # Value tokens: one token per value (`single`), or `width` place tokens; both end by
        # themselves (`self_delimiting`). value_ids: value text (None: missing) -> token;
        # place_ids[place][digit] -> token.
        self.single = codec.value_tokens and token_values(col) is not None
        layout = place_layout(col) if codec.value_tokens else None
        self.width, self.base = layout or (None, None)
        self.self_delimiting = self.single or bool(self.width)
        names = value_token_names(col) if codec.value_tokens else {}
        self.value_ids = {v: codec.tokenizer.convert_tokens_to_ids(n) for v, n in names.items()}
        self._value_of = {t: v for v, t in self.value_ids.items()}
        self.place_ids = [codec.tokenizer.convert_tokens_to_ids(place) for place in place_token_names(col)
                          ] if layout else []
        self._place_of = {t: (i, d) for i, place in enumerate(self.place_ids) for d, t in enumerate(place)}
        self.values_cut = 0  # texts cut at max_tokens (see RowCodec.encode_table)
        if col.kind == "text":
            self.missing_ids = codec.tokenize(MISSING_TEXT) if col.nullable else None
            self.max_tokens = max(col.max_tokens, len(self.missing_ids or []))  # room for the missing marker
        if self.single:
            return  # its value tokens say everything
        if self.width:  # the places of the scaled value less the lowest
            self.offset, hi = scaled_bounds(col)
            self.top = self._places(hi - self.offset)  # the highest value's places: the bound
        elif col.kind == "categorical":
            self.category_ids = {c: codec.tokenize(escape(c)) for c in col.categories}
            self._category_of = {tuple(ids): c for c, ids in self.category_ids.items()}
            self._build_trie()
        elif col.kind in ("integer", "float"):
            scale = 10**col.precision
            self.lo = int(round(float(col.min) * scale))
            self.hi = int(round(float(col.max) * scale))
            p = col.precision
            self._complete_re = re.compile(r"-?(0|[1-9]\d*)" + (rf"\.\d{{{p}}}" if p else ""))
            # Non-negative integers get a cheap exact mask key (see mask_key).
            self._digit_bounds = (str(self.lo), str(self.hi)) if col.kind == "integer" and self.lo >= 0 else None
        elif col.kind == "datetime":
            lo = dt.datetime.strptime(str(col.min), DATE_FORMAT).date()
            hi = dt.datetime.strptime(str(col.max), DATE_FORMAT).date()
            self.dates = [(lo + dt.timedelta(days=d)).strftime(DATE_FORMAT) for d in range((hi - lo).days + 1)]

    def token_ids(self) -> list[int]:
        """The field's own new tokens (value and place tokens; empty without them)."""
        return list(self.value_ids.values()) + list(self._place_of)

    def _places(self, n: int) -> tuple[int, ...]:
        """The digits of n in the field's base, `width` of them from the highest place."""
        return tuple(n // self.base**i % self.base for i in reversed(range(self.width)))

    def max_value_tokens(self) -> int:
        """The most tokens one value of the field takes."""
        col = self.col
        if self.self_delimiting:
            return self.width or 1
        if col.kind == "categorical":
            return max(len(ids) for ids in self.category_ids.values())
        if col.kind == "text":
            return self.max_tokens
        if col.kind == "datetime":
            return 10
        return max(len(format_number(v, col.precision)) for v in (float(col.min), float(col.max))) + 1

    def encode(self, value) -> list[int]:
        if self.self_delimiting and _is_missing(value):
            return [self.value_ids[None]]
        if self.single:
            return [self.value_ids[str(value) if self.kind == "categorical" else _value_text(self.col, value)]]
        if self.width:
            return [self.place_ids[i][d] for i, d in enumerate(self._places(to_scaled(self.col, value) - self.offset))]
        if self.kind == "text":
            return self._encode_text(value)
        if _is_missing(value):
            return []
        col, codec = self.col, self.codec
        if col.kind == "categorical":
            return self.category_ids[str(value)]
        if col.kind in ("integer", "float"):
            return [codec.char_ids[c] for c in format_number(value, col.precision)]
        if col.kind == "datetime":
            return [codec.char_ids[c] for c in pd.Timestamp(value).strftime(DATE_FORMAT)]
        raise AssertionError(col.kind)

    def _encode_text(self, value) -> list[int]:
        if _is_missing(value):
            return list(self.missing_ids) if self.missing_ids else []
        ids = self.codec.tokenize(escape(str(value)))
        if len(ids) <= self.col.max_tokens:
            return ids
        self.values_cut += 1
        ids = ids[: self.col.max_tokens]
        while ids:  # never end inside an escape or a character's bytes
            try:
                if not unescape(self.codec.tokenizer.decode(ids)).endswith("\ufffd"):
                    return ids
            except ParseError:
                pass
            ids = ids[:-1]
        return ids

    # ---- the grammar ------------------------------------------------------------------

    def start(self):
        if self.width:
            return ()
        if self.kind == "text":  # (tokens so far, an escape open, still the missing marker's prefix)
            return (0, 0, self.missing_ids is not None)
        return 0 if self.single or self.kind == "categorical" else ""

    def next_tokens(self, state) -> tuple[list[int], bool]:
        """(token ids allowed next inside the value, whether the value may end here)."""
        if self.single:  # state 0: before the value token, 1: after it
            return (list(self.value_ids.values()), False) if state == 0 else ([], True)
        if self.width:  # state: the places so far, or None after the missing-value token
            if self.complete(state):
                return [], True
            k = len(state)
            highest = self.top[k] if state == self.top[:k] else self.base - 1  # at the bound, or below it
            missing = [self.value_ids[None]] if state == () and None in self.value_ids else []
            return self.place_ids[k][: highest + 1] + missing, False
        if self.kind == "categorical":
            node = self.trie[state]
            return list(node["next"]), node["end"] or (state == 0 and self.col.nullable)
        if self.kind == "text":  # any validly escaped text, the empty one included, up to its cap
            count, open_, missing = state
            marker = missing and count < len(self.missing_ids)
            if count >= self.max_tokens or open_ is None:  # at the cap, or inside the missing marker
                ids = []
            else:  # the last token may not leave an escape open
                ids = self.codec.text_ids_by[(open_, count == self.max_tokens - 1)]
            if marker and self.missing_ids[count] not in ids:
                ids = ids + [self.missing_ids[count]]
            return ids, open_ == 0 or (missing and count == len(self.missing_ids))
        chars = [c for c in NUMBER_CHARS if self._prefix_ok(state + c)]
        can_end = self._complete(state) or (state == "" and self.col.nullable)
        return [self.codec.char_ids[c] for c in chars], can_end

    # ---- within a domain (declared rules: `rules.Domain`) ----------------------------------

    def next_tokens_within(self, state, domain) -> tuple[list[int], bool]:
        """`next_tokens` kept to the values `domain` allows: a token only if the value it starts
        or continues can still end inside the domain, the end only at a value inside it."""
        ids, can_end = self.next_tokens(state)
        if domain is None:
            return ids, can_end
        if self.kind == "text":
            raise AssertionError("text columns take no rules")
        if self.single:
            return [t for t in ids if self._single_allowed(t, domain)], can_end
        if self.width:
            if state is None or self.complete(state):
                return ids, can_end
            return [t for t in ids if (domain.missing if t == self.value_ids.get(None)
                                       else self._places_feasible(state + (self._place_of[t][1],), domain))], can_end
        if self.kind == "categorical":
            kept = [t for t in ids if self._categories_feasible(self.trie[state]["next"][t], domain)]
            node = self.trie[state]
            end = (node["end"] and self._category_allowed(node.get("category"), domain)) or \
                (state == 0 and self.col.nullable and domain.missing)
            return kept, can_end and end
        lo, hi = self._bounds_within(domain)
        kept = [self.codec.char_ids[c] for c in NUMBER_CHARS if self._prefix_ok(state + c, lo, hi)]
        end = (self._complete(state) and lo <= self._scaled_text(state) <= hi) or \
            (state == "" and self.col.nullable and domain.missing)
        return kept, end

    def domain_key(self, state, domain):
        """A key that determines `next_tokens_within(state, domain)` (masks are cached per key)."""
        if domain is None:
            return self.mask_key(state), None
        return (self.mask_key(state) if self.single else state), domain.key()

    def value_of(self, state, token: int):
        """The value a field holds once `token` completed it (`state`: before that token); None
        for a missing value. Not for text."""
        if self.single:
            value = self._value_of[token]
            if value is None or self.kind == "categorical":
                return value
            return self.parse([token])
        if self.width:
            return None if token == self.value_ids.get(None) else self.parse(
                [self.place_ids[i][d] for i, d in enumerate(state + (self._place_of[token][1],))])
        if self.kind == "categorical":
            return self.trie[state].get("category")  # the separator ends it: `state` is its node
        return None if state == "" else self.parse([self.codec.char_ids[c] for c in state])

    def _single_allowed(self, token: int, domain) -> bool:
        value = self._value_of[token]
        if value is None:
            return domain.missing
        if self.kind == "categorical":
            return self._category_allowed(value, domain)
        scaled = to_scaled(self.col, pd.Timestamp(value) if self.kind == "datetime" else float(value))
        return domain.low <= scaled <= domain.high and (domain.values is None or value in domain.values)

    def _category_allowed(self, category, domain) -> bool:
        return category is not None and (domain.values is None or category in domain.values)

    def _categories_feasible(self, node: int, domain) -> bool:
        below = self.trie[node]["below"]
        return bool(below) if domain.values is None else bool(below & domain.values)

    def _places_feasible(self, places: tuple, domain) -> bool:
        """Can these leading places end at a scaled value inside `domain` (and the column's range)?"""
        rest = self.width - len(places)
        low = sum(d * self.base ** (self.width - 1 - i) for i, d in enumerate(places))
        high = min(low + self.base ** rest - 1, sum(d * self.base ** (self.width - 1 - i) for i, d in enumerate(self.top)))
        return max(low + self.offset, domain.low) <= min(high + self.offset, domain.high)

    def _bounds_within(self, domain) -> tuple[int, int]:
        """The field's scaled bounds narrowed to `domain`'s."""
        lo, hi = scaled_bounds(self.col)
        return (lo if domain.low == -math.inf else max(lo, math.ceil(domain.low)),
                hi if domain.high == math.inf else min(hi, math.floor(domain.high)))

    def _scaled_text(self, text: str) -> int:
        if self.kind == "datetime":
            return to_scaled(self.col, pd.Timestamp(text))
        return to_scaled(self.col, float(text))

    def mask_key(self, state):
        """A small key that determines `next_tokens(state)`: masks are cached per key, so a
        sampler keeps a few dozen masks per number column, not one per digit prefix seen."""
        if self.single or self.kind == "categorical":
            return state
        if self.width:
            return self.state_key(state)
        if self.kind == "text":
            count, open_, missing = state
            return (min(self.max_tokens - count, 2), open_, count if missing else -1)
        if self._digit_bounds:
            return self._digit_key(state)
        ids, can_end = self.next_tokens(state)
        return (tuple(ids), can_end)

    def state_key(self, state):
        """A key that determines the allowed tokens and every later transition: states with
        equal keys are one state of the field's finite automaton (a trie node, a text's token
        count and open escape, the digit-DP summary of a non-negative integer, else the prefix
        itself)."""
        if self.width:  # the places so far and whether they are at the bound; "missing" after its token
            return "missing" if state is None else (len(state), state == self.top[: len(state)])
        return self._digit_key(state) if self._digit_bounds else state

    def complete(self, state) -> bool:
        """Has a self-delimiting field's value ended (no separator follows it)?"""
        if self.single:
            return state == 1
        return state is None or len(state) == self.width

    def _digit_key(self, prefix: str):
        """For a non-negative integer the allowed next digits depend only on the prefix's
        length, how it compares with the bounds' leading digits, and whether it is "0"
        (digit DP): constant time, where next_tokens tests every character."""
        lo, hi = self._digit_bounds
        k = len(prefix)
        return (k, _compare(prefix, lo[:k]) if k <= len(lo) else None,
                _compare(prefix, hi[:k]) if k <= len(hi) else None, prefix == "0")

    def advance(self, state, token: int):
        if self.single:
            return 1
        if self.width:
            return None if token == self.value_ids.get(None) else state + (self._place_of[token][1],)
        if self.kind == "categorical":
            return self.trie[state]["next"][token]
        if self.kind == "text":
            count, open_, missing = state
            missing = missing and count < len(self.missing_ids) and token == self.missing_ids[count]
            walks = self.codec.text_escapes.get(token)
            open_ = walks[open_] if walks and open_ is not None else None  # None: only the marker goes on
            return (count + 1, int(open_) if open_ is not None else None, missing)
        return state + self.codec.id_chars[token]

    def _build_trie(self):
        self.trie = [{"next": {}, "end": False, "below": set()}]
        for category, ids in self.category_ids.items():
            node = 0
            self.trie[0]["below"].add(category)
            for t in ids:
                nxt = self.trie[node]["next"]
                if t not in nxt:
                    nxt[t] = len(self.trie)
                    self.trie.append({"next": {}, "end": False, "below": set()})
                node = nxt[t]
                self.trie[node]["below"].add(category)
            self.trie[node]["end"] = True
            self.trie[node]["category"] = category

    def _prefix_ok(self, s: str, lo: int | None = None, hi: int | None = None) -> bool:
        """Can `s` start a value of the field (within scaled bounds [lo, hi], default the column's)?"""
        if self.kind == "datetime":
            first, last = (0 if lo is None else max(0, lo)), (len(self.dates) - 1 if hi is None else hi)
            i = bisect.bisect_left(self.dates, s, first, last + 1)
            return i <= last and i < len(self.dates) and self.dates[i].startswith(s)
        return number_prefix_ok(s, self.lo if lo is None else lo, self.hi if hi is None else hi, self.col.precision)

    def _complete(self, s: str) -> bool:
        if self.kind == "datetime":
            i = bisect.bisect_left(self.dates, s)
            return i < len(self.dates) and self.dates[i] == s
        if not self._complete_re.fullmatch(s):
            return False
        n = int(s.replace(".", "").replace("-", ""))
        if s.startswith("-"):
            n = -n
            if n == 0:
                return False
        return self.lo <= n <= self.hi

    # ---- parsing ----------------------------------------------------------------------

    def parse(self, ids: list[int]):
        col = self.col
        if self.single:
            if len(ids) != 1 or ids[0] not in self._value_of:
                raise ParseError(f"column '{col.name}': not one of its value tokens")
            value = self._value_of[ids[0]]
            if value is None or self.kind == "categorical":
                return value
            return pd.Timestamp(value) if self.kind == "datetime" else from_scaled(self.col, to_scaled(self.col, value))
        if self.width:
            if ids == [self.value_ids.get(None)]:
                return None
            places = [self._place_of.get(t) for t in ids]
            if [p[0] if p else None for p in places] != list(range(self.width)) or tuple(d for _, d in places) > self.top:
                raise ParseError(f"column '{col.name}': not its {self.width} place tokens of a value in range")
            return from_scaled(col, sum(d * self.base**(self.width - 1 - i) for i, d in places) + self.offset)
        if col.kind == "text":
            text = self.codec.tokenizer.decode(ids, skip_special_tokens=False)
            return None if col.nullable and text == MISSING_TEXT else unescape(text)
        if not ids:
            if col.nullable:
                return None
            if col.kind != "categorical" or "" not in col.categories:
                raise ParseError(f"column '{col.name}': empty value")
        if col.kind == "categorical" and tuple(ids) in self._category_of:  # a category's own tokens
            return self._category_of[tuple(ids)]
        if col.kind in ("integer", "float", "datetime"):
            if any(t not in self.codec.id_chars for t in ids):
                raise ParseError(f"column '{col.name}': non-numeric token")
            s = "".join(self.codec.id_chars[t] for t in ids)
            if not self._complete(s):
                raise ParseError(f"column '{col.name}': {s!r} is not a valid value")
            if col.kind == "integer":
                return int(s)
            if col.kind == "float":
                return float(s)
            return pd.Timestamp(s)
        text = unescape(self.codec.tokenizer.decode(ids, skip_special_tokens=False))
        if col.kind == "categorical" and text not in self.category_ids:
            raise ParseError(f"column '{col.name}': {text!r} is not a category")
        return text


def value_token_names(col: Column) -> dict:
    """A column's new token strings under value tokens: value text -> `<|column=value|>` for
    a one-token column, and None -> `<|column|>` for a missing value of a nullable one-token
    or place-value column; empty for the others."""
    names = {v: f"<|{col.name}={v}|>" for v in token_values(col) or []}
    if col.nullable and (names or place_layout(col)):
        names[None] = f"<|{col.name}|>"
    return names


def place_token_names(col: Column) -> list[list[str]]:
    """A place-value column's digit tokens (`place_layout`), per place from the highest:
    `<|column#place=digit|>`; empty for the others."""
    places, base = place_layout(col) or (0, 0)
    return [[f"<|{col.name}#{i}={d}|>" for d in range(base)] for i in range(places)]


def _compare(a: str, b: str) -> int:
    """-1, 0 or 1 as digit string a is below, equal to or above b (same length)."""
    return (a > b) - (a < b)


def number_prefix_ok(s: str, lo: int, hi: int, precision: int) -> bool:
    """Can the text prefix `s` be completed to a number whose scaled value is in [lo, hi]?

    Numbers are written `-?(0|[1-9][0-9]*)(.ddd)?` with exactly `precision` decimals;
    `lo`/`hi` are the bounds times 10**precision.
    """
    if s == "":
        return lo <= hi
    negative = s.startswith("-")
    body = s[1:] if negative else s
    a, b = (max(1, -hi), -lo) if negative else (max(0, lo), hi)  # range of |scaled value|
    if a > b:
        return False
    if body == "":
        return True
    if not re.fullmatch(r"(0|[1-9]\d*)(\.\d*)?" if precision else r"0|[1-9]\d*", body):
        return False
    scale = 10**precision
    if "." in body:
        int_part, decimals = body.split(".")
        if len(decimals) > precision:
            return False
        width = 10 ** (precision - len(decimals))
        first = int(int_part) * scale + (int(decimals) * width if decimals else 0)
        return first <= b and first + width - 1 >= a
    head = int(body)
    for k in range(1 if body == "0" else 40):  # k more integer digits ("0" takes none)
        first = head * 10**k * scale
        if first > b:
            return False
        if (head + 1) * 10**k * scale - 1 >= a:
            return True
    return False
