"""A subject's history as one token sequence: the codec and its grammar.

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
before takes many; an integer column may also write its change from the row before, when small,
as a token of its own (+1 for a year of experience, where writing the new value asks the model
to add across rows), or a fresh value (a count drawn anew each row). A column that a declared
rule within a history determines (`rules.py`: constant, step) is written in the first row only
and derived in the later ones (no tokens, never broken). The `order_by` column is written as its
first value and then, in later rows, the gap since the row before (a number >= 0, in the column's
scaled integers: days for dates), so histories come out in order; decoding adds the gaps up,
and a history ends before its first row past the column's max, as real histories end where
the data's window does (clipping piled rows up at the max; drawing such histories again kept
only the short ones). A history holds at most `max_rows` rows (longer ones are cut at
training, and counted) and at least `min_rows`.

The grammar is the codec's automaton (`start_state`, `allowed`, `next_state`, ...), which
`sample.CompiledGrammar` compiles as it does a row's; the rows left are part of the state.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
from tokenizers import AddedToken

from dplm.errors import DplmError
from dplm.rules import Rule, history_rules
from dplm.schema import Column, Schema
from dplm.serialize import ParseError, RowCodec, from_scaled, scaled_bounds, to_scaled

ROW_TOKENS = 256  # row tokens: <|row:k|> starts a row with k rows left (itself included), k capped here
LENGTH = "(rows)"  # the length field's column: how many rows the history has, written before them


SAME = object()  # a parsed "same" token, before decoding gives it the row before's value
CHANGES = (-3, -2, -1, 1, 2, 3)  # the changes from the row before an integer column writes as one token


@dataclass(frozen=True)
class Change:
    """A parsed change token: the row before's value plus `by`."""

    by: int


