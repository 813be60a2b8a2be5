"""A subject's history as one token sequence: the codec, its grammar, and the two tables it writes.

With `data.subject` (and `data.mode: histories`, the default), each training unit is one subject
(a person) and its rows, in `data.order_by` order (default: the table's), are one sequence:

    BOS  s1 s2 ... sk  n  ROW(n) e1 ... em  ROW(n-1) e1 ... em  ...  ROW(1) e1 ... em  EOS

`s1..sk` are the subject's own columns (a subject table's, written once, first: they condition
the rows), `n` is the number of rows (the length field, a value of its own), and each `ROW(k)`
token starts an event row with k rows left, itself included. The model writes how many rows a
subject has before writing them (one token, learned as a column's values are, where ending a
history row by row had to be learned as a count), and each row knowing the ones before it and
how many are left; the grammar writes the row tokens and EOS (after exactly n rows), so they
cost nothing to learn. (The reference engine gives its rows the same: the sequence length
first, then each row's index and the rows left.) The fields are those of `serialize.RowCodec`
(value tokens, place tokens, separators after fields that do not end by themselves; the last
field of a row ends at the next ROW or EOS). In later rows a categorical column that keeps the
row before's value is written as its own "same" token (`SameValue`: a player's team from one
season to the next), one token learned in a few steps where copying which of a hundred teams came
before takes many. The `order_by` column is written as its first
value and then, in later rows, the gap since the row before (a number >= 0, in the column's
scaled integers: days for dates), so histories come out in order; decoding adds the gaps up,
and a history ends before its first row past the column's max, as real histories end where
the data's window does (clipping piled rows up at the max; drawing such histories again kept
only the short ones). A history holds at most `max_rows` rows (longer ones are cut at
training, and counted) and at least `min_rows`.

The grammar is the codec's automaton (`start_state`, `allowed`, `next_state`, ...), which
`sample.CompiledGrammar` compiles as it does a row's; the rows left are part of the state.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from dplm.errors import DplmError
from dplm.schema import Column, Schema
from dplm.serialize import ParseError, RowCodec, from_scaled, scaled_bounds, to_scaled

ROW_TOKENS = 256  # row tokens: <|row:k|> starts a row with k rows left (itself included), k capped here
LENGTH = "(rows)"  # the length field's column: how many rows the history has, written before them


SAME = object()  # a parsed "same" token, before decoding gives it the row before's value


def gap_column(col: Column) -> Column:
    """The column of the gaps between consecutive values of the ordering column `col`: from 0
    to its span, in its scaled integers (days for dates)."""
    lo, hi = scaled_bounds(col)
    return Column(name=f"{col.name}+", kind="integer", min=0, max=hi - lo)


class HistoryCodec:
    """Encode a subject (its own values and its rows) to token ids and back, for a subject
    schema (possibly empty) and an event schema."""

    def __init__(self, subject_schema: Schema | None, event_schema: Schema, tokenizer, value_tokens: bool,
                 order_by: str | None, max_rows: int, min_rows: int = 1, output_order: list[str] | None = None,
                 same_columns: list[str] | None = None):
        """`same_columns`: the event columns whose later rows may write "same" (`same_columns`;
        a run saved before them has none)."""
        self.subject_schema = subject_schema or Schema([])
        self.event_schema = event_schema
        self.order_by = order_by
        self.max_rows, self.min_rows = max_rows, min_rows
        gap = [gap_column(event_schema[order_by])] if order_by else []
        length = Column(name=LENGTH, kind="integer", min=min_rows, max=max_rows)
        fields_schema = Schema([*self.subject_schema.columns, *event_schema.columns, *gap, length])
        from tokenizers import AddedToken

        row_tokens = [f"<|row:{k}|>" for k in range(1, min(max_rows, ROW_TOKENS) + 1)]
        same_columns = list(same_columns or [])
        same_tokens = [f"<|{n}:same|>" for n in same_columns]
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in row_tokens + same_tokens],
                             special_tokens=True)
        self.rows_codec = RowCodec(fields_schema, tokenizer, value_tokens)  # the fields' token machinery
        self.tokenizer = tokenizer
        self.bos_id, self.eos_id, self.sep_id = self.rows_codec.bos_id, self.rows_codec.eos_id, self.rows_codec.sep_id
        self.row_ids = tokenizer.convert_tokens_to_ids(row_tokens)
        self._row_set = set(self.row_ids)
        by_name = {f.col.name: f for f in self.rows_codec.fields}
        self.length_field = by_name[LENGTH]
        # What comes before the rows: the subject's fields, then the length (GivenValues' columns).
        self.fields = [*(by_name[n] for n in self.subject_schema.names), self.length_field]
        self.first_row = [by_name[n] for n in event_schema.names]
        self.same_ids = dict(zip(same_columns, tokenizer.convert_tokens_to_ids(same_tokens)))  # column -> its same token
        self.later_rows = [SameValue(by_name[n], self.same_ids[n]) if n in self.same_ids
                           else by_name[f"{n}+" if n == order_by else n] for n in event_schema.names]
        # Every column (the subject's, then the rows'): what the run's schema.yaml holds.
        self.schema = Schema([*self.subject_schema.columns, *event_schema.columns])
        self.schema.output_order = output_order

    def order_column(self) -> Column | None:
        """The ordering column (None: the table's order)."""
        return self.event_schema[self.order_by] if self.order_by else None

    def layout(self) -> dict:
        """What `from_layout` needs besides the schema (saved as history.json)."""
        return {"subject_columns": self.subject_schema.names, "event_columns": self.event_schema.names,
                "order_by": self.order_by, "max_rows": self.max_rows, "min_rows": self.min_rows,
                "same_columns": list(self.same_ids)}

    @classmethod
    def from_layout(cls, layout: dict, schema: Schema, tokenizer, value_tokens: bool) -> HistoryCodec:
        def part(names):
            return Schema([schema[n] for n in names])

        return cls(part(layout["subject_columns"]), part(layout["event_columns"]), tokenizer, value_tokens,
                   layout["order_by"], layout["max_rows"], layout["min_rows"], schema.output_order,
                   layout.get("same_columns"))

    # ---- the fields' tokens -------------------------------------------------------------

    def value_token_texts(self) -> dict[int, list[int]]:
        """Where each added token's embedding starts: the fields' value tokens, and each row
        token at a newline's and its count's (left to the resize they would start random, so a
        loaded or resumed run would read them differently from the model that trained on them)."""
        rows = {token: self.rows_codec.tokenize(f"\n{k}") for k, token in enumerate(self.row_ids, start=1)}
        same = {token: self.rows_codec.tokenize(f"same {name}") for name, token in self.same_ids.items()}
        return {**self.rows_codec.value_token_texts(), **rows, **same}

    def output_token_ids(self) -> list[int]:
        return sorted(set(self.rows_codec.output_token_ids()) | self._row_set | set(self.same_ids.values()))

    def values_cut(self) -> dict[str, int]:
        """Text values cut at their column's `max_tokens` (`RowCodec.values_cut`)."""
        return self.rows_codec.values_cut()

    def text(self, ids: list[int]) -> str:
        return self.rows_codec.text(ids)

    def row_fields(self, first: bool) -> list:
        return self.first_row if first else self.later_rows

    def row_token(self, left: int) -> int:
        """The token that starts a row with `left` rows left, itself included."""
        return self.row_ids[min(left, len(self.row_ids)) - 1]

    def rows_written(self, ids: list[int]) -> int:
        """The rows a token sequence starts (its row tokens)."""
        return sum(t in self._row_set for t in ids)

    def ending(self, j: int) -> list[int]:
        """The token after field j before the rows: the separator unless the field ends by itself."""
        return [] if self.fields[j].self_delimiting else [self.sep_id]

    # ---- encoding -------------------------------------------------------------------------

    def encode(self, subject: dict, rows: pd.DataFrame) -> list[int]:
        """One subject's values and its rows (in order, at most `max_rows`) -> token ids."""
        rows = rows.iloc[: self.max_rows]
        values = {**subject, LENGTH: len(rows)}
        ids = [self.bos_id]
        for j, field in enumerate(self.fields):
            ids += field.encode(values[field.col.name]) + self.ending(j)
        previous, before = None, None
        for r, row in enumerate(rows[self.event_schema.names].itertuples(index=False, name=None)):
            ids.append(self.row_token(len(rows) - r))
            fields = self.row_fields(r == 0)
            for j, (field, value) in enumerate(zip(fields, row)):
                if self.order_by and field.col.name == f"{self.order_by}+":
                    col = self.event_schema[self.order_by]
                    value, previous = to_scaled(col, value) - previous, to_scaled(col, value)
                elif self.order_by and field.col.name == self.order_by:
                    previous = to_scaled(field.col, value)
                ids += field.encode(value, before[j]) if isinstance(field, SameValue) else field.encode(value)
                if j < len(fields) - 1 and not field.self_delimiting:
                    ids.append(self.sep_id)
            before = row
        return ids + [self.eos_id]

    # ---- the grammar -----------------------------------------------------------------------
    # States: ("s", j, inner, ids) in field j before the rows (ids: its tokens so far, kept for the
    # length); ("b", first, left) before a row, `left` rows to go; ("e", first, left, j, inner) in
    # field j of a row; None once the history has ended. The length fixes the rows: the model
    # writes it, the grammar then writes each row's token and ends the history after its rows.

    def start_state(self):
        return ("s", 0, self.fields[0].start(), ())

    def _boundary(self, left: int) -> list[int]:
        """What may follow a complete row (or the length) with `left` rows to go."""
        return [self.row_token(left)] if left else [self.eos_id]

    def allowed(self, state) -> list[int]:
        if state is None:
            return [self.eos_id]
        if state[0] == "b":
            return self._boundary(state[2])
        if state[0] == "s":
            _, j, inner, _ = state
            field = self.fields[j]
            ids, can_end = field.next_tokens(inner)
            return list(ids) + ([self.sep_id] if can_end and not field.self_delimiting else [])
        _, first, left, j, inner = state
        fields = self.row_fields(first)
        ids, can_end = fields[j].next_tokens(inner)
        if not can_end or fields[j].self_delimiting:
            return list(ids)
        return list(ids) + ([self.sep_id] if j < len(fields) - 1 else self._boundary(left - 1))

    def next_state(self, state, token: int):
        if state is None or token == self.eos_id:
            return None
        if state[0] == "b":
            return ("e", state[1], state[2], 0, self.row_fields(state[1])[0].start())  # the row token
        if state[0] == "s":
            _, j, inner, ids = state
            field = self.fields[j]
            if not (token == self.sep_id and not field.self_delimiting):
                inner, ids = field.advance(inner, token), ids + (token,)
                if not (field.self_delimiting and field.complete(inner)):
                    return ("s", j, inner, ids)
            if j + 1 < len(self.fields):
                return ("s", j + 1, self.fields[j + 1].start(), ())
            return ("b", True, self.length_field.parse(list(ids)))
        _, first, left, j, inner = state
        fields = self.row_fields(first)
        field = fields[j]
        last = j == len(fields) - 1
        if last and not field.self_delimiting and token in self._row_set:
            return self.next_state(("b", False, left - 1), token)
        if not (token == self.sep_id and not field.self_delimiting):
            inner = field.advance(inner, token)
            if not (field.self_delimiting and field.complete(inner)):
                return ("e", first, left, j, inner)
        return ("b", False, left - 1) if last else ("e", first, left, j + 1, fields[j + 1].start())

    def state_key(self, state):
        return self._key(state, "state_key")

    def mask_key(self, state):
        return self._key(state, "mask_key")

    def _key(self, state, method: str):
        """A hashable key of `state`, its field's part from that field's `method` (state_key or
        mask_key); the length field's tokens so far in full (they decide the rows to come)."""
        if state is None or state[0] == "b":
            return state or "done"
        if state[0] == "s":
            _, j, inner, ids = state
            return ("s", j, ids) if j == len(self.fields) - 1 else ("s", j, getattr(self.fields[j], method)(inner))
        _, first, left, j, inner = state
        return ("e", first, left, j, getattr(self.row_fields(first)[j], method)(inner))

    def column_of(self, state) -> int:
        """The field before the rows a state is in (their number once past them): GivenValues' columns."""
        return state[1] if state is not None and state[0] == "s" else len(self.fields)

    def max_tokens(self) -> int:
        """An upper bound on the tokens of one history after BOS."""
        before = sum(f.max_value_tokens() + 1 for f in self.fields)
        row = 1 + sum(max(a.max_value_tokens(), b.max_value_tokens()) + 1
                      for a, b in zip(self.first_row, self.later_rows))
        return before + self.max_rows * row + 1

    # ---- decoding ----------------------------------------------------------------------------

    def decode(self, ids: list[int]) -> tuple[dict, list[dict]]:
        """Token ids (BOS ... EOS) -> (the subject's values, its rows); ParseError if invalid."""
        ids = list(ids)
        if ids and ids[0] == self.bos_id:
            ids = ids[1:]
        state, spans, count = self.start_state(), {}, 0
        for token in ids:
            if token not in self.allowed(state):
                raise ParseError("history breaks its grammar")
            count += token in self._row_set
            place = (("s", state[1]) if state[0] == "s" else ("e", count - 1, state[3]) if state[0] == "e" else None)
            if place is not None and token not in (self.sep_id, self.eos_id) and token not in self._row_set:
                spans.setdefault(place, []).append(token)
            state = self.next_state(state, token)
            if state is None:
                break
        if state is not None:
            raise ParseError("history has no end token")
        subject = {f.col.name: f.parse(spans.get(("s", j), [])) for j, f in enumerate(self.fields[:-1])}
        rows = [{f.col.name: f.parse(spans.get(("e", r, j), [])) for j, f in enumerate(self.row_fields(r == 0))}
                for r in range(count)]
        for before, row in zip(rows, rows[1:]):
            row.update({name: before[name] for name in self.same_ids if row[name] is SAME})
        return subject, self._ordered(rows)

    def _ordered(self, rows: list[dict]) -> list[dict]:
        """The ordering column's values from the first value and the gaps, the history ending
        before a row past the column's max (ParseError if fewer than min_rows rows are left)."""
        if not self.order_by or not rows:
            return rows
        col = self.event_schema[self.order_by]
        hi = scaled_bounds(col)[1]
        value = to_scaled(col, rows[0][self.order_by])
        for r, row in enumerate(rows[1:], start=1):
            value += int(row.pop(f"{self.order_by}+"))
            if value > hi:
                if r < self.min_rows:
                    raise ParseError(f"history's {self.order_by} passes its max before min_rows rows")
                return rows[:r]
            row[self.order_by] = from_scaled(col, value)
        return rows


class SameValue:
    """A later row's field of a one-token categorical column that may also write its "same"
    token (`same_id`): the row before's value. Beside the column's `serialize.FieldGrammar`,
    whose value tokens it allows too (a history's automaton needs no memory of the value)."""

    self_delimiting = True

    def __init__(self, field, same_id: int):
        self.field, self.same_id, self.col = field, same_id, field.col

    def encode(self, value, before) -> list[int]:
        """The same token where `value` is the row before's (both missing included)."""
        kept = pd.isna(before) if pd.isna(value) else not pd.isna(before) and value == before
        return [self.same_id] if kept else self.field.encode(value)

    def start(self):
        return 0

    def next_tokens(self, state) -> tuple[list[int], bool]:
        return ([*self.field.next_tokens(self.field.start())[0], self.same_id], False) if state == 0 else ([], True)

    def advance(self, state, token: int):
        return 1

    def complete(self, state) -> bool:
        return state == 1

    def mask_key(self, state):
        return state

    state_key = mask_key

    def max_value_tokens(self) -> int:
        return 1

    def parse(self, ids: list[int]):
        return SAME if ids == [self.same_id] else self.field.parse(ids)


def same_columns(event_schema: Schema, value_tokens: bool) -> list[str]:
    """The event columns whose later rows may write "same" (`SameValue`): the categorical ones,
    one token per value (value tokens). From the schema alone: public."""
    return [c.name for c in event_schema.columns if c.kind == "categorical"] if value_tokens else []


def history_units(events: pd.DataFrame, subject: str, order_by: str | None) -> list[np.ndarray]:
    """Each subject's row positions in `events`, in order (`order_by`, then the table's order)."""
    order = np.arange(len(events))
    if order_by:
        order = np.lexsort((order, events[order_by].to_numpy()))
    codes = pd.factorize(events[subject].to_numpy()[order])[0]
    groups = pd.Series(order).groupby(codes, sort=False).agg(list)
    return [np.asarray(g) for g in groups]


@dataclasses.dataclass
class Histories:
    """Synthetic subjects: their own table (key + subject columns) and their rows (key + event
    columns), with matching fresh keys 1..n."""

    subjects: pd.DataFrame
    events: pd.DataFrame

    def __len__(self) -> int:
        return len(self.subjects)

    def with_keys(self, key: str, keys: list) -> Histories:
        """The same subjects under the keys `keys` (in the order of 1..n)."""
        mapping = dict(zip(range(1, len(keys) + 1), keys))
        return Histories(self.subjects.assign(**{key: self.subjects[key].map(mapping)}),
                         self.events.assign(**{key: self.events[key].map(mapping)}))

    def subset(self, indexes, key: str) -> Histories:
        """The subjects at positions `indexes`, with fresh keys 1..len(indexes)."""
        chosen = self.subjects.iloc[indexes]
        mapping = dict(zip(chosen[key], range(1, len(chosen) + 1)))
        events = self.events[self.events[key].isin(mapping)]
        return Histories(chosen.assign(**{key: chosen[key].map(mapping)}).reset_index(drop=True),
                         events.assign(**{key: events[key].map(mapping)}).reset_index(drop=True))

    def write(self, path) -> list:
        """The event table to `path` (CSV, Parquet or JSONL by its extension) and, when the
        subjects have columns of their own, the subject table beside it (`subjects_path`)."""
        from dplm.data import write_table

        write_table(self.events, path)
        if len(self.subjects.columns) > 1:
            write_table(self.subjects, subjects_path(path))
            return [path, subjects_path(path)]
        return [path]


def subjects_path(path):
    """Where the subject table goes beside an event table file: `NAME_subjects.EXT`."""
    from pathlib import Path

    path = Path(path)
    return path.with_name(f"{path.stem}_subjects{path.suffix}")


# ---- the training tables ---------------------------------------------------------------------

LENGTH_EDGES = np.array([1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 15, 20, 25, 30, 40, 50, 60, 80, 100, 120, 150, 200, 250, 300,
                         400, 500, 600, 800, 1000, 1500, 2000, 3000, 5000, 10000])
CAP_QUANTILE = 0.99  # under DP the history cap is this quantile of the rows per subject
# Span bins' upper edges as shares of the ordering column's public width (calibrated sampling without DP)
SPAN_SHARES = np.array([1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8])


def check_subject_table(events: pd.DataFrame, subjects: pd.DataFrame, key: str) -> None:
    """The subject table must hold the key once per subject and every subject of the events."""
    if key not in subjects.columns:
        raise DplmError(f"the subject table has no column '{key}' (data.subject); give it the key of the event table")
    if subjects[key].duplicated().any():
        dup = subjects[key][subjects[key].duplicated()].iloc[0]
        raise DplmError(f"the subject table holds subject '{dup}' more than once; give one row per subject")
    missing = ~events[key].isin(set(subjects[key]))
    if missing.any():
        raise DplmError(f"subject '{events[key][missing].iloc[0]}' of the event table is not in the subject table; "
                        "add it there or drop its rows")
    shared = [c for c in subjects.columns if c != key and c in events.columns]
    if shared:
        raise DplmError(f"column '{shared[0]}' is in both the event and the subject table; rename one")


def check_subject_columns_constant(events: pd.DataFrame, key: str, columns: list[str]) -> None:
    """Columns declared as the subject's must hold one value per subject."""
    for c in columns:
        varying = events.groupby(key, sort=False)[c].nunique(dropna=False) > 1
        if varying.any():
            raise DplmError(f"column '{c}' is declared a subject column but subject '{varying.idxmax()}' has "
                            "several values; make it an event column or fix the data")


def check_order_by(events: pd.DataFrame, order_by: str, kind: str) -> None:
    if order_by not in events.columns:
        raise DplmError(f"data.order_by '{order_by}' is not a column of the event table; choose one of "
                        f"{list(events.columns)}")
    if kind not in ("integer", "float", "datetime"):
        raise DplmError(f"data.order_by '{order_by}' is a {kind} column; histories are ordered by a number or a date")
    if events[order_by].isna().any():
        raise DplmError(f"data.order_by column '{order_by}' has missing values; fill them or choose another column")


def length_counts(lengths: np.ndarray) -> np.ndarray:
    """How many subjects have each number of rows, over the public `LENGTH_EDGES` bins."""
    return np.bincount(length_bins(lengths), minlength=len(LENGTH_EDGES) - 1).astype(float)


def length_bins(lengths: np.ndarray) -> np.ndarray:
    """Each subject's `LENGTH_EDGES` bin (no rows: the first)."""
    return np.searchsorted(LENGTH_EDGES, np.clip(lengths, 1, LENGTH_EDGES[-1] - 1), side="right") - 1


def span_bins(spans: np.ndarray, width: int) -> np.ndarray:
    """Each subject's bin of its span (first to last row, in the ordering column's scaled
    integers) over public edges: no span (0), then up to each of `SPAN_SHARES` of the column's
    width, then the rest (`len(SPAN_SHARES) + 2` bins)."""
    return np.where(spans <= 0, 0, 1 + np.searchsorted(SPAN_SHARES * max(width, 1), spans, side="left"))


def subject_spans(owners: np.ndarray, scaled: np.ndarray, subjects) -> np.ndarray:
    """Last minus first ordering value of each of `subjects` (0 without rows), from the event rows'
    owners and their scaled ordering values."""
    values = pd.Series(scaled).groupby(owners)
    return (values.max() - values.min()).reindex(subjects, fill_value=0).to_numpy()


def subject_counts(lengths: np.ndarray, spans: np.ndarray | None = None, width: int = 0) -> np.ndarray:
    """Subjects per (rows bin, span bin): `length_bins` x `span_bins`; one span bin without spans."""
    counts = np.zeros((len(LENGTH_EDGES) - 1, 1 if spans is None else len(SPAN_SHARES) + 2))
    np.add.at(counts, (length_bins(lengths), 0 if spans is None else span_bins(spans, width)), 1.0)
    return counts


SUM_BINS = 10  # calibrated sampling without DP: the training subjects' sums of each number column, in deciles


def sum_bins(sums: np.ndarray, edges) -> np.ndarray:
    """Each subject's bin of its sum over `edges` (`subject_sums`): (-inf, e0], (e0, e1], ..."""
    return np.searchsorted(np.asarray(edges, dtype=float), sums, side="left")


def column_sums(events: pd.DataFrame, owners: np.ndarray, subjects) -> dict[str, np.ndarray]:
    """Each of `subjects`' sum of each column of `events` (missing values and no rows: 0), from
    the event rows' owners."""
    return {name: events[name].astype(float).groupby(owners).sum().reindex(subjects, fill_value=0.0).to_numpy()
            for name in events.columns}


def subject_sums(sums: dict[str, np.ndarray]) -> dict[str, dict]:
    """Per column: the decile edges of the training subjects' `sums` (`column_sums`) and the
    subjects in each bin between them (read from the data: without DP only)."""
    out = {}
    for name, values in sums.items():
        edges = np.unique(np.quantile(values, np.linspace(0, 1, SUM_BINS + 1)[1:-1]))
        out[name] = {"edges": edges.tolist(),
                     "counts": np.bincount(sum_bins(values, edges), minlength=len(edges) + 1).tolist()}
    return out


def dp_history_length(lengths: np.ndarray, epsilon: float, rng) -> tuple[int, np.ndarray]:
    """(cap, noisy `length_counts`) of the rows per subject, epsilon-DP: Laplace(1/epsilon) noise
    on every count (a subject is in one bin), counts below `privacy.range_threshold` taken as
    empty (noise alone would fill the tail), the cap the upper end of the bin where the noisy
    share reaches `CAP_QUANTILE`."""
    from dplm.privacy import range_threshold

    noisy = length_counts(lengths) + rng.laplace(0.0, 1.0 / epsilon, size=len(LENGTH_EDGES) - 1)
    noisy = np.where(noisy > range_threshold(epsilon, len(noisy)), noisy, 0.0)
    if noisy.sum() <= 0:
        return 1, noisy
    b = int(np.searchsorted(np.cumsum(noisy) / noisy.sum(), CAP_QUANTILE))
    return int(LENGTH_EDGES[b + 1] - 1), noisy


def calibrated_subjects(drawn: Histories, key: str, counts: np.ndarray, cap: int, n: int, rng,
                        order: Column | None = None, sums: dict | None = None) -> Histories:
    """`n` of the `drawn` subjects (more than `n`), chosen so that their rows per subject, and
    with more than one span bin their spans with them, come near `counts` (`subject_counts` of
    the training subjects: without DP rows x span, exact; under DP rows alone, noisy; the rows
    bins past `cap` folded into the cap's; `order`: the ordering column), and without DP each
    number column's sum per subject near the training subjects' deciles (`sums`:
    `subject_sums`): raking weights (`marginals.raking_weights`), then the subjects drawn in
    proportion to them. Post-processing of the model and the counts: no epsilon."""
    from dplm.marginals import proportional_draw, raking_weights, smoothed
    from dplm.serialize import to_scaled_many

    target = folded_counts(counts, cap)
    subjects, rows = subject_rows(drawn, key)
    cells = np.minimum(length_bins(rows), len(target) - 1) * target.shape[1]
    owners = drawn.events[key].to_numpy()
    if target.shape[1] > 1:
        lo, hi = scaled_bounds(order)
        cells = cells + span_bins(subject_spans(owners, to_scaled_many(order, drawn.events[order.name]), subjects), hi - lo)
    margins = []
    if sums:
        drawn_sums = column_sums(drawn.events[list(sums)], owners, subjects)
        margins = [(sum_bins(drawn_sums[name], s["edges"]), smoothed(np.asarray(s["counts"], dtype=float), 1.0))
                   for name, s in sums.items()]
    margins.append((cells, smoothed(target.ravel(), 1.0)))  # last: each pass ends on the rows (and spans)
    return drawn.subset(proportional_draw(raking_weights(margins), n, rng), key)


def folded_counts(counts, cap: int) -> np.ndarray:
    """`subject_counts` with the rows bins past `cap`'s folded into the cap's bin."""
    counts = np.asarray(counts, dtype=float)
    last = int(np.searchsorted(LENGTH_EDGES, cap, side="right")) - 1
    target = counts[: last + 1].copy()
    target[last] += counts[last + 1:].sum(axis=0)
    return target


def rows_counts(counts, cap: int) -> np.ndarray:
    """Subjects per rows bin of `subject_counts` (folded at `cap`; negative noisy counts as 0)."""
    return np.clip(folded_counts(counts, cap), 0, None).sum(axis=1)


def subject_rows(drawn: Histories, key: str) -> tuple[np.ndarray, np.ndarray]:
    """The subjects' keys and each one's number of event rows."""
    subjects = drawn.subjects[key].to_numpy()
    return subjects, drawn.events.groupby(key).size().reindex(subjects, fill_value=0).to_numpy()


LENGTH_TOLERANCE = 0.05  # calibrated sampling holds histories to drawn lengths past this rows gap


def rows_gap(drawn: Histories, key: str, counts, cap: int) -> float:
    """Total-variation distance between the rows bins of the `drawn` subjects and those of
    `counts` (`subject_counts`, folded at `cap`; negative noisy counts as 0): how far a
    model's own history lengths are from the counts (0 for empty counts: nothing to hold them
    to). Post-processing: no epsilon."""
    target = rows_counts(counts, cap)
    if target.sum() <= 0:
        return 0.0
    rows = subject_rows(drawn, key)[1]
    share = np.bincount(np.minimum(length_bins(rows), len(target) - 1), minlength=len(target)) / max(1, len(rows))
    return float(0.5 * np.abs(share - target / target.sum()).sum())


def drawn_lengths(counts, cap: int, min_rows: int, n: int, rng) -> np.ndarray | None:
    """The rows of each of `n` subjects to draw: a rows bin drawn from the rows per subject of
    `counts` (`subject_counts`, folded at `cap`; negative noisy counts as 0), then a count
    within the bin, uniformly (within [min_rows, cap]), for calibrated sampling to hold each
    history to (`sample_histories`' `lengths`); None where the counts are empty. Post-processing of the
    counts: no epsilon."""
    target = rows_counts(counts, cap)
    if target.sum() <= 0:
        return None
    bins = rng.choice(len(target), size=n, p=target / target.sum())
    least = np.where(bins == 0, min_rows, LENGTH_EDGES[bins])
    most = np.maximum(least, np.minimum(LENGTH_EDGES[bins + 1] - 1, cap))
    return np.minimum(rng.integers(least, most + 1), cap)


HISTORY_PLAN_ROWS = 4  # under DP a subject counts as this many rows in the plan (public)


class TrainingHistories:
    """The training split's subjects, for `Synthesizer.fit`: `frame` (each event row with its
    subject's columns beside it, and a row of missing events for a subject without any) is what
    the schema describes and the DP metadata is estimated from, one random row per subject of
    `units`; after `type` the typed `events` and `subjects` tables, each subject's event rows
    in order (`event_units`), and after `bound_length` the history cap."""

    def __init__(self, frame: pd.DataFrame, units: list[list[int]], event_columns: list[str],
                 subject_columns: list[str], order_by: str | None, lengths: np.ndarray):
        self.frame, self.units = frame, units
        self.event_columns, self.subject_columns, self.order_by = event_columns, subject_columns, order_by
        self.lengths = lengths  # event rows per subject (private; diagnostics and the DP cap's input)
        self.events = self.subjects = None
        self.event_units: list[list[int]] = []
        self.cap: int | None = None
        self.counts: np.ndarray | None = None  # `subject_counts` (noisy under DP)
        self.sums: dict | None = None  # `subject_sums` (without DP only)
        self.cut: dict[str, int] = {}

    @classmethod
    def of(cls, events: pd.DataFrame, subjects: pd.DataFrame | None, key: str, order_by: str | None):
        """From the training rows of the event table and of the subject table (or None)."""
        events = events.reset_index(drop=True)
        if order_by is not None and order_by not in events.columns:
            raise DplmError(f"data.order_by '{order_by}' is not a column of the event table; choose one of "
                            f"{[c for c in events.columns if c != key]}")
        event_columns = [c for c in events.columns if c != key]
        subject_columns = [c for c in subjects.columns if c != key] if subjects is not None else []
        keys = np.unique(np.concatenate([events[key].to_numpy(), subjects[key].to_numpy()])) \
            if subjects is not None else np.unique(events[key].to_numpy())
        frame = events[event_columns]
        if subjects is not None:
            joined = events[[key]].merge(subjects, on=key, how="left")
            frame = pd.concat([frame, joined[subject_columns]], axis=1)
            lonely = subjects[~subjects[key].isin(set(events[key]))]
            frame = pd.concat([frame, lonely[subject_columns].reset_index(drop=True)], ignore_index=True)
            owners = np.concatenate([events[key].to_numpy(), lonely[key].to_numpy()])
        else:
            owners = events[key].to_numpy()
        position = {k: i for i, k in enumerate(keys.tolist())}
        codes = np.array([position[k] for k in owners.tolist()])
        units = pd.Series(np.arange(len(codes))).groupby(codes).agg(list).reindex(range(len(keys))).tolist()
        lengths = np.bincount(np.array([position[k] for k in events[key].tolist()]), minlength=len(keys))
        return cls(frame, units, event_columns, subject_columns, order_by, lengths)

    # ---- schema and lengths ------------------------------------------------------------------

    def infer_schema(self, given: Schema | None, text_lengths) -> Schema:
        """Without DP: event columns from the event rows, subject columns from the subject rows."""
        from dplm.schema import infer_schema

        real = self.frame.iloc[: int(self.lengths.sum())]
        subject_rows = self.frame.iloc[[u[0] for u in self.units]] if self.subject_columns else None

        def part(df, names):
            sub = Schema([given[n] for n in names if n in given.names]) if given else None
            return infer_schema(df[names], sub if sub and sub.columns else None, text_lengths=text_lengths)

        events = part(real, self.event_columns)
        subjects = part(subject_rows, self.subject_columns) if subject_rows is not None else Schema([])
        schema = Schema([*subjects.columns, *events.columns])
        if given and given.output_order:
            schema.set_output_order([n for n in given.output_order if n in schema.names] +
                                    [n for n in schema.names if n not in given.output_order])
        return schema

    def bound_length(self, max_history: int | None, metadata: dict, schema: Schema | None = None,
                     epsilon: float | None = None, rng=None) -> dict:
        """Set the history cap and what calibrated sampling follows (`calibrated_subjects`): the
        cap is `max_history` when given (public), else without DP the longest history; without
        DP (`schema` given) `subject_counts` of the rows and, with an ordering column, the spans,
        and `subject_sums` of the event number columns (but the ordering one); under DP cap and
        counts (rows alone) come from `dp_history_length` (`epsilon` added to the schema's
        metadata epsilon), with a given cap under DP there are no counts, and no sums. Returns
        the metadata record, which holds them (a resumed run restores them: `restore_length`)."""
        self.sums = None
        if epsilon is None:
            self.cap = int(max_history or max(1, self.lengths.max()))
            order = schema[self.order_by] if self.order_by else None
            self.counts = subject_counts(self.lengths, *self.spans(order)) if order is not None \
                else subject_counts(self.lengths)
            numbers = [schema[n] for n in self.event_columns
                       if n != self.order_by and schema[n].kind in ("integer", "float")]
            if numbers:
                owners, values = self._typed_events(numbers)
                self.sums = subject_sums(column_sums(values, owners, range(len(self.units))))
        elif max_history is not None:
            self.cap, self.counts = int(max_history), None
        else:
            self.cap, noisy = dp_history_length(self.lengths, epsilon, rng)
            self.counts = noisy[:, None]
            metadata = {**metadata, "epsilon": metadata["epsilon"] + epsilon,
                        "estimated": {**metadata["estimated"], "(rows per subject)": ["max_history"]}}
        return {**metadata, "max_history": self.cap, "subject_sums": self.sums,
                "subject_counts": None if self.counts is None else self.counts.tolist()}

    def _typed_events(self, columns: list[Column]) -> tuple[np.ndarray, pd.DataFrame]:
        """Each training event row's subject (its index in `units`), and its `columns` typed."""
        from dplm.schema import coerce_table

        count = int(self.lengths.sum())
        owners = np.empty(count, dtype=np.int64)
        for s, unit in enumerate(self.units):
            owners[[i for i in unit if i < count]] = s
        return owners, coerce_table(self.frame.iloc[:count][[c.name for c in columns]], Schema(columns))

    def spans(self, order: Column) -> tuple[np.ndarray, int]:
        """Each training subject's span in `order`'s scaled integers, and the column's width."""
        from dplm.serialize import to_scaled_many

        check_order_by(self.frame.iloc[:int(self.lengths.sum())], order.name, order.kind)
        owners, values = self._typed_events([order])
        lo, hi = scaled_bounds(order)
        return subject_spans(owners, to_scaled_many(order, values[order.name]), range(len(self.units))), hi - lo

    def plan_rows(self, dp: bool) -> float:
        """Rows a subject counts as in the training plan: under DP the public `HISTORY_PLAN_ROWS`,
        without DP the training subjects' mean."""
        return HISTORY_PLAN_ROWS if dp else max(1.0, float(self.lengths.mean()))

    def restore_length(self, metadata: dict) -> None:
        """The cap, counts and sums a checkpoint's run was trained with (never drawn again)."""
        self.cap = metadata["max_history"]
        self.counts = None if metadata["subject_counts"] is None else np.array(metadata["subject_counts"])
        self.sums = metadata["subject_sums"]

    # ---- typed tables ----------------------------------------------------------------------------

    def type(self, schema: Schema) -> None:
        """Typed event and subject tables, and each subject's event rows in order."""
        from dplm.schema import coerce_table

        count = int(self.lengths.sum())  # the event rows; after them one empty row per subject without events
        if self.order_by:
            check_order_by(self.frame.iloc[:count], self.order_by, schema[self.order_by].kind)
        self.events = coerce_table(self.frame.iloc[:count][self.event_columns], self.event_schema(schema))
        self.subjects = coerce_table(self.frame.iloc[[u[0] for u in self.units]][self.subject_columns],
                                     self.subject_schema(schema)).reset_index(drop=True) if self.subject_columns \
            else pd.DataFrame(index=range(len(self.units)))
        by_value = self.events[self.order_by] if self.order_by else None
        self.event_units = []
        for unit in self.units:
            rows = [i for i in unit if i < count]
            if by_value is not None:
                rows = sorted(rows, key=lambda i: (by_value.iloc[i], i))
            self.event_units.append(rows)

    def event_schema(self, schema: Schema) -> Schema:
        return Schema([schema[n] for n in schema.names if n in self.event_columns])

    def subject_schema(self, schema: Schema) -> Schema:
        return Schema([schema[n] for n in schema.names if n in self.subject_columns])

    def add_canaries(self, canaries: pd.DataFrame, repeats: int) -> None:
        """Each canary record as one more subject: its subject values, and `repeats` rows of its event values."""
        start = len(self.events)
        rows = pd.concat([canaries[self.event_columns]] * repeats, ignore_index=True)
        self.events = pd.concat([self.events, rows.astype(self.events.dtypes.to_dict())], ignore_index=True)
        self.event_units += [[start + i + r * len(canaries) for r in range(repeats)] for i in range(len(canaries))]
        self.subjects = pd.concat([self.subjects, canaries[self.subject_columns]], ignore_index=True)
        self.units = self.units + [[-1]] * len(canaries)
        self.lengths = np.concatenate([self.lengths, np.full(len(canaries), repeats)])

    def codec(self, schema: Schema, tokenizer, value_tokens: bool, metadata: dict) -> HistoryCodec:
        min_rows = 0 if self.subject_columns else 1  # without a subject table every subject has a row
        events = self.event_schema(schema)
        return HistoryCodec(self.subject_schema(schema), events, tokenizer, value_tokens, self.order_by, self.cap,
                            min_rows, schema.output_order, same_columns(events, value_tokens))

    def encode(self, codec: HistoryCodec) -> list[list[int]]:
        """Each subject's token sequence (its first `cap` rows); `cut` counts the histories cut."""
        sequences, cut = [], 0
        subject_rows = self.subjects.to_dict("records")
        for i, rows in enumerate(self.event_units):
            cut += len(rows) > self.cap
            sequences.append(codec.encode(subject_rows[i], self.events.iloc[rows[: self.cap]]))
        self.cut = {"histories cut at data.max_history": cut} if cut else {}
        return sequences


# ---- sampling ------------------------------------------------------------------------------------

def sample_histories(model, codec: HistoryCodec, num: int, key: str, batch_size: int = 64, temperature: float = 1.0,
                     seed: int = 0, device=None, progress: bool = True, given: pd.DataFrame | None = None,
                     keep=None, output_order: list[str] | None = None, lengths: np.ndarray | None = None):
    """`num` synthetic subjects (or one per row of `given`, a table of subject columns whose
    values they keep), each a whole history drawn under the codec's grammar, as `Histories`
    with fresh keys 1..num, plus the `SampleStats`. `keep(events) -> bool mask` (the table's
    rules): a subject with a row it refuses is drawn again, as one that does not parse is.
    `lengths` (`drawn_lengths`: each subject's rows) are given as the length field's values:
    each history then has those rows."""
    import time

    import torch
    from tqdm.auto import tqdm

    from dplm.sample import GivenValues, SampleStats, generate_sequences, output_token_ids, row_grammar, to_frame
    from dplm.schema import check_given

    device = device or next(model.parameters()).device
    grammar = row_grammar(codec, output_token_ids(model), device)
    generator = torch.Generator(device=device).manual_seed(seed)
    model.eval()
    values = None
    if given is not None:
        given = check_given(given, codec.subject_schema)
        num = len(given)
    if lengths is not None:
        given = (given if given is not None else pd.DataFrame(index=range(num))).assign(**{LENGTH: lengths})
    if given is not None:
        values = GivenValues(codec, grammar, given, 1)
    drawn: list = [None] * num
    pending, generated, start = list(range(num)), 0, time.perf_counter()
    bar = tqdm(total=num, disable=not progress, unit="subject", desc="sampling", dynamic_ncols=True)
    while pending:
        if generated >= 10 * num + 10 * batch_size:
            raise RuntimeError(f"only {num - len(pending)} of {num} subjects were valid after generating {generated}")
        batch, pending = pending[:batch_size], pending[batch_size:]
        part = values.select(torch.tensor(batch, device=device)) if values is not None else None
        for i, ids in zip(batch, generate_sequences(model, grammar, len(batch), temperature, generator, device, part)):
            generated += 1
            try:
                subject, rows = codec.decode(ids)
            except ParseError:
                pending.append(i)
                continue
            if given is not None:
                subject.update(given.iloc[i].drop(LENGTH, errors="ignore").to_dict())
            if keep is not None and rows and not keep(to_frame(rows, codec.event_schema, order=False)).all():
                pending.append(i)
                continue
            drawn[i] = (subject, rows)
            bar.update(1)
    bar.close()
    stats = SampleStats(rows_generated=generated, rows_returned=num, seconds=time.perf_counter() - start)
    keys = np.arange(1, num + 1)
    subjects = to_frame([d[0] for d in drawn], codec.subject_schema, order=False)
    subjects.insert(0, key, keys)
    events = to_frame([row for d in drawn for row in d[1]], codec.event_schema, order=False)
    events.insert(0, key, np.repeat(keys, [len(d[1]) for d in drawn]))
    if output_order:
        events = events[[key] + [c for c in output_order if c in events.columns]]
        subjects = subjects[[key] + [c for c in output_order if c in subjects.columns]]
    return Histories(subjects, events), stats
