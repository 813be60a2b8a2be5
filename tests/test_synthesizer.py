import json

import numpy as np
import pandas as pd
import pytest

import dplm
from dplm.config import RunConfig, from_dict
from dplm.inputs import split_rows
from dplm.report import report_run
from dplm.rules import kept
from dplm.schema import value_fits
from conftest import CENSUS_SCHEMA


def tiny_config(dp: bool, tmp_path) -> RunConfig:
    return from_dict(RunConfig, {
        "output_dir": str(tmp_path / "run"),
        "data": {"schema": str(CENSUS_SCHEMA), "sample_fraction": 0.005},  # ~200 of the training rows
        "model": {"base": "tiny-random", "lora_r": 4, "lora_alpha": 8},
        "train": {"batch_size": 16, "micro_batch_size": 8, "max_steps": 3, "pretrain_rows": 0},
        "privacy": {"enabled": dp, "max_epsilon": 5.0},
        "sample": {"num_rows": 12, "batch_size": 8},
    })


@pytest.mark.parametrize("dp,value_tokens", [(True, False), (False, False), (True, True)])
def test_fit_sample_save_load_sample(dp, value_tokens, tmp_path, census):
    config = tiny_config(dp, tmp_path)
    config.model.value_tokens = value_tokens
    synth = dplm.fit(census, config, progress=False)
    first = synth.sample(12, seed=5, progress=False)
    assert first.shape == (12, 15) and list(first.columns) == list(census.columns)
    # The model writes the columns in the order dplm chose from the table's statistics (DP ones
    # under DP); the rows come out in the table's.
    # education_num is the schema's mapping of education: derived, not modelled (nor counted).
    assert sorted(synth.codec.schema.names) == sorted(set(census.columns) - {"education_num"})
    assert synth.marginals is not None and "education_num" not in synth.marginals.names
    assert synth.schema.output_order == list(census.columns)
    for col in synth.schema.columns:
        assert all(value_fits(col, v) for v in first[col.name]), col.name
    for rule in synth.schema.rules:  # an untrained model keeps them: only the grammar can
        assert kept(rule, first).all(), rule.describe()
    run_dir = synth.save(config.output_dir)
    files = {p.name for p in run_dir.iterdir()}
    assert {"adapter", "tokenizer", "schema.yaml", "config.yaml", "privacy.json", "train_log.jsonl",
            "split.json", "training.json", "plan.json", "statistics.json"} <= files
    statistics = json.loads((run_dir / "statistics.json").read_text())
    assert statistics["column_order"] == synth.codec.schema.names and statistics["dp"] == dp
    assert json.loads((run_dir / "plan.json").read_text())["batch_size"] == 16
    privacy = json.loads((run_dir / "privacy.json").read_text())
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 3
    split = json.loads((run_dir / "split.json").read_text())
    expected_train, expected_holdout = split_rows(census, config)
    assert split["train"] == expected_train.tolist() and split["holdout"] == expected_holdout.tolist()
    assert 150 < len(split["train"]) < 250 and abs(len(split["holdout"]) / len(census) - 0.2) < 0.01
    assert not set(split["train"]) & set(split["holdout"])
    if dp:
        assert privacy["dp"] and privacy["steps"] == 3 and 4.9 < privacy["epsilon"] <= 5.0  # the plan fills the cap
        # The log holds the check before each step (PRV within 0.01 above the exact figure), the
        # record the finer bound (within 0.001): both upper bounds, the record no higher.
        assert log[-1]["epsilon"] - 0.011 <= privacy["epsilon"] <= log[-1]["epsilon"]
        assert len(privacy["statistics_rounds"]) == 3  # one-way, two-way, both-non-zero counts
        # The unit count is released only as a DP count (discrete Laplace at epsilon 0.05: std 28), which q uses.
        assert privacy["sample_rate"] == pytest.approx(16 / privacy["num_training_units"])
        assert abs(privacy["num_training_units"] - len(split["train"])) < 200 and "num_training_rows" not in privacy
        assert set(privacy["metadata_sources"].values()) == {"user"} and privacy["secure_mode"] is False
    else:
        assert set(privacy) == {"dp", "metadata_sources", "release", "private_diagnostics"} and not privacy["dp"]
    assert "train_log.jsonl" in privacy["private_diagnostics"] and "adapter" in privacy["release"]
    again = dplm.load(run_dir).sample(12, seed=5, progress=False)
    pd.testing.assert_frame_equal(first, again)
    # Fitted on an in-memory table: the report cannot reload the rows and says so.
    assert synth.config.data.source is None and config.data.source == "census"
    with pytest.raises(dplm.DplmError, match="was fitted on an in-memory table"):
        report_run(run_dir)


