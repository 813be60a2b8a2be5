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


def seed_secret_draws(mp: pytest.MonkeyPatch, seed: int = 0) -> None:
    """Make the draws dplm keeps secret (DP noise, Poisson batches, DP metadata, canaries)
    reproducible, so a test's bounds hold for a known draw instead of most draws."""
    import numpy as np
    import torch

    import dplm.privacy
    import dplm.stages
    import dplm.train

    mp.setattr(dplm.stages, "secret_rng", lambda secure_mode=False: np.random.default_rng(seed))
    generator = lambda device="cpu": torch.Generator(device=device).manual_seed(seed)  # noqa: E731
    mp.setattr(dplm.train, "unseeded_generator", generator)
    mp.setattr(dplm.privacy, "unseeded_generator", generator)


@pytest.fixture
def seeded_secrets(monkeypatch):
    seed_secret_draws(monkeypatch)


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


def train_config(**settings):
    """A concrete TrainConfig for tests that call the training loop directly (`fit` fills the
    unset settings from its plan; the loop needs every one): the former fixed defaults."""
    from dplm.config import TrainConfig

    return TrainConfig(**{"learning_rate": 2e-3, "warmup_steps": 10, "max_epochs": 1.0, "micro_batch_size": 16,
                          "batch_size": 64, "early_stopping": False, **settings})


def privacy_config(**settings):
    """A concrete PrivacyConfig for the training loop (noise 1.5 and the RDP accountant unless given)."""
    from dplm.config import PrivacyConfig

    return PrivacyConfig(**{"noise_multiplier": 1.5, "accountant": "rdp", **settings})
