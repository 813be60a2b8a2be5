"""The training split's subjects as training units: each subject's whole history one sequence.

`TrainingHistories` serves the stages of a run (`units.TrainingUnits`): the rows the schema
describes, the schema read off the data without DP, the history bounds (`HistoryBounds`: the
cap, and the counts calibrated sampling follows), the typed tables, the canaries, the codec
and the token sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from dplm.config import RunConfig
from dplm.errors import DplmError
from dplm.histories.codec import CHANGES, HistoryCodec, change_columns, derived_in_later_rows, same_columns
from dplm.histories.counts import column_sums, dp_history_length, subject_counts, subject_spans, subject_sums
from dplm.planner import row_tokens
from dplm.rules import Rule, row_rules
from dplm.schema import Column, MetadataSpend, Schema, coerce_table, infer_schema
from dplm.serialize import scaled_bounds, to_scaled_many


@dataclass
class HistoryBounds:
    """What a run of histories draws from its training subjects before training (`TrainingHistories.bound`)."""

    max_history: int  # rows a history keeps at most
    subject_counts: list | None = None  # subjects per rows (x span) bin, calibrated sampling's target (`counts`)
    subject_sums: dict | None = None  # without DP: each number column's sum per subject, in deciles
    change_columns: list | None = None  # without DP: the integer columns later rows write as changes (`changing_columns`)

    def counts(self) -> dict:
        """The counts calibrated sampling follows (history.json)."""
        return {"subject_counts": self.subject_counts, "subject_sums": self.subject_sums}


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


HISTORY_PLAN_ROWS = 4  # under DP a subject counts as this many rows in the plan (public)


def entropy(values: pd.Series) -> float:
    """The entropy in bits of `values`' distribution (missing values one value)."""
    shares = values.value_counts(normalize=True, dropna=False).to_numpy()
    return float(-(shares * np.log2(shares)).sum())


def written_entropy(values: pd.Series, later: np.ndarray) -> float:
    """The entropy of what an integer column's later rows (`later`: not a subject's first, in
    order) write with `SameValue`: "same", a change in `CHANGES`, or the fresh value."""
    before, now = values.shift().to_numpy()[later], values.to_numpy()[later]
    written = [("same",) if (pd.isna(a) and pd.isna(b)) or a == b else
               ("change", int(b) - int(a)) if not pd.isna(a) and not pd.isna(b) and int(b) - int(a) in CHANGES else
               ("value", b) for a, b in zip(before, now)]
    return entropy(pd.Series(written, dtype=object))