def test_random_column_orders_train_and_sample_valid_rows(tmp_path, census):
    """`model.column_order: random`: each training row in its own order (reproducible from
    train.seed), rows sampled in the schema's order, all valid, given columns written first; a
    column that is not in value tokens is a one-line error."""
    config = tiny_config(False, tmp_path)
    config.model.column_order, config.model.value_tokens = "random", True
    synth = dplm.fit(census, config, progress=False)
    modelled = [c for c in census.columns if c != "education_num"]  # derived from education (the schema's rule)
    assert synth.codec.schema.names == modelled  # no order chosen: sampled in the schema's
    rows = synth.sample(12, seed=5, progress=False)
    assert rows.shape == (12, 15)
    for col in synth.schema.columns:
        assert all(value_fits(col, v) for v in rows[col.name]), col.name
    # Given columns are written first (the model has seen every order): kept exactly, the rest valid
    # and within the declared rules (capital_loss 0 where a capital gain is given; a given
    # education_num becomes its education).
    picks = pd.concat([census[census["capital_gain"] > 0].head(3), census.head(3)])
    given = picks[["income", "sex", "capital_gain", "education_num"]].reset_index(drop=True)
    completed = synth.sample(seed=5, progress=False, given=given)
    assert list(completed.columns) == list(census.columns) and len(completed) == 6
    for name in given.columns:
        assert completed[name].tolist() == given[name].tolist(), name
    assert completed["education"].tolist() == picks["education"].tolist()
    assert (completed["capital_loss"][:3] == 0).all()
    for col in synth.schema.columns:
        assert all(value_fits(col, v) for v in completed[col.name]), col.name
    for rule in synth.schema.rules:
        assert kept(rule, completed).all() and kept(rule, rows).all(), rule.describe()
    assert synth.codec.schema.names == modelled  # the model's own codec is unchanged
    with pytest.raises(dplm.DplmError, match="given row 0 breaks the schema rule 'capital_gain and capital_loss never"):
        synth.sample(progress=False, given=pd.DataFrame({"capital_gain": [5], "capital_loss": [7]}))
    config.model.value_tokens = False
    with pytest.raises(dplm.DplmError, match="column_order: random needs every column in value tokens"):
        dplm.fit(census, config, progress=False)
    histories = from_dict(RunConfig, {"data": {"subject": "id"}, "model": {"column_order": "random"}})
    with pytest.raises(dplm.DplmError, match="column_order: random is for flat rows"):
        histories.validate()


def test_unknown_subject_column(tmp_path, census):
    config = tiny_config(True, tmp_path)
    config.data.subject = "nope"
    with pytest.raises(dplm.DplmError, match="data.subject 'nope' is not a column"):
        dplm.fit(census, config, progress=False)


def test_without_dp_metadata_is_learned(tmp_path):
    df = pd.DataFrame({"x": list(range(40)), "y": ["a", "b"] * 20})
    config = tiny_config(False, tmp_path)
    config.data.schema = None
    config.data.sample_fraction = 1.0
    synth = dplm.fit(df, config, progress=False)
    assert synth.privacy_record["metadata_sources"] == {"x": "data", "y": "data"}
    assert synth.schema["y"].categories == ["a", "b"]