def derived_in_later_rows(rules: list[Rule], event_columns: list[str], order_by: str | None) -> dict[str, Rule]:
    """The event columns that the rules within a history determine in later rows (constant: the
    first row's value; step: the first row's plus size x the change of its `per` column), each
    with its rule; one-line errors for rules a history cannot keep this way."""
    out: dict[str, Rule] = {}
    for rule in history_rules(rules):
        targets = [c for c in rule.columns if c in event_columns] if rule.kind == "constant" else [rule.columns[0]]
        if rule.kind == "step" and not set(rule.columns) <= set(event_columns):
            raise DplmError(f"schema rule '{rule.describe()}': both columns must be columns of the rows (not the "
                            "subject's)")
        for name in targets:
            if name == order_by:
                raise DplmError(f"schema rule '{rule.describe()}': '{name}' orders the rows (data.order_by); it "
                                "cannot also be derived")
            if name in out:
                raise DplmError(f"schema rule '{rule.describe()}': '{name}' is already determined by "
                                f"'{out[name].describe()}'; keep one rule per column")
            out[name] = rule
    for name, rule in out.items():
        if rule.kind == "step" and rule.columns[1] in out:
            raise DplmError(f"schema rule '{rule.describe()}': '{rule.columns[1]}' is itself derived; step from a "
                            "column the rows write")
    if out and set(out) == set(event_columns) - ({order_by} if order_by else set()) and not order_by:
        raise DplmError(f"schema rules: every column of the rows is derived in later rows ({', '.join(out)}); make "
                        "them the subject's (data.subject_columns)")
    return out


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
                 same_columns: list[str] | None = None, rules: list[Rule] | None = None,
                 change_columns: list[str] | None = None):
        """`same_columns`: the event columns whose later rows may write "same" (`same_columns`;
        a run saved before them has none); `change_columns`: the integer ones that may also
        write a small change (`change_columns`; none in a run saved before them). `rules`: the
        schema's; those within a history derive their columns in later rows
        (`derived_in_later_rows`)."""
        self.subject_schema = subject_schema or Schema([])
        self.event_schema = event_schema
        self.order_by = order_by
        self.max_rows, self.min_rows = max_rows, min_rows
        self.derived = derived_in_later_rows(rules or [], event_schema.names, order_by)
        gap = [gap_column(event_schema[order_by])] if order_by else []
        length = Column(name=LENGTH, kind="integer", min=min_rows, max=max_rows)
        fields_schema = Schema([*self.subject_schema.columns, *event_schema.columns, *gap, length])
        row_tokens = [f"<|row:{k}|>" for k in range(1, min(max_rows, ROW_TOKENS) + 1)]
        change_columns = [n for n in change_columns or [] if n not in self.derived]
        same_columns = [n for n in same_columns or [] if n not in self.derived] + change_columns
        same_tokens = [f"<|{n}:same|>" for n in same_columns]
        change_tokens = [f"<|{n}:{d:+d}|>" for n in change_columns for d in CHANGES]
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False)
                              for t in row_tokens + same_tokens + change_tokens], special_tokens=True)
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
        self.change_ids = {n: dict(zip(CHANGES, tokenizer.convert_tokens_to_ids([f"<|{n}:{d:+d}|>" for d in CHANGES])))
                           for n in change_columns}  # column -> {change: its token}
        self.later_rows = [SameValue(by_name[n], self.same_ids[n], self.change_ids.get(n)) if n in self.same_ids
                           else by_name[f"{n}+" if n == order_by else n]
                           for n in event_schema.names if n not in self.derived]
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
                "same_columns": [n for n in self.same_ids if n not in self.change_ids],
                "change_columns": list(self.change_ids)}

    @classmethod
    def from_layout(cls, layout: dict, schema: Schema, tokenizer, value_tokens: bool) -> HistoryCodec:
        return cls(*layout_schemas(layout, schema), tokenizer, value_tokens, layout["order_by"], layout["max_rows"],
                   layout["min_rows"], schema.output_order, layout.get("same_columns"), schema.rules,
                   layout.get("change_columns"))

    # ---- the fields' tokens -------------------------------------------------------------

    def value_token_texts(self) -> dict[int, list[int]]:
        """Where each added token's embedding starts: the fields' value tokens, and each row
        token at a newline's and its count's (left to the resize they would start random, so a
        loaded or resumed run would read them differently from the model that trained on them)."""
        rows = {token: self.rows_codec.tokenize(f"\n{k}") for k, token in enumerate(self.row_ids, start=1)}
        same = {token: self.rows_codec.tokenize(f"same {name}") for name, token in self.same_ids.items()}
        changes = {token: self.rows_codec.tokenize(f"{name} {d:+d}") for name, ids in self.change_ids.items()
                   for d, token in ids.items()}
        return {**self.rows_codec.value_token_texts(), **rows, **same, **changes}

    def output_token_ids(self) -> list[int]:
        changes = {t for ids in self.change_ids.values() for t in ids.values()}
        return sorted(set(self.rows_codec.output_token_ids()) | self._row_set | set(self.same_ids.values()) | changes)

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
        for r, row in enumerate(rows[self.event_schema.names].to_dict("records")):
            ids.append(self.row_token(len(rows) - r))
            fields = self.row_fields(r == 0)
            for j, field in enumerate(fields):
                name = field.col.name
                if self.order_by and name == f"{self.order_by}+":
                    col = self.event_schema[self.order_by]
                    value, previous = to_scaled(col, row[self.order_by]) - previous, to_scaled(col, row[self.order_by])
                else:
                    value = row[name]
                    if name == self.order_by:
                        previous = to_scaled(field.col, value)
                ids += field.encode(value, before[name]) if isinstance(field, SameValue) else field.encode(value)
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
        row = 1 + max(sum(f.max_value_tokens() + 1 for f in fields) for fields in (self.first_row, self.later_rows))
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
            for name in self.change_ids:
                if isinstance(row[name], Change):
                    row[name] = self._changed(name, before[name], row[name].by)
        return subject, self._derived(self._ordered(rows))

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


    def _changed(self, name: str, before, by: int):
        """The row before's value plus `by`, kept to the column's bounds (ParseError after a missing value)."""
        if pd.isna(before):
            raise ParseError(f"history changes {name} after a missing value")
        col = self.event_schema[name]
        value = int(before) + by
        if col.min is not None:
            value = max(value, int(col.min))
        return min(value, int(col.max)) if col.max is not None else value

    def _derived(self, rows: list[dict]) -> list[dict]:
        """The later rows' derived columns (`derived`) from the first row's, the history ending
        before a row where one would leave its column's bounds (ParseError if fewer than
        min_rows rows are left), as it does past the ordering column's max."""
        if not self.derived or not rows:
            return rows
        first = rows[0]
        for r, row in enumerate(rows[1:], start=1):
            for name, rule in self.derived.items():
                if rule.kind == "constant":
                    row[name] = first[name]
                    continue
                col, per = self.event_schema[name], rule.columns[1]
                if pd.isna(first[name]) or pd.isna(first[per]) or pd.isna(row[per]):
                    row[name] = None
                    continue
                value = round(first[name] + rule.size * (row[per] - first[per]), col.precision)
                if (col.min is not None and value < float(col.min)) or (col.max is not None and value > float(col.max)):
                    if r < self.min_rows:
                        raise ParseError(f"history's {name} leaves its bounds before min_rows rows")
                    return rows[:r]
                row[name] = int(value) if col.kind == "integer" else value
        return rows


