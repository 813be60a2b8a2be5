import pandas as pd
import pytest

from conftest import shared_file
from dplm.datasets import CENSUS_COLUMNS, load_census
from dplm.errors import DplmError


def test_census_matches_reference_table(census):
    reference = pd.read_csv(shared_file("census.csv.gz"))
    assert census.shape == (48842, 15)
    assert list(census.columns) == CENSUS_COLUMNS == list(reference.columns)
    pd.testing.assert_frame_equal(census, reference, check_dtype=False)
    assert set(census["income"]) == {"<=50K", ">50K"}


def test_census_from_user_csv(tmp_path, census):
    path = tmp_path / "c.csv"
    census.head(5).to_csv(path, index=False)
    assert load_census(path).equals(census.head(5))


def test_census_missing_path():
    with pytest.raises(DplmError, match="not found"):
        load_census("/nonexistent/adult.data")