def test_dp_estimates_missing_metadata_and_charges_it(tmp_path, seeded_secrets):
    """Under DP, metadata the schema leaves out is estimated with its own DP mechanisms; the
    run's epsilon is metadata + training, and the record says which columns were estimated."""
    from test_privacy import independent_epsilon

    rng = np.random.default_rng(0)
    n = 3000
    df = pd.DataFrame({"city": ["north"] * 1500 + ["south"] * 1497 + ["rare"] * 3,
                       "age": rng.integers(20, 70, n)})
    config = tiny_config(True, tmp_path)
    config.data.schema = None
    config.data.sample_fraction = 1.0
    config.data.holdout_fraction = 0.0
    config.privacy.metadata_epsilon = 1.0
    config.privacy.noise_multiplier, config.privacy.statistics_share = 1.5, 0.0  # training's epsilon alone, below
    config.privacy.accountant = "rdp"
    config.train.max_steps = 2
    kinds = dplm.Schema.from_dict({"columns": {"city": {"kind": "categorical"}, "age": {"kind": "integer"}}})
    synth = dplm.fit(df, config, schema=kinds, progress=False)
    record = synth.privacy_record
    assert record["metadata_estimated_under_dp"] == {"city": ["categories"], "age": ["min", "max"],
                                                     "(training units)": ["count"]}
    assert record["metadata_sources"] == {"city": "dp", "age": "dp"} and record["metadata_user_given"] == []
    assert synth.schema["city"].categories == ["north", "south"]  # the rare value never reaches the model
    assert (synth.schema["age"].min, synth.schema["age"].max) == (20, 70)
    assert record["metadata_delta"] == pytest.approx(1e-6) and record["delta"] == pytest.approx(1e-5)
    assert record["sample_rate"] == config.train.batch_size / record["num_training_units"]  # the DP count's
    training = independent_epsilon(1.5, record["sample_rate"], 2, 1e-5 - 1e-6)
    assert record["training_epsilon"] == pytest.approx(training, rel=1e-4)
    assert record["epsilon"] == pytest.approx(1.0 + 0.05 + training, rel=1e-4)  # metadata, the count, training
    # Sampling starts from BOS alone and follows the DP schema: the rare value cannot come out.
    assert set(synth.sample(40, progress=False)["city"].dropna()) <= {"north", "south"}
    config.privacy.max_epsilon = 0.9  # the cap holds for the total: metadata alone passes it
    with pytest.raises(dplm.DplmError, match="the epsilon spent before training, 1.05 .* leaves nothing of "
                                             "privacy.max_epsilon 0.9"):
        dplm.fit(df, config, schema=kinds, progress=False)


def test_per_subject_dp_on_cdnow_flat_rows(tmp_path):
    """The flat mode (`data.mode: rows`): independent rows, each subject's rows clipped together."""
    from conftest import ROOT, shared_file
    from test_privacy import independent_epsilon

    table = pd.read_csv(shared_file("cdnow_purchases.csv.gz"), nrows=3000)
    config = from_dict(RunConfig, {
        "data": {"schema": str(ROOT / "recipes/cdnow_schema.yaml"), "subject": "users_id", "mode": "rows"},
        "model": {"base": "tiny-random", "lora_r": 4, "lora_alpha": 8},
        "train": {"batch_size": 8, "micro_batch_size": 8, "max_steps": 3},
        "privacy": {"enabled": True, "max_records_per_subject": 4, "noise_multiplier": 1.5, "accountant": "rdp"},
    })
    synth = dplm.fit(table, config, progress=False)
    record = synth.privacy_record
    subjects = record["num_training_units"]  # their DP count
    train_users = set(table["users_id"].iloc[synth.split["train"]])
    assert abs(subjects - len(train_users)) < 200 and not train_users & set(table["users_id"].iloc[synth.split["holdout"]])
    assert synth.split["num_training_subjects"] == len(train_users)  # the exact count: split.json, private
    assert record["privacy_unit"] == "subject (column 'users_id')" and record["max_records_per_subject"] == 4
    assert record["sample_rate"] == pytest.approx(8 / subjects)
    assert record["epsilon"] == pytest.approx(0.05 + independent_epsilon(1.5, 8 / subjects, 3, 1e-5), rel=1e-4)
    rows = synth.sample(6, progress=False)
    assert list(rows.columns) == ["date", "cds", "amt"]
    assert rows["amt"].between(0, 2000).all() and rows["date"].between("1997-01-01", "1998-06-30").all()