class TrainingHistories:
    """The training split's subjects as training units (`units.TrainingUnits`), each subject's
    whole history one sequence: `frame` (each event row with its subject's columns beside it,
    and a row of missing events for a subject without any) is what the schema describes and the
    DP metadata is estimated from, one random row per subject of `units`; after `type` the typed
    `events` and `subjects` tables and each subject's event rows in order (`event_units`)."""

    def __init__(self, frame: pd.DataFrame, units: list[list[int]], event_columns: list[str],
                 subject_columns: list[str], order_by: str | None, lengths: np.ndarray):
        self.frame, self.units = frame, units
        self.event_columns, self.subject_columns, self.order_by = event_columns, subject_columns, order_by
        self.lengths = lengths  # event rows per subject (private; diagnostics and the DP cap's input)
        self.events = self.subjects = None
        self.event_units: list[list[int]] = []
        self.cut: dict[str, int] = {}  # histories cut at the cap (`encode`)

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

    # ---- the units ----------------------------------------------------------------------------

    @property
    def groups(self) -> list[list[int]]:
        return self.units

    def count(self) -> int:
        return len(self.units)

    def canary_units(self, canaries: int, repeats: int) -> int:
        """Each canary is one more subject."""
        return canaries

    def plan_rows(self, dp: bool) -> float:
        """Rows a subject counts as in the training plan: under DP the public `HISTORY_PLAN_ROWS`,
        without DP the training subjects' mean."""
        return HISTORY_PLAN_ROWS if dp else max(1.0, float(self.lengths.mean()))

    def clip_groups(self) -> None:
        return None  # a history is one sequence

    def loss_tokens(self, schema: Schema) -> float:
        """A history's loss is its token losses' sum over this public constant (`train.row_losses`)."""
        return float(row_tokens(schema) * HISTORY_PLAN_ROWS)

    def values_cut(self, codec: HistoryCodec) -> dict[str, int]:
        return {**codec.values_cut(), **self.cut}

    def privacy_unit(self, config: RunConfig, codec: HistoryCodec) -> dict:
        return {"privacy_unit": f"subject (column '{config.data.subject}')",
                "unit_contribution": "one sequence: the subject's history, cut at max_history rows",
                "max_history": codec.max_rows, "max_history_source": "user" if config.data.max_history else "dp"}

    # ---- schema and lengths ------------------------------------------------------------------

    def check_rules(self, rules: list[Rule]) -> None:
        """Rules within a history that it can keep (`codec.derived_in_later_rows`); rules
        between the columns of one row are not kept in histories yet."""
        for rule in row_rules(rules):
            raise DplmError(f"schema rule '{rule.describe()}': rules between the columns of one row are kept in "
                            "flat rows, not yet in histories (data.subject); drop it or train with data.mode: rows")
        derived_in_later_rows(rules, self.event_columns, self.order_by)

    def complete_schema(self, user_schema: Schema | None, text_lengths) -> Schema:
        """Without DP: event columns from the event rows, subject columns from the subject rows."""
        real = self.frame.iloc[: int(self.lengths.sum())]
        subject_rows = self.frame.iloc[[u[0] for u in self.units]] if self.subject_columns else None

        def part(df, names):
            sub = Schema([user_schema[n] for n in names if n in user_schema.names]) if user_schema else None
            return infer_schema(df[names], sub if sub and sub.columns else None, text_lengths=text_lengths)

        events = part(real, self.event_columns)
        subjects = part(subject_rows, self.subject_columns) if subject_rows is not None else Schema([])
        schema = Schema([*subjects.columns, *events.columns], rules=list(user_schema.rules) if user_schema else [])
        if user_schema and user_schema.output_order:
            schema.set_output_order([n for n in user_schema.output_order if n in schema.names] +
                                    [n for n in schema.names if n not in user_schema.output_order])
        return schema

    def planned_spend(self, config: RunConfig, spend: MetadataSpend) -> MetadataSpend:
        """`spend` with the history cap's: under DP without `data.max_history` the cap is a DP
        estimate at `privacy.metadata_epsilon` (`dp_history_length`)."""
        if not config.privacy.enabled or config.data.max_history is not None:
            return spend
        return spend.plus(config.privacy.metadata_epsilon, {"(rows per subject)": ["max_history"]})

    def bound(self, config: RunConfig, spend: MetadataSpend, schema: Schema, rng=None
              ) -> tuple[MetadataSpend, HistoryBounds]:
        """The history cap and what calibrated sampling follows (`calibrated_subjects`), and the
        spend with the cap's epsilon. The cap is `data.max_history` when given (public), else
        without DP the longest history; without DP the exact `subject_counts` of the rows and,
        with an ordering column, the spans, and `subject_sums` of the event number columns (but
        the ordering one); under DP cap and counts (rows alone) come from `dp_history_length`
        (drawn from `rng`, its epsilon counted: `planned_spend`), and with a given cap under DP
        there are no counts and no sums."""
        max_history = config.data.max_history
        if not config.privacy.enabled:
            order = schema[self.order_by] if self.order_by else None
            counts = subject_counts(self.lengths, *self.spans(order)) if order is not None \
                else subject_counts(self.lengths)
            numbers = [schema[n] for n in self.event_columns
                       if n != self.order_by and schema[n].kind in ("integer", "float")]
            sums = None
            if numbers:
                owners, values = self._typed_events(numbers)
                sums = subject_sums(column_sums(values, owners, range(len(self.units))))
            changing = self.changing_columns(schema) if config.model.value_tokens and config.model.change_tokens else []
            return spend, HistoryBounds(int(max_history or max(1, self.lengths.max())), counts.tolist(), sums, changing)
        # Under DP `model.change_tokens` gives every integer column changes: choosing would read the rows.
        changing = change_columns(self.event_schema(schema), config.model.value_tokens, self.order_by) \
            if config.model.change_tokens else None
        if max_history is not None:
            return spend, HistoryBounds(int(max_history), change_columns=changing)
        cap, noisy = dp_history_length(self.lengths, config.privacy.metadata_epsilon, rng)
        return self.planned_spend(config, spend), HistoryBounds(cap, noisy[:, None].tolist(), change_columns=changing)

    def changing_columns(self, schema: Schema) -> list[str]:
        """Without DP: the integer event columns (`change_columns`) whose later rows, written as
        "same", a change of at most 3 or a fresh value (`SameValue`), hold less entropy over the
        training subjects than their values do: experience that grows by one a year (3.4 bits ->
        0), an age (5.0 -> 0.7), not a count drawn anew each row (cdnow's CDs a purchase, 2.4 ->
        2.9; a season's hits). Read off the exact rows, with `model.change_tokens` (under DP
        every candidate; the schema's `step` and `constant` rules say it for free)."""
        names = change_columns(self.event_schema(schema), True, self.order_by)
        if not names:
            return []
        columns = [schema[n] for n in names] + ([schema[self.order_by]] if self.order_by else [])
        owners, values = self._typed_events(columns)
        values = values.assign(**{"(owner)": owners, "(row)": np.arange(len(owners))})
        values = values.sort_values(["(owner)", *([self.order_by] if self.order_by else []), "(row)"], kind="stable")
        later = values["(owner)"].eq(values["(owner)"].shift()).to_numpy()
        return [n for n in names if written_entropy(values[n], later) < entropy(values[n][later])]

    def _typed_events(self, columns: list[Column]) -> tuple[np.ndarray, pd.DataFrame]:
        """Each training event row's subject (its index in `units`), and its `columns` typed."""
        count = int(self.lengths.sum())
        owners = np.empty(count, dtype=np.int64)
        for s, unit in enumerate(self.units):
            owners[[i for i in unit if i < count]] = s
        return owners, coerce_table(self.frame.iloc[:count][[c.name for c in columns]], Schema(columns))

    def spans(self, order: Column) -> tuple[np.ndarray, int]:
        """Each training subject's span in `order`'s scaled integers, and the column's width."""
        check_order_by(self.frame.iloc[:int(self.lengths.sum())], order.name, order.kind)
        owners, values = self._typed_events([order])
        lo, hi = scaled_bounds(order)
        return subject_spans(owners, to_scaled_many(order, values[order.name]), range(len(self.units))), hi - lo

    # ---- typed tables ----------------------------------------------------------------------------

    def type(self, schema: Schema) -> None:
        """Typed event and subject tables, and each subject's event rows in order."""
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

    def statistics_rows(self) -> tuple[pd.DataFrame, list[list[int]]]:
        """The typed event rows and each subject's among them: what the table's statistics count."""
        return self.events, self.event_units

    def statistics_schema(self, schema: Schema) -> Schema:
        """The columns the table's statistics cover: the event columns."""
        return self.event_schema(schema)

    def codec(self, schema: Schema, tokenizer, value_tokens: bool, bounds: HistoryBounds) -> HistoryCodec:
        min_rows = 0 if self.subject_columns else 1  # without a subject table every subject has a row
        events = self.event_schema(schema)
        return HistoryCodec(self.subject_schema(schema), events, tokenizer, value_tokens, self.order_by,
                            bounds.max_history, min_rows, schema.output_order, same_columns(events, value_tokens),
                            schema.rules, bounds.change_columns)

    def encode(self, codec: HistoryCodec, orders=None) -> list[list[int]]:
        """Each subject's token sequence (its first `codec.max_rows` rows); `cut` counts the
        histories cut there."""
        sequences, cut, cap = [], 0, codec.max_rows
        subject_rows = self.subjects.to_dict("records")
        for i, rows in enumerate(self.event_units):
            cut += len(rows) > cap
            sequences.append(codec.encode(subject_rows[i], self.events.iloc[rows[:cap]]))
        self.cut = {"histories cut at data.max_history": cut} if cut else {}
        return sequences