def layout_schemas(layout: dict, schema: Schema) -> tuple[Schema, Schema]:
    """The subject columns' and the event columns' schemas of a saved layout (`HistoryCodec.layout`)."""
    return (Schema([schema[n] for n in layout["subject_columns"]]),
            Schema([schema[n] for n in layout["event_columns"]]))


class SameValue:
    """A later row's field that may write its column's "same" token (`same_id`: the row
    before's value) or, for an integer column, a change token (`change_ids`: {change: token},
    the row before's value plus the change), or a fresh value as the column's own
    `serialize.FieldGrammar` (`field`) writes it (a history's automaton needs no memory of the
    value). States: 0 before the value, ("mark",) after a same or change token, ("in", s) inside
    a fresh value at the field's state s."""

    def __init__(self, field, same_id: int, change_ids: dict[int, int] | None = None):
        self.field, self.same_id, self.col = field, same_id, field.col
        self.change_ids = change_ids or {}
        self.marks = {same_id: SAME, **{t: Change(d) for d, t in self.change_ids.items()}}
        self.self_delimiting = field.self_delimiting

    def encode(self, value, before) -> list[int]:
        """The same token where `value` is the row before's (both missing included), a change
        token where it is the row before's plus one of `CHANGES`, else the value's own tokens."""
        kept = pd.isna(before) if pd.isna(value) else not pd.isna(before) and value == before
        if kept:
            return [self.same_id]
        if self.change_ids and not pd.isna(value) and not pd.isna(before) and int(value) - int(before) in self.change_ids:
            return [self.change_ids[int(value) - int(before)]]
        return self.field.encode(value)

    def start(self):
        return 0

    def next_tokens(self, state) -> tuple[list[int], bool]:
        if state == 0:
            ids, can_end = self.field.next_tokens(self.field.start())
            return [*ids, *self.marks], can_end
        if state[0] == "mark":
            return [], True
        return self.field.next_tokens(state[1])

    def advance(self, state, token: int):
        if state == 0 and token in self.marks:
            return ("mark",)
        return ("in", self.field.advance(self.field.start() if state == 0 else state[1], token))

    def complete(self, state) -> bool:
        return state != 0 and (state[0] == "mark" or self.field.complete(state[1]))

    def mask_key(self, state):
        return state if state == 0 or state[0] == "mark" else ("in", self.field.mask_key(state[1]))

    def state_key(self, state):
        return state if state == 0 or state[0] == "mark" else ("in", self.field.state_key(state[1]))

    def max_value_tokens(self) -> int:
        return self.field.max_value_tokens()

    def parse(self, ids: list[int]):
        if len(ids) == 1 and ids[0] in self.marks:
            return self.marks[ids[0]]
        return self.field.parse(ids)


def change_columns(event_schema: Schema, value_tokens: bool, order_by: str | None) -> list[str]:
    """The integer event columns (but the ordering one) whose later rows may write "same" or a
    small change (`SameValue`), with value tokens: the candidates, from the schema alone
    (`TrainingHistories.changing_columns` keeps those the rows make cheaper)."""
    return [c.name for c in event_schema.columns if c.kind == "integer" and c.name != order_by] if value_tokens else []


def same_columns(event_schema: Schema, value_tokens: bool) -> list[str]:
    """The event columns whose later rows may write "same" (`SameValue`): the categorical ones,
    one token per value (value tokens). From the schema alone: public."""
    return [c.name for c in event_schema.columns if c.kind == "categorical"] if value_tokens else []
