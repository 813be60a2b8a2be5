"""What a run derived from its data before training, and what it spent on it: the run state.

`stages.analyze` draws it (the completed schema, its DP spend, the history bounds, the audit's
canaries), `stages.plan_training` and `stages.measure_statistics` add the plan and the table's
statistics. Every checkpoint saves it (`to_dict`) and a resumed run reads it back (`from_dict`)
instead of drawing it again: nothing estimated from the data is drawn, or charged, twice.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pandas as pd

from dplm.histories import HistoryBounds
from dplm.marginals import Marginals
from dplm.planner import MachineSpeed, TrainingPlan
from dplm.schema import MetadataSpend, Schema
from dplm.text_model import TextPlan


@dataclass
class RunState:
    """The run's state before training; `schema` in the order the model writes the columns."""

    schema: Schema  # completed (user-given, DP-estimated, or without DP read off the data)
    user_schema: Schema  # as the user gave it (under DP, before any estimate): the plan and the statistics' rounds
    spend: MetadataSpend  # epsilon and delta spent on the schema's metadata and the history cap
    bounds: HistoryBounds | None = None  # histories: the cap and the counts calibrated sampling follows
    canaries: pd.DataFrame | None = None  # the audit's random records
    plan: TrainingPlan | None = None
    speed: MachineSpeed | None = None  # what sized the plan's compute budget (a resumed run keeps it)
    marginals: Marginals | None = None  # the table's statistics (noisy under DP)
    count: int | None = None  # under DP the DP count of the training units (the exact one is never released)
    canary_included: list[bool] | None = None  # which canaries train (secret coins; the others are the audit's)
    text_columns: list[str] = field(default_factory=list)  # written by their own text models (`text_model`)
    text_speed: MachineSpeed | None = None  # what sized the text models' compute budget
    text_plan: TextPlan | None = None

    @property
    def table_schema(self) -> Schema:
        """The columns the table model writes: all but the text columns with their own models."""
        return self.schema.without(self.text_columns)

    @property
    def table_user_schema(self) -> Schema:
        """The user's schema of the table model's columns (what its plan and statistics read)."""
        return self.user_schema.without(self.text_columns)

    def training_canaries(self) -> pd.DataFrame:
        """The canaries that train."""
        return self.canaries[self.canary_included].reset_index(drop=True)

    def to_dict(self) -> dict:
        return {"schema": self.schema.to_dict(), "user_schema": self.user_schema.to_dict(),
                "spend": dataclasses.asdict(self.spend),
                "bounds": None if self.bounds is None else dataclasses.asdict(self.bounds),
                "canaries": None if self.canaries is None else self.canaries.to_dict("list"),
                "plan": None if self.plan is None else self.plan.to_dict(),
                "speed": None if self.speed is None else dataclasses.asdict(self.speed),
                "marginals": None if self.marginals is None else self.marginals.to_dict(),
                "count": self.count, "canary_included": self.canary_included, "text_columns": self.text_columns,
                "text_speed": None if self.text_speed is None else dataclasses.asdict(self.text_speed),
                "text_plan": None if self.text_plan is None else self.text_plan.to_dict()}

    @classmethod
    def from_dict(cls, values: dict) -> RunState:
        """The state a checkpoint saved, in today's layout or in the layout of checkpoints
        written before the state was typed (`given_schema`, and one `metadata` dict holding the
        spend and the history bounds)."""
        if "metadata" in values:  # before RunState
            metadata = values["metadata"]
            spend = MetadataSpend(metadata["epsilon"], metadata["delta"], metadata["estimated"])
            bounds = HistoryBounds(metadata["max_history"], metadata["subject_counts"], metadata["subject_sums"]) \
                if "max_history" in metadata else None
            user_schema = values["given_schema"]
        else:
            spend, user_schema = MetadataSpend(**values["spend"]), values["user_schema"]
            bounds = values["bounds"] and HistoryBounds(**values["bounds"])
        speed = values.get("speed")
        canaries = None if values.get("canaries") is None else pd.DataFrame(values["canaries"])
        return cls(Schema.from_dict(values["schema"]), Schema.from_dict(user_schema), spend, bounds, canaries,
                   values.get("plan") and TrainingPlan.from_dict(values["plan"]),
                   MachineSpeed(**speed) if isinstance(speed, dict) else None,
                   values.get("marginals") and Marginals.from_dict(values["marginals"]), values.get("count"),
                   # before the coins every canary trained
                   values.get("canary_included", None if canaries is None else [True] * len(canaries)),
                   values.get("text_columns", []),
                   values.get("text_speed") and MachineSpeed(**values["text_speed"]),
                   values.get("text_plan") and TextPlan.from_dict(values["text_plan"]))
