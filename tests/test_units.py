import pandas as pd

from dplm.schema import Schema
from dplm.units import RowUnits

SCHEMA = Schema.from_dict({"columns": {"x": {"kind": "integer", "min": 0, "max": 9},
                                       "y": {"kind": "categorical", "categories": ["a", "b"]}}})


def test_canaries_are_units_of_their_own():
    """A canary with 3 copies: 3 more rows, each its own unit; under subjects, one more subject of 3 rows."""
    table = pd.DataFrame({"who": [7, 7, 8], "x": [1, 2, 3], "y": ["a", "b", "a"]})
    canary = pd.DataFrame({"x": [9], "y": ["b"]})
    rows = RowUnits.of(table.drop(columns=["who"]), None)
    rows.type(SCHEMA)
    rows.add_canaries(canary, 3)
    assert rows.rows["x"].tolist() == [1, 2, 3, 9, 9, 9] and rows.groups == [[i] for i in range(6)]
    assert rows.clip_groups() is None and rows.count() == 6 and rows.canary_units(1, 3) == 3
    subjects = RowUnits.of(table, "who")
    assert subjects.count() == 2 and subjects.canary_units(1, 3) == 1
    subjects.type(SCHEMA)
    subjects.add_canaries(canary, 3)
    assert subjects.groups == [[0, 1], [2], [3, 4, 5]] == subjects.clip_groups() and subjects.count() == 3
    assert subjects.statistics_rows()[0]["y"].tolist() == ["a", "b", "a", "b", "b", "b"]


def test_what_the_privacy_record_says_of_the_unit():
    from dplm.config import RunConfig

    config = RunConfig()
    assert RowUnits.of(pd.DataFrame({"x": [1]}), None).privacy_unit(config, None) == {"privacy_unit": "row"}
    grouped = RowUnits.of(pd.DataFrame({"who": [1], "x": [1]}), "who").privacy_unit(config, None)
    assert grouped == {"privacy_unit": "subject (column 'who')", "max_records_per_subject": 8}