KINDS_ONLY = {"columns": {"city": {"kind": "categorical"}, "age": {"kind": "integer"}}}


def people_table(num_subjects: int = 300, seed: int = 0) -> pd.DataFrame:
    """A table of subjects with 1 to 6 rows each: a city and an age per row."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 7, num_subjects)
    ids = np.repeat(np.arange(num_subjects), counts)
    return pd.DataFrame({"person": ids, "city": rng.choice(["north", "south"], len(ids)),
                         "age": rng.integers(20, 70, len(ids))})


def test_a_returned_model_cannot_be_resumed(tmp_path):
    """The checkpoint goes when `fit` returns: a resume would replay from the last checkpoint
    and leave the steps after it (already in the returned model) out of epsilon."""
    from dplm.workspace import checkpoints_for

    config = tiny_config(True, tmp_path)
    config.train.checkpoint_every, config.train.max_steps = 2, 3
    checkpoints = checkpoints_for(config)
    synth = dplm.fit("census", config, checkpoints=checkpoints, progress=False)
    assert synth.privacy_record["steps"] == 3 and not checkpoints.folder.exists()
    with pytest.raises(dplm.DplmError, match="no checkpoint"):
        dplm.fit("census", config, checkpoints=checkpoints_for(config, resume=True), progress=False)


def test_plan_is_the_total_the_run_reports(tmp_path, monkeypatch):
    """`plan` (no training) gives the steps and the epsilon privacy.json will show: schema
    metadata estimated under DP, its delta share, the canaries in the sampling rate and the cap.
    (The run plans from its DP count of units and its canaries' coins; with the count exact and
    every canary training, as the plan sees them, the two agree exactly.)"""
    import dplm.stages

    monkeypatch.setattr(dplm.stages, "dp_count", lambda count, epsilon, rng: count)
    table = people_table().drop(columns=["person"])
    config = tiny_config(True, tmp_path)
    config.data.schema, config.data.sample_fraction = None, 1.0
    config.audit.canaries, config.audit.canary_repeats, config.audit.canary_inclusion = 3, 2, 1.0
    config.privacy.accountant = "rdp"  # one bound for the check before each step and the record: exact agreement
    config.privacy.metadata_epsilon = 1.2
    schema = dplm.Schema.from_dict(KINDS_ONLY)
    config.train.max_steps = 12
    config.privacy.noise_multiplier, config.privacy.statistics_share = 1.5, 0.0  # given: the cap must stop it
    cap = dplm.plan(config, table, schema)["epsilon"] * 1.00001  # the cap stops the run after 12 steps
    config.train.max_steps, config.privacy.max_epsilon = 40, cap
    planned = dplm.plan(config, table, schema)
    assert planned["steps"] == 12 and planned["epsilon"] <= cap
    synth = dplm.fit(table, config, schema=schema, progress=False)
    record = synth.privacy_record
    assert planned["stop_reason"] == synth.training.stop_reason == "max_epsilon"
    for key in ("steps", "epsilon", "delta", "training_delta", "metadata_epsilon", "metadata_delta", "sample_rate"):
        assert planned[key] == record[key], key
    assert planned["units"] == len(synth.split["train"]) + 6 and planned["metadata_estimated"] == {
        "city": ["categories"], "age": ["min", "max"], "(training units)": ["count"]}
    # Left to the plan (noise, the statistics' share): the plan and the run agree, statistics included.
    config.privacy.noise_multiplier, config.privacy.statistics_share, config.privacy.max_epsilon = None, None, 3.0
    planned = dplm.plan(config, table, schema)
    record = dplm.fit(table, config, schema=schema, progress=False).privacy_record
    assert planned["statistics_rounds"] == record["statistics_rounds"] and len(record["statistics_rounds"]) == 2
    for key in ("steps", "epsilon", "noise_multiplier", "sample_rate"):
        assert planned[key] == pytest.approx(record[key], rel=1e-9), key
    assert 2.99 < record["epsilon"] <= 3.0
