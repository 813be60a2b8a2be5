"""The training units: what DP-SGD samples and clips, and what every stage of a run reads.

A run trains on one kind of unit, chosen once from the recipe (`inputs.training_units`):

* `RowUnits`: the rows of a table, each its own unit, or grouped by `data.subject` with
  `data.mode: rows` (each row a sequence of its own; a subject's rows are clipped together);
* `histories.TrainingHistories`: each subject's whole history as one sequence.

Both answer the same questions (`TrainingUnits`), so the stages (`dplm.stages`) hold no branch
on the kind: the rows the schema describes and each unit's rows among them (the DP metadata
estimates take one random row per unit), the schema read off the data without DP, the history
bounds, the typed rows and the canaries added to them, what the statistics count, the codec
and the token sequences, the groups DP-SGD clips together, and what the privacy record says
of the unit.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import pandas as pd

from dplm.config import RunConfig
from dplm.errors import DplmError
from dplm.rules import Rule, history_rules
from dplm.schema import MetadataSpend, Schema, coerce_table, infer_schema
from dplm.serialize import RowCodec, row_codec


class TrainingUnits(Protocol):
    """What the stages of a run ask of its training units (`RowUnits`, `histories.TrainingHistories`)."""

    frame: pd.DataFrame  # the rows the schema describes (the columns the model writes), one per row
    groups: list[list[int]]  # each unit's positions in `frame`

    def count(self) -> int:
        """Training units, canaries included once added."""

    def canary_units(self, canaries: int, repeats: int) -> int:
        """The units `canaries` training canaries of `repeats` rows each add."""

    def plan_rows(self, dp: bool) -> float | None:
        """Rows a unit counts as in the training plan (None: one row)."""

    def check_rules(self, rules: list[Rule]) -> None:
        """One-line errors for declared rules these units cannot keep (`dplm.rules`)."""

    def complete_schema(self, user_schema: Schema | None, text_lengths) -> Schema:
        """Without DP: the user's schema completed from the data."""

    def planned_spend(self, config: RunConfig, spend: MetadataSpend) -> MetadataSpend:
        """`spend` with what `bound` will add to it (known before any draw)."""

    def bound(self, config: RunConfig, spend: MetadataSpend, schema: Schema, rng=None):
        """(spend, bounds): the history cap and the counts calibrated sampling follows (None for rows)."""

    def type(self, schema: Schema) -> None:
        """Type the rows by the completed schema."""

    def add_canaries(self, canaries: pd.DataFrame, repeats: int) -> None:
        """Add the audit's canary records, each one more unit."""

    def statistics_rows(self) -> tuple[pd.DataFrame, list[list[int]]]:
        """The typed rows the table's statistics count, and each unit's rows among them."""

    def statistics_schema(self, schema: Schema) -> Schema:
        """The columns of `schema` the table's statistics cover."""

    def codec(self, schema: Schema, tokenizer, value_tokens: bool, bounds):
        """The codec that writes a unit as tokens."""

    def encode(self, codec, orders: list[list[int]] | None = None) -> list[list[int]]:
        """Each sequence's token ids."""

    def clip_groups(self) -> list[list[int]] | None:
        """The sequences DP-SGD clips together, one group per unit (None: each sequence alone)."""

    def loss_tokens(self, schema: Schema) -> float | None:
        """The constant a sequence's token losses are summed over (None: their mean)."""

    def values_cut(self, codec) -> dict[str, int]:
        """Values (texts, histories) cut at their caps while encoding: a private diagnostic."""

    def privacy_unit(self, config: RunConfig, codec) -> dict:
        """What the privacy record says of the unit."""


class RowUnits:
    """The rows of a table as training units: each row its own unit or, with `subjects` (each
    subject's row positions), each subject's rows one unit (`data.mode: rows`)."""

    def __init__(self, frame: pd.DataFrame, subjects: list[list[int]] | None = None, subject: str | None = None):
        self.frame = frame
        self.subjects = subjects
        self.subject = subject
        self.rows: pd.DataFrame | None = None  # typed, canaries included (`type`, `add_canaries`)
        self.schema: Schema | None = None  # what typed them

    @classmethod
    def of(cls, rows: pd.DataFrame, subject: str | None) -> RowUnits:
        """From the training rows; with `subject`, the column that says whose rows are whose
        (it is not modelled or generated)."""
        if not subject:
            return cls(rows)
        codes, _ = pd.factorize(rows[subject])
        groups = pd.Series(np.arange(len(codes))).groupby(codes).agg(list).tolist()
        return cls(rows.drop(columns=[subject]), groups, subject)

    @property
    def groups(self) -> list[list[int]]:
        if self.subjects is not None:
            return self.subjects
        return [[i] for i in range(len(self.rows) if self.rows is not None else len(self.frame))]

    def count(self) -> int:
        return len(self.groups)

    def canary_units(self, canaries: int, repeats: int) -> int:
        return canaries * (1 if self.subjects is not None else repeats)

    def plan_rows(self, dp: bool) -> float | None:
        return None

    def complete_schema(self, user_schema: Schema | None, text_lengths) -> Schema:
        return infer_schema(self.frame, user_schema, text_lengths=text_lengths)

    def planned_spend(self, config: RunConfig, spend: MetadataSpend) -> MetadataSpend:
        return spend

    def check_rules(self, rules: list[Rule]) -> None:
        """Rules within a history need histories."""
        for rule in history_rules(rules):
            raise DplmError(f"schema rule '{rule.describe()}' holds within a subject's history: train histories "
                            "(data.subject, data.mode: histories) or drop the rule")

    def bound(self, config: RunConfig, spend: MetadataSpend, schema: Schema, rng=None):
        return spend, None

    def type(self, schema: Schema) -> None:
        self.rows, self.schema = coerce_table(self.frame, schema), schema

    def add_canaries(self, canaries: pd.DataFrame, repeats: int) -> None:
        first = len(self.rows)
        copies = coerce_table(pd.concat([canaries] * repeats, ignore_index=True), self.schema)
        self.rows = pd.concat([self.rows, copies], ignore_index=True)
        if self.subjects is not None:  # each canary is one more subject
            self.subjects = self.subjects + [[first + i + r * len(canaries) for r in range(repeats)]
                                             for i in range(len(canaries))]

    def statistics_rows(self) -> tuple[pd.DataFrame, list[list[int]]]:
        return self.rows, self.groups

    def statistics_schema(self, schema: Schema) -> Schema:
        return schema

    def codec(self, schema: Schema, tokenizer, value_tokens: bool, bounds=None) -> RowCodec:
        return row_codec(schema, tokenizer, value_tokens)

    def encode(self, codec: RowCodec, orders: list[list[int]] | None = None) -> list[list[int]]:
        return codec.encode_table(self.rows, orders)

    def clip_groups(self) -> list[list[int]] | None:
        return self.subjects

    def loss_tokens(self, schema: Schema) -> float | None:
        return None

    def values_cut(self, codec: RowCodec) -> dict[str, int]:
        return codec.values_cut()

    def privacy_unit(self, config: RunConfig, codec) -> dict:
        if self.subject is None:
            return {"privacy_unit": "row"}
        return {"privacy_unit": f"subject (column '{self.subject}')",
                "max_records_per_subject": config.privacy.max_records_per_subject}
