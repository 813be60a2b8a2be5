import numpy as np
import pandas as pd
import pytest

from dplm.errors import DplmError
from dplm.schema import Column, Schema, coerce_table, format_number, infer_schema, random_records, value_fits


def test_infer_kinds_and_metadata():
    df = pd.DataFrame({
        "i": [1, 5, 3, 2], "f": [1.25, -0.5, 3.0, 2.5], "c": ["a", "b", "a", "a"],
        "d": ["2020-01-02", "2021-05-06", "2020-03-04", "2020-01-02"], "n": [1.0, None, 2.0, 3.0],
    })
    schema = infer_schema(df)
    kinds = {c.name: c.kind for c in schema.columns}
    assert kinds == {"i": "integer", "f": "float", "c": "categorical", "d": "datetime", "n": "integer"}
    assert (schema["i"].min, schema["i"].max) == (1, 5)
    assert schema["f"].precision == 2 and schema["f"].min == -0.5
    assert schema["c"].categories == ["a", "b"]
    assert (schema["d"].min, schema["d"].max) == ("2020-01-02", "2021-05-06")
    assert schema["n"].nullable and not schema["i"].nullable
    assert all(c.source == "data" for c in schema.columns)


def test_given_schema_is_kept_and_gaps_learned():
    given = Schema.from_dict({"columns": {"c": {"kind": "categorical", "categories": ["a", "b", "z"]},
                                          "i": {"kind": "integer"}}})
    schema = infer_schema(pd.DataFrame({"i": [3, 9], "c": ["a", "b"]}), given)
    assert schema.names == ["c", "i"]
    assert schema["c"].categories == ["a", "b", "z"] and schema["c"].source == "user"
    assert (schema["i"].min, schema["i"].max, schema["i"].source) == (3, 9, "data")
    # An output order given with the schema survives completion and the YAML round trip.
    given.set_output_order(["i", "c"])
    schema = infer_schema(pd.DataFrame({"i": [3, 9], "c": ["a", "b"]}), given)
    assert schema.names == ["c", "i"] and schema.output_order == ["i", "c"]
    assert Schema.from_dict(schema.to_dict()).output_order == ["i", "c"]
    # A table column the schema does not list is written last and comes out last.
    schema = infer_schema(pd.DataFrame({"x": [1, 2], "i": [3, 9], "c": ["a", "b"]}), given)
    assert schema.names == ["c", "i", "x"] and schema.output_order == ["i", "c", "x"]


def test_schema_column_missing_from_table_is_an_error():
    given = Schema.from_dict({"columns": {"c": {"kind": "categorical", "categories": ["a"]},
                                          "gone": {"kind": "integer", "min": 0, "max": 9}}})
    with pytest.raises(DplmError, match=r"column\(s\) \['gone'\] are in the schema but not in the table"):
        infer_schema(pd.DataFrame({"c": ["a"]}), given)


def test_dp_refuses_learned_or_missing_metadata():
    learned = infer_schema(pd.DataFrame({"x": [1, 2]}))
    with pytest.raises(DplmError, match="column 'x': DP training needs its metadata"):
        learned.check_dp_safe()
    gap = Schema.from_dict({"columns": {"x": {"kind": "integer", "min": 0}}})
    with pytest.raises(DplmError, match="column 'x': DP training needs 'max'"):
        gap.check_dp_safe()


def test_census_schema_covers_census(census, census_schema):
    census_schema.check_dp_safe()
    table = coerce_table(census, census_schema)
    assert table.shape == census.shape
    assert (table["age"].astype(int) == census["age"]).all()


@pytest.mark.parametrize("spec,frame,message", [
    ({"x": {"kind": "integer", "min": 0, "max": 9}}, {"x": ["1", "abc"]}, "column 'x': value 'abc' is not a number"),
    ({"x": {"kind": "integer", "min": 0, "max": 9}}, {"x": [1.5]}, "column 'x': value '1.5' is not a whole number"),
    ({"x": {"kind": "categorical", "categories": ["a"]}}, {"x": ["b"]}, "column 'x': value 'b' is not one of"),
    ({"x": {"kind": "datetime", "min": "2020-01-01", "max": "2021-01-01"}}, {"x": ["soon"]}, "is not a date"),
    ({"x": {"kind": "integer", "min": 0, "max": 9}}, {"x": [1, None]}, "has missing values"),
    ({"x": {"kind": "integer", "min": 0, "max": 9}}, {"y": [1]}, r"\['x'\] are in the schema but not in the table"),
    ({"x": {"kind": "integer", "min": 0, "max": 9}}, {"x": [1], "y": [2]}, r"\['y'\] are in the table but not"),
])
def test_bad_values(spec, frame, message):
    with pytest.raises(DplmError, match=message):
        coerce_table(pd.DataFrame(frame), Schema.from_dict({"columns": spec}))


def test_bad_schema_specs():
    with pytest.raises(DplmError, match="unknown kind 'number'"):
        Schema.from_dict({"columns": {"x": {"kind": "number"}}})
    with pytest.raises(DplmError, match="unknown key"):
        Schema.from_dict({"columns": {"x": {"kind": "integer", "maximum": 3}}})
    with pytest.raises(DplmError, match=r"output_order \['x', 'z'\] must name each of the columns \['x', 'y'\] once"):
        Schema.from_dict({"columns": {"x": {"kind": "integer"}, "y": {"kind": "integer"}}, "output_order": ["x", "z"]})
    with pytest.raises(DplmError, match="min 5 is above max 1"):
        Column("x", "integer", min=5, max=1)


def test_out_of_bounds_numbers_are_clipped():
    schema = Schema.from_dict({"columns": {"x": {"kind": "float", "min": 0, "max": 1, "precision": 1}}})
    assert coerce_table(pd.DataFrame({"x": [-3.0, 0.44, 7.0]}), schema)["x"].tolist() == [0.0, 0.4, 1.0]


def test_format_number():
    assert [format_number(v, p) for v, p in [(3, 0), (-0.0, 1), (-0.04, 1), (12.5, 2), (1e7, 0)]] == [
        "3", "0.0", "0.0", "12.50", "10000000"]
    assert np.isclose(float(format_number(2 / 3, 3)), 0.667)


def test_random_records_cover_the_schema(census_schema):
    df = random_records(census_schema, 200, np.random.default_rng(0))
    for col in census_schema.columns:
        assert all(value_fits(col, v) for v in df[col.name]), col.name
    schema = Schema.from_dict({"columns": {"t": {"kind": "text", "max_tokens": 8},
                                           "d": {"kind": "datetime", "min": "2020-01-01", "max": "2020-01-31"}}})
    df = random_records(schema, 5, np.random.default_rng(0))
    assert df["d"].between("2020-01-01", "2020-01-31").all() and df["t"].str.len().gt(0).all()
