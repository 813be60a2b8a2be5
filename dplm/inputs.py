"""Load and split a run's inputs: the table (and for histories the subject table), the holdout
split, and the training units (`units.RowUnits` or `histories.TrainingHistories`), chosen once
from the recipe. `Synthesizer.fit`, `dplm.plan`, the report and the audit read their rows here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dplm.config import RunConfig
from dplm.data import load_table
from dplm.errors import DplmError
from dplm.histories import TrainingHistories, check_subject_columns_constant, check_subject_table
from dplm.units import RowUnits, TrainingUnits


@dataclass
class Inputs:
    """A run's training units and its split of the input table's row positions."""

    units: TrainingUnits
    train_index: np.ndarray
    holdout_index: np.ndarray

    def split_record(self, config: RunConfig, canaries: int) -> dict:
        """split.json: the seed, the subject column, the training and holdout row positions and,
        with subjects, how many trained (the data's, not the canaries added to them)."""
        record = {"seed": config.train.seed, "subject": config.data.subject, "train": self.train_index.tolist(),
                  "holdout": self.holdout_index.tolist()}
        if config.data.subject:
            record["num_training_subjects"] = self.units.count() - canaries
        return record


def load_inputs(data, config: RunConfig, subjects=None) -> Inputs:
    """Load and split: read the table (`data`, default `data.source`, cut to `data.columns`)
    and, for histories, the subject table (`subjects`, `data.subjects` or `data.subject_columns`);
    hold out `data.holdout_fraction` of the rows (of the subjects, with `data.subject`); the
    training rows become the run's training units."""
    table = input_table(data, config)
    subject_table = None
    if is_history(config):
        table, subject_table = history_tables(table, subjects, config)
    train_index, holdout_index = split_rows(table, config, subject_table)
    training = table.iloc[train_index]
    key = config.data.subject
    if is_history(config):
        own = subject_table[subject_table[key].isin(training_keys(table, config, subject_table))] \
            if subject_table is not None else None
        units = TrainingHistories.of(training, own, key, config.data.order_by)
    else:
        units = RowUnits.of(training, key)
    return Inputs(units, train_index, holdout_index)


def is_history(config: RunConfig) -> bool:
    """Does the recipe model subjects' whole histories (`data.subject` in `data.mode: histories`)?"""
    return bool(config.data.subject) and config.data.mode == "histories"


def input_table(data, config: RunConfig) -> pd.DataFrame:
    """The table to model: `data` (default `config.data.source`), cut to `config.data.columns`
    (and the subject column) when the recipe names them."""
    table = load_table(data if data is not None else config.data.source)
    columns = config.data.columns
    if not columns:
        return table
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DplmError(f"data.columns names '{missing[0]}', which is not a column of the table; choose from "
                        f"{list(table.columns)}")
    subject = [config.data.subject] if config.data.subject and config.data.subject not in columns else []
    return table[list(columns) + subject]


def history_tables(events: pd.DataFrame, subjects, config: RunConfig) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The event table and the subject table: `subjects` (or the file `data.subjects`), checked
    against the events, or the events' `data.subject_columns` (constant within a subject), or none."""
    key, own = config.data.subject, config.data.subject_columns
    if own:
        missing = [c for c in own if c not in events.columns]
        if missing:
            raise DplmError(f"data.subject_columns names '{missing[0]}', which is not a column of the table")
        check_subject_columns_constant(events, key, own)
        return events.drop(columns=own), events[[key, *own]].drop_duplicates(key).reset_index(drop=True)
    source = subjects if subjects is not None and not isinstance(subjects, (str, Path)) else config.data.subjects
    if source is None:
        return events, None
    table = load_table(source)
    check_subject_table(events, table, key)
    return events, table


def split_rows(table: pd.DataFrame, config: RunConfig, subject_table: pd.DataFrame | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Training and holdout row indexes (by subject when `data.subject` is set: over the subject
    table's subjects when there is one, `subject_table` or the file `data.subjects`)."""
    subject = config.data.subject
    if subject is not None and subject not in table.columns:
        raise DplmError(f"data.subject '{subject}' is not a column of the table; choose one of {list(table.columns)}")
    if subject_table is None and subject and config.data.subjects and config.data.mode == "histories":
        subject_table = load_table(config.data.subjects)
    if subject_table is not None:
        keys = training_keys(table, config, subject_table)
        in_train = table[subject].isin(keys).to_numpy()
        train_idx, holdout_idx = np.flatnonzero(in_train), np.flatnonzero(~in_train)
    else:
        train_idx, holdout_idx = split_indexes(len(table), config.data.holdout_fraction, config.train.seed,
                                               table[subject] if subject else None)
    if config.data.max_rows:
        train_idx = train_idx[: config.data.max_rows]
    if len(train_idx) == 0:
        raise DplmError("no training rows left after the holdout split; lower data.holdout_fraction")
    return train_idx, holdout_idx


def split_indexes(num_rows: int, holdout_fraction: float, seed: int,
                  subjects: pd.Series | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/holdout split: `permutation[:n_train]` trains, the rest is held out.

    With `subjects` (one id per row) the permutation is over the sorted distinct subjects, so
    all rows of a subject fall on the same side."""
    if subjects is None:
        order = np.random.default_rng(seed).permutation(num_rows)
        n_train = int(round(num_rows * (1 - holdout_fraction)))
        return order[:n_train], order[n_train:]
    in_train = subjects.isin(subject_split(subjects, holdout_fraction, seed)).to_numpy()
    return np.flatnonzero(in_train), np.flatnonzero(~in_train)


def subject_split(keys: pd.Series, holdout_fraction: float, seed: int) -> set:
    """The training subjects: the permutation over the sorted distinct `keys`, its first share."""
    uniques = np.unique(keys.dropna().to_numpy())
    train, _ = split_indexes(len(uniques), holdout_fraction, seed)
    return set(uniques[train].tolist())


def training_keys(table: pd.DataFrame, config: RunConfig, subject_table: pd.DataFrame | None) -> set:
    """The training subjects' keys: of the subject table when there is one, else of the events."""
    keys = subject_table[config.data.subject] if subject_table is not None else table[config.data.subject]
    return subject_split(keys, config.data.holdout_fraction, config.train.seed)
