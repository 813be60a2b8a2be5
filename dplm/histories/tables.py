"""Synthetic subjects as two tables: the subject table and the event table, keyed alike."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd

from dplm.data import write_table


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
        write_table(self.events, path)
        if len(self.subjects.columns) > 1:
            write_table(self.subjects, subjects_path(path))
            return [path, subjects_path(path)]
        return [path]


def subjects_path(path):
    """Where the subject table goes beside an event table file: `NAME_subjects.EXT`."""
    path = Path(path)
    return path.with_name(f"{path.stem}_subjects{path.suffix}")
