"""A few short runs with the real SmolLM2-135M (about a minute on 2 CPU cores); CI runs them."""

import math

import pytest

import dplm
from dplm.config import RunConfig, from_dict
from dplm.schema import value_fits
from conftest import CENSUS_SCHEMA
from test_privacy import independent_epsilon

pytestmark = pytest.mark.slow


def test_smollm2_dp_run(tmp_path, census, seeded_secrets):
    config = from_dict(RunConfig, {
        "data": {"schema": str(CENSUS_SCHEMA), "sample_fraction": 0.0512},  # ~2,000 training rows
        "train": {"batch_size": 8, "micro_batch_size": 8, "max_steps": 3, "learning_rate": 0.002},
        "privacy": {"enabled": True, "max_epsilon": 3.0, "noise_multiplier": 1.5, "accountant": "rdp",
                    "statistics_share": 0.0},
        "sample": {"batch_size": 8},
    })
    synth = dplm.fit(census, config, progress=False)
    assert synth.training.steps == 3
    q = synth.privacy_record["sample_rate"]
    assert q == pytest.approx(8 / synth.privacy_record["num_training_units"])  # the DP count of ~2,000 rows
    assert synth.privacy_record["epsilon"] == pytest.approx(0.05 + independent_epsilon(1.5, q, 3, 1e-5), rel=1e-4)
    rows = synth.sample(8, progress=False)
    assert synth.last_sample_stats.valid_rate == 1.0
    for col in synth.schema.columns:
        assert all(value_fits(col, v) for v in rows[col.name])
    # After 3 noisy steps the loss is already below a uniform guess over the tokens the output
    # layer scores (about 950 for census: value and place tokens, separator, EOS; ln 950 = 6.9).
    assert synth.training.final_loss < math.log(len(synth.codec.output_token_ids())) - 0.5
