import datasets
import pandas as pd
import pytest

from dplm.data import load_table
from dplm.errors import DplmError

TABLE = pd.DataFrame({"a": [1, 2, 3], "b": ["x", "y|z", "w"]})


@pytest.mark.parametrize("suffix,writer", [
    (".csv", lambda df, p: df.to_csv(p, index=False)),
    (".csv.gz", lambda df, p: df.to_csv(p, index=False)),
    (".parquet", lambda df, p: df.to_parquet(p)),
    (".jsonl", lambda df, p: df.to_json(p, orient="records", lines=True)),
])
def test_file_formats(tmp_path, suffix, writer):
    path = tmp_path / f"t{suffix}"
    writer(TABLE, path)
    pd.testing.assert_frame_equal(load_table(str(path)), TABLE, check_dtype=False)


def test_dataframe_and_hf_dataset():
    pd.testing.assert_frame_equal(load_table(TABLE), TABLE)
    pd.testing.assert_frame_equal(load_table(datasets.Dataset.from_pandas(TABLE)), TABLE, check_dtype=False)


def test_bad_sources(tmp_path):
    with pytest.raises(DplmError, match="'/no/such.csv' not found"):
        load_table("/no/such.csv")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DplmError, match="is empty"):
        load_table(str(empty))
    header_only = tmp_path / "header.csv"
    header_only.write_text("a,b\n")
    with pytest.raises(DplmError, match="is empty"):
        load_table(str(header_only))
    odd = tmp_path / "t.xlsx"
    odd.write_text("x")
    with pytest.raises(DplmError, match="unknown format"):
        load_table(str(odd))
