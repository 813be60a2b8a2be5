"""Load and split a run's inputs: the table (and for histories the subject table), the holdout
split, and the training units (`units.RowUnits` or `histories.TrainingHistories`), chosen once
from the recipe. `Synthesizer.fit`, `dplm.plan`, the report and the audit read their rows here.
"""

from __future__ import annotations

import hashlib
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
    """Training and holdout row positions. Each unit's side is a keyed draw of that unit alone
    (`unit_draws`: of its subject key with `data.subject`, over the subject table's subjects when
    there is one, `subject_table` or the file `data.subjects`; else of its row): adding or removing
    one unit moves no other unit from one side to the other. `data.sample_fraction` keeps each
    training unit with that probability (a second draw); `data.max_rows` (without DP) keeps whole
    training units, in a seeded random order, up to that many rows."""
    subject = config.data.subject
    if subject is not None and subject not in table.columns:
        raise DplmError(f"data.subject '{subject}' is not a column of the table; choose one of {list(table.columns)}")
    if subject_table is None and subject and config.data.subjects and config.data.mode == "histories":
        subject_table = load_table(config.data.subjects)
    if subject:
        in_train = table[subject].isin(training_keys(table, config, subject_table)).to_numpy()
        held = ~in_train & table[subject].isin(holdout_keys(table, config, subject_table)).to_numpy()
    else:
        draws = unit_draws(table, config.train.seed, "holdout")
        held = draws < config.data.holdout_fraction
        in_train = ~held & (unit_draws(table, config.train.seed, "sample") < config.data.sample_fraction)
    train_idx, holdout_idx = np.flatnonzero(in_train), np.flatnonzero(held)
    if config.data.max_rows:
        train_idx = seeded_first_rows(table, train_idx, config)
    if len(train_idx) == 0:
        raise DplmError("no training rows left after the holdout split; lower data.holdout_fraction")
    return train_idx, holdout_idx


def seeded_first_rows(table: pd.DataFrame, rows: np.ndarray, config: RunConfig) -> np.ndarray:
    """`rows` cut to `data.max_rows`: whole units (rows, or subjects) in a seeded random order."""
    subject, most = config.data.subject, config.data.max_rows
    units = table[subject].iloc[rows] if subject else table.iloc[rows]
    ordered = rows[np.lexsort((rows, unit_draws(units, config.train.seed, "order")))]  # a subject's rows together
    kept = ordered[:most]
    if subject and len(ordered) > most:
        keys = table[subject].iloc[ordered].to_numpy()
        if keys[most - 1] == keys[most] and keys[0] != keys[most]:  # the cut went through a subject: it leaves
            kept = kept[keys[:most] != keys[most]]
    return np.sort(kept)


def unit_draws(units: pd.DataFrame | pd.Series, seed: int, purpose: str) -> np.ndarray:
    """A draw uniform in [0, 1) for each unit (a subject key, or a row's values) from its
    `unit_hashes`: it depends on nothing else in the table."""
    return (unit_hashes(units, seed, purpose) >> np.uint64(11)).astype(np.float64) / 2.0**53


def unit_hashes(units: pd.DataFrame | pd.Series, seed: int, purpose: str) -> np.ndarray:
    """A 64-bit hash of each unit alone (a subject key (`units` a Series), or a row's values and how
    many identical rows come before it (a DataFrame)), mixed with a key made of `train.seed` and `purpose` (holdout, sample,
    order, ...): independent across purposes. Identical rows are interchangeable, so numbering
    their copies keeps each one's draw its own: removing a copy leaves the others' draws as a
    table without that copy would have them."""
    key = np.frombuffer(hashlib.blake2b(f"dplm:{purpose}:{seed}".encode(), digest_size=8).digest(), dtype=np.uint64)
    hashes = pd.util.hash_pandas_object(units, index=False).to_numpy(dtype=np.uint64)  # keyless for numbers
    copies = pd.Series(hashes).groupby(hashes).cumcount().to_numpy(dtype=np.uint64) \
        if isinstance(units, pd.DataFrame) else np.uint64(0)  # keys: a subject's rows share its draw
    return _splitmix64(_splitmix64(hashes ^ key[0]) ^ copies)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: each output bit depends on every input bit (uint64 arithmetic wraps)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def subject_keys(table: pd.DataFrame, config: RunConfig, subject_table: pd.DataFrame | None) -> np.ndarray:
    """The distinct subjects: of the subject table when there is one, else of the events."""
    keys = subject_table[config.data.subject] if subject_table is not None else table[config.data.subject]
    return pd.unique(keys.dropna())


def holdout_keys(table: pd.DataFrame, config: RunConfig, subject_table: pd.DataFrame | None) -> set:
    """The held-out subjects' keys: those whose draw falls below `data.holdout_fraction`."""
    keys = subject_keys(table, config, subject_table)
    return set(keys[unit_draws(pd.Series(keys), config.train.seed, "holdout") < config.data.holdout_fraction].tolist())


def training_keys(table: pd.DataFrame, config: RunConfig, subject_table: pd.DataFrame | None) -> set:
    """The training subjects' keys: not held out, and kept by `data.sample_fraction`."""
    keys = pd.Series(subject_keys(table, config, subject_table))
    seed = config.train.seed
    kept = (unit_draws(keys, seed, "holdout") >= config.data.holdout_fraction) & \
        (unit_draws(keys, seed, "sample") < config.data.sample_fraction)
    return set(keys[kept].tolist())
