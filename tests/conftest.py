import os
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", category=FutureWarning)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
CENSUS_SCHEMA = ROOT / "recipes" / "census_schema.yaml"


@pytest.fixture(scope="session")
def tokenizer():
    from dplm.model import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="session")
def census():
    from dplm.datasets import load_census

    return load_census()


@pytest.fixture(scope="session")
def census_schema():
    from dplm.schema import Schema

    return Schema.from_yaml(str(CENSUS_SCHEMA))


def shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"reference data {path} not present")
    return path


def census_kinds_file(folder: Path) -> Path:
    """The census schema with each column's kind only: under DP all metadata is then estimated."""
    import yaml

    columns = yaml.safe_load(CENSUS_SCHEMA.read_text())["columns"]
    path = folder / "census_kinds.yaml"
    path.write_text(yaml.safe_dump({"columns": {name: {"kind": spec["kind"]} for name, spec in columns.items()}}))
    return path
