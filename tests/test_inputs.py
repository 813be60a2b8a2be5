import numpy as np
import pandas as pd

from dplm.config import RunConfig, from_dict
from dplm.inputs import load_inputs, split_indexes
from dplm.units import RowUnits


def test_holdout_split_follows_benchmark_protocol():

    train_idx, holdout_idx = split_indexes(48842, 0.2, 0)
    order = np.random.default_rng(0).permutation(48842)
    assert (train_idx == order[:39074]).all() and (holdout_idx == order[39074:]).all()


def test_holdout_split_by_subject(tmp_path):
    subjects = pd.Series([7, 7, 7, 3, 3, 9, 1, 1, 1, 1, 5, 2])
    train_idx, holdout_idx = split_indexes(len(subjects), 0.4, 0, subjects)
    assert sorted([*train_idx, *holdout_idx]) == list(range(12))
    assert not set(subjects[train_idx]) & set(subjects[holdout_idx])
    assert len(set(subjects[holdout_idx])) == 2  # 40 % of the 6 subjects


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
        assert units.public_count(2, 3) == units.count() + canaries
