"""The empirical audit: a model trained many epochs without DP remembers its rows and
canaries; a DP model does not (tiny model, fast settings; canaries are random each run)."""

import json
from pathlib import Path

import numpy as np
import pytest

import dplm
from conftest import seed_secret_draws
from dplm.audit import audit_run, exposure, membership_inference
from dplm.cli import main
from dplm.config import RunConfig, from_dict
from dplm.schema import Schema

ROOT = Path(__file__).resolve().parents[1]


def fitted_run(tmp_path, dp: bool, rows: int, epochs: int, canaries: int, noise: float = 2.0,
               inclusion: float = 1.0) -> Path:
    # Under DP a share of the training rows (each kept by its own draw: ~`rows` of them), else a cut at `rows`.
    subset = {"sample_fraction": rows / 39_074} if dp else {"max_rows": rows}
    config = from_dict(RunConfig, {
        "output_dir": str(tmp_path / ("dp" if dp else "no_dp")),
        "data": {"schema": str(ROOT / "recipes/census_schema.yaml"), **subset},
        "model": {"base": "tiny-random"},
        "train": {"batch_size": 8, "micro_batch_size": 8, "max_epochs": epochs, "learning_rate": 0.03,
                  "warmup_steps": 5},
        "privacy": {"enabled": dp, "noise_multiplier": noise, "accountant": "rdp"},  # PRV's epsilon per step is slower
        "audit": {"canaries": canaries, "canary_repeats": 4, "canary_inclusion": inclusion},
    })
    synth = dplm.fit("census", config, progress=False)
    return synth.save(config.output_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audit")
    with pytest.MonkeyPatch.context() as mp:
        seed_secret_draws(mp)
        return _fitted_runs(tmp)


def _fitted_runs(tmp):
    # The canaries and the DP noise are seeded here; the bounds below hold for unseeded draws too:
    # 32 rows x 30 epochs with 5 canaries memorize (15 runs: AUC 0.75-0.90, exposure 7.65 bits each;
    # 10 canaries dilute it: AUC 0.52 once in 12). The DP run (PRV epsilon 1.34): 40 runs gave AUC
    # 0.42-0.60 and mean canary exposure 0.70-3.18 bits (mean 1.65; unseen records average 1.44).
    # At noise 2.0 with 5 canaries it exceeded 3.5 bits in 3 of 40 runs: the canary rows (20 of 84)
    # teach the model their shared values, a group effect DP does not hide.
    return {"no_dp": fitted_run(tmp, dp=False, rows=32, epochs=30, canaries=5),
            "dp": fitted_run(tmp, dp=True, rows=64, epochs=20, canaries=10, noise=4.0)}


def test_memorizing_run_is_caught_and_dp_run_is_near_chance(runs):
    no_dp = audit_run(runs["no_dp"], num_records=64, num_references=200)
    dp = audit_run(runs["dp"], num_records=64, num_references=200)
    assert no_dp["membership_inference"]["auc"] > 0.65
    assert no_dp["canaries"]["mean_exposure"] > 5  # of at most log2(201) = 7.65 bits
    assert abs(dp["membership_inference"]["auc"] - 0.5) < 0.2, dp
    assert dp["canaries"]["mean_exposure"] < 4.0, dp
    assert json.loads((runs["dp"] / "audit.json").read_text()) == dp


def test_audit_cli_prints_both_attacks(runs, capsys):
    assert main(["audit", str(runs["dp"]), "-n", "32", "--references", "50"]) == 0
    out = capsys.readouterr().out
    assert "membership inference AUC" in out and "canaries: 10 drawn, 10 trained (4 rows each)" in out
    assert "attribute inference" not in out  # the run saved no synthetic rows
    assert main(["audit", str(runs["dp"]), "--sensitive", "income"]) == 2
    assert "has no synthetic.csv" in capsys.readouterr().err


def test_canaries_are_saved_and_fit_the_schema(runs, census_schema):
    import pandas as pd

    canaries = pd.read_csv(runs["dp"] / "canaries.csv")
    assert len(canaries) == 10 and list(canaries.columns) == [*census_schema.names, "(included)"]
    assert canaries["(included)"].all()  # audit.canary_inclusion 1.0: every canary trained
    record = json.loads((runs["dp"] / "privacy.json").read_text())
    assert record["audit_canaries"] == {"drawn": 10, "training": 10, "rows_each": 4} and "num_training_rows" not in record
    split = json.loads((runs["dp"] / "split.json").read_text())
    assert abs(record["num_training_units"] - len(split["train"])) < 200  # the DP count (epsilon 0.05)
    assert record["sample_rate"] == pytest.approx(8 / (record["num_training_units"] + 40))  # canaries are units too


def test_exposure_and_attack_metrics_by_hand():
    assert exposure(np.array([0.1, 5.0]), np.array([1.0, 2.0, 3.0])).tolist() == pytest.approx([2.0, 0.0])
    mia = membership_inference(np.array([0.1, 0.2]), np.array([0.3, 0.4]))
    assert mia["auc"] == 1.0 and mia["tpr_at_1pct_fpr"] == 1.0


def test_a_columns_loss_is_the_mean_over_its_tokens_by_hand(tokenizer):
    """record_losses(column=...) averages the next-token losses of that value's tokens only."""
    import pandas as pd
    import torch

    from dplm.audit import record_losses
    from dplm.config import RunConfig
    from dplm.model import load_base_model
    from dplm.serialize import RowCodec
    from dplm.synthesizer import Synthesizer

    schema = Schema.from_dict({"columns": {"k": {"kind": "categorical", "categories": ["a", "b"]},
                                           "t": {"kind": "text", "max_tokens": 16}, "n": {"kind": "integer",
                                                                                        "min": 0, "max": 99}}})
    codec = RowCodec(schema, tokenizer)
    synth = Synthesizer(RunConfig(), codec, load_base_model("tiny-random", len(tokenizer)).eval(), torch.device("cpu"))
    rows = pd.DataFrame({"k": ["a", "b"], "t": ["qx vb lorem", "zz"], "n": [7, 42]})
    got = record_losses(synth, rows, column="t")
    for i, row in enumerate(rows.to_dict("records")):
        ids, spans = codec.encode_with_spans(row)
        with torch.no_grad():
            log_probs = torch.log_softmax(synth.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        start, end = spans[1]
        by_hand = -np.mean([log_probs[t - 1, ids[t]].item() for t in range(start, end)])
        assert got[i] == pytest.approx(by_hand, rel=1e-4)
        assert codec.decode(ids[:start] + ids[start:end] + ids[end:]) == row


def test_text_canaries_get_their_own_exposure(tmp_path):
    """A run with a text column and canaries: `dplm audit` reports the exposure of the canaries'
    random words alone."""
    import pandas as pd

    from conftest import shared_file

    table = pd.read_csv(shared_file("london.csv.gz")).head(80)
    config = from_dict(RunConfig, {
        "output_dir": str(tmp_path / "run"), "data": {"source": None, "columns": ["room_type", "title"]},
        "model": {"base": "tiny-random"}, "train": {"batch_size": 8, "max_steps": 3},
        "audit": {"canaries": 3, "canary_repeats": 2, "canary_inclusion": 1.0}})
    synth = dplm.fit(table, config, progress=False)
    table.to_csv(tmp_path / "london.csv", index=False)
    synth.config.data.source = str(tmp_path / "london.csv")
    run = synth.save(config.output_dir)
    result = audit_run(run, num_records=10, num_references=20)
    text = result["canaries"]["text"]["title"]
    assert 0 <= text["mean_exposure"] <= text["max_exposure"] <= np.log2(21)
    canaries = pd.read_csv(run / "canaries.csv")
    assert list(canaries.columns) == ["room_type", "title", "(included)"] and canaries["title"].str.count(" ").eq(3).all()


def test_attribute_inference_by_hand():
    import pandas as pd

    from dplm.audit import attribute_inference

    # The synthetic rows copy the members: the nearest synthetic row gives a member's value
    # exactly, and the holdout rows (same known columns, other values) never.
    members = pd.DataFrame({"x": [0, 10, 20, 30], "c": ["p", "q", "p", "q"], "s": ["a", "b", "a", "b"]})
    others = members.assign(s=["b", "a", "b", "a"])
    result = attribute_inference(members, others, members.copy(), "s")
    assert result["nearest_neighbour"] == {"accuracy_members": 1.0, "accuracy_non_members": 0.0, "advantage": 1.0}
    # Four rows are too few for a tree to split: the classifier guesses one class for all.
    assert result["classifier"]["accuracy_members"] == 0.5 and result["classifier"]["advantage"] == 0.0
    assert result["majority"]["accuracy_members"] == 0.5 and result["advantage"] == 1.0
    assert result["column"] == "s" and result["members"] == 4


def test_attribute_inference_column_must_be_categorical(runs, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs["dp"], run)
    synth = dplm.load(run)
    synth.sample(20, progress=False).to_csv(run / "synthetic.csv", index=False)
    with pytest.raises(dplm.DplmError, match="'age' is not one of the run's categorical columns"):
        audit_run(run, num_records=16, num_references=20, sensitive="age")
    result = audit_run(run, num_records=16, num_references=20)
    assert result["attribute_inference"]["column"] == "income"  # no report yet: the last categorical column
    assert result["attribute_inference"]["members"] == 16
    assert main(["audit", str(run), "-n", "16", "--references", "20", "--sensitive", "sex"]) == 0
    assert json.loads((run / "audit.json").read_text())["attribute_inference"]["column"] == "sex"


def test_one_run_bound_by_hand():
    """Steinke et al.'s p-value without delta is the binomial tail (summed here from its terms);
    scores that tell every trained canary from the others give a bound near what 2k guesses can
    show, scores unrelated to training give 0, and an epsilon-DP coin (randomized response at
    epsilon 1) is not bounded above its epsilon."""
    import math

    from dplm.audit import guess_p_value, one_run_epsilon

    q = 1 / (1 + math.exp(-1.0))
    tail = sum(math.comb(40, j) * q**j * (1 - q) ** (40 - j) for j in range(35, 41))
    assert guess_p_value(200, 40, 35, 1.0, 0.0) == pytest.approx(tail, rel=1e-9)
    assert guess_p_value(200, 40, 35, 1.0, 1e-5) > tail  # the delta term
    rng = np.random.default_rng(0)
    trained = rng.random(1000) < 0.5
    perfect = one_run_epsilon(trained.astype(float) + rng.random(1000) * 0.1, trained, 1e-5)
    assert perfect["correct"] == perfect["guesses"] and perfect["epsilon_lower_bound"] > 3.0
    assert one_run_epsilon(rng.random(1000), trained, 1e-5)["epsilon_lower_bound"] < 0.5
    for seed in range(5):  # randomized response at epsilon 1: each coin reported right with probability q
        coins = np.random.default_rng(seed).random(1000) < 0.5
        reported = np.where(np.random.default_rng(seed + 10).random(1000) < q, coins, ~coins)
        assert one_run_epsilon(reported + 0.01 * np.random.default_rng(seed).random(1000), coins, 0.0)[
            "epsilon_lower_bound"] <= 1.0


def test_one_run_audit_of_a_memorizing_run_and_a_dp_run(tmp_path):
    """With canaries trained by secret coins, a run that memorizes them is caught (a bound above
    0) and a DP run is not bounded above its own epsilon."""
    with pytest.MonkeyPatch.context() as mp:
        seed_secret_draws(mp)
        no_dp = fitted_run(tmp_path, dp=False, rows=16, epochs=30, canaries=60, inclusion=0.5)
        dp = fitted_run(tmp_path, dp=True, rows=64, epochs=4, canaries=60, noise=1.0, inclusion=0.5)
    memorized = audit_run(no_dp, num_records=16, num_references=50)["canaries"]
    assert memorized["training"] + (60 - memorized["training"]) == 60 and 15 < memorized["training"] < 45
    assert memorized["one_run"]["epsilon_lower_bound"] > 0.5, memorized
    private = audit_run(dp, num_records=16, num_references=50)
    assert private["canaries"]["one_run"]["epsilon_lower_bound"] <= private["epsilon"], private
