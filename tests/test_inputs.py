import numpy as np
import pandas as pd
import pytest

from dplm.config import RunConfig, from_dict
from dplm.inputs import load_inputs, split_rows
from dplm.units import RowUnits


def split(table, **data):
    return split_rows(table, from_dict(RunConfig, {"data": data}))


def test_each_rows_side_depends_on_that_row_alone(census):
    """Adding or removing a row moves no other row across the split (a keyed draw of each row),
    and the holdout is the share asked for; another seed draws another split."""
    train, holdout = split(census)
    assert sorted([*train, *holdout]) == list(range(len(census)))
    assert abs(len(holdout) / len(census) - 0.2) < 0.01
    held = set(census.iloc[holdout].index)
    extra = census.iloc[[0]].assign(age=99, fnlwgt=123456)
    grown = pd.concat([census, extra], ignore_index=True)
    grown_train, grown_holdout = split(grown)
    assert set(grown_holdout) - {len(census)} == held and set(grown_train) - {len(census)} == set(train)
    shrunk = census.drop(index=train[:100])  # 100 training rows gone: every other row keeps its side
    shrunk_train, shrunk_holdout = split(shrunk)
    assert set(shrunk.index[shrunk_holdout]) == held and set(shrunk.index[shrunk_train]) == set(train[100:])
    other = split(census, holdout_fraction=0.2)[1]
    assert set(split_rows(census, from_dict(RunConfig, {"train": {"seed": 1}}))[1]) != set(other)


def test_each_subjects_side_depends_on_that_subject_alone():
    """With a subject column a subject's rows are on one side, drawn from its key alone."""
    subjects = pd.Series(np.repeat(np.arange(500), 3)).sample(frac=1, random_state=0).reset_index(drop=True)
    table = pd.DataFrame({"who": subjects, "x": np.arange(len(subjects))})
    train, holdout = split(table, subject="who", holdout_fraction=0.4)
    assert sorted([*train, *holdout]) == list(range(len(table)))
    assert not set(table["who"][train]) & set(table["who"][holdout])
    assert abs(table["who"][holdout].nunique() / 500 - 0.4) < 0.06
    fewer = table[table["who"] != table["who"][train[0]]]  # one training subject less
    assert set(fewer["who"].iloc[split(fewer, subject="who", holdout_fraction=0.4)[1]]) == set(table["who"][holdout])


def test_a_share_of_the_units_or_a_cut_at_a_row_count():
    """`data.sample_fraction` keeps each training unit by its own draw (valid under DP);
    `data.max_rows` keeps whole units in a seeded order up to that many rows (refused under DP)."""
    from dplm.errors import DplmError

    table = pd.DataFrame({"who": np.repeat(np.arange(400), 2), "x": np.arange(800)})
    train, holdout = split(table, holdout_fraction=0.25)
    half, same_holdout = split(table, holdout_fraction=0.25, sample_fraction=0.5)
    assert set(half) < set(train) and abs(len(half) / len(train) - 0.5) < 0.08 and set(same_holdout) == set(holdout)
    first = split(table, subject="who", max_rows=51)[0]
    assert len(first) == 50 and (table["who"][first].value_counts() == 2).all()  # 25 whole subjects
    rows51, rows60 = split(table, max_rows=51)[0], split(table, max_rows=60)[0]
    assert len(rows51) == 51 and set(rows51) < set(rows60) < set(split(table)[0])  # one seeded order, cut
    with pytest.raises(DplmError, match="data.max_rows cuts the table at a row count"):
        from_dict(RunConfig, {"data": {"max_rows": 10}, "privacy": {"enabled": True}}).validate()


def test_the_recipe_chooses_the_units_once(census):
    """Flat rows, rows grouped by subject, or whole histories: chosen from data.subject and data.mode."""
    from dplm.histories import TrainingHistories

    table = pd.DataFrame({"who": [1, 1, 2, 3, 3, 3], "x": [1, 2, 3, 4, 5, 6]})
    rows = load_inputs(table, from_dict(RunConfig, {"data": {"holdout_fraction": 0.0}})).units
    assert isinstance(rows, RowUnits) and rows.groups == [[i] for i in range(6)] and list(rows.frame) == ["who", "x"]
    grouped = load_inputs(table, from_dict(RunConfig, {"data": {"holdout_fraction": 0.0, "subject": "who",
                                                                 "mode": "rows"}})).units
    assert isinstance(grouped, RowUnits) and grouped.groups == [[0, 1], [2], [3, 4, 5]] and list(grouped.frame) == ["x"]
    histories = load_inputs(table, from_dict(RunConfig, {"data": {"holdout_fraction": 0.0, "subject": "who"}})).units
    assert isinstance(histories, TrainingHistories) and histories.count() == 3
    for units, canaries in ((rows, 2 * 3), (grouped, 2), (histories, 2)):  # 2 canaries, 3 copies each
        assert units.canary_units(2, 3) == canaries
