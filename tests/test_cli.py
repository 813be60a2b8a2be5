import re
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from conftest import census_kinds_file
from dplm.cli import main

SCHEMA = {"columns": {"x": {"kind": "integer", "min": 0, "max": 9}, "y": {"kind": "categorical",
                                                                        "categories": ["a", "b"]}}}


@pytest.fixture
def workspace(tmp_path):
    pd.DataFrame({"x": [1, 2, 3, 4], "y": ["a", "b", "a", "b"]}).to_csv(tmp_path / "t.csv", index=False)
    (tmp_path / "schema.yaml").write_text(yaml.safe_dump(SCHEMA))
    recipe = {"output_dir": str(tmp_path / "run"), "output_csv": str(tmp_path / "out.csv"),
              "data": {"source": str(tmp_path / "t.csv"), "schema": str(tmp_path / "schema.yaml"),
                       "holdout_fraction": 0.0},
              "model": {"base": "tiny-random"}, "train": {"batch_size": 2, "max_steps": 1},
              # a 4-row toy table: its DP count (the sampling rate's N) nearly exact at this count_epsilon
              "privacy": {"enabled": True, "noise_multiplier": 1.5, "accountant": "rdp", "count_epsilon": 2},
              "sample": {"num_rows": 2}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return tmp_path


def run_cli(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize("overrides,message", [
    (["train.foo=1"], "unknown config key 'train.foo'"),
    (["privacy.noise_multiplier=0"], "privacy.noise_multiplier must be > 0"),
    (["privacy.max_grad_norm=-1"], "privacy.max_grad_norm must be > 0"),
    (["privacy.delta=1"], "privacy.delta must be in (0, 1)"),
    (["privacy.max_epsilon=0"], "privacy.max_epsilon must be > 0"),
    (["train.batch_size=many"], "config 'train.batch_size': 'many' is not a valid int"),
    (["data.source=/no/such/file.csv"], "data file '/no/such/file.csv' not found"),
    (["privacy.enabled=true", "data.schema=null"], "column 'x': DP training needs its kind from the schema file"),
    (["train.max_training_time=60"], "train.max_training_time cannot be used with DP"),
])
def test_bad_settings(workspace, capsys, overrides, message):
    code, err = run_cli(["train", str(workspace / "recipe.yaml"), *overrides], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("dplm: error: ") and message in err[0]
    assert not (workspace / "run").exists() and not (workspace / "out.csv").exists()


@pytest.mark.parametrize("table,schema,message", [
    ("", None, "is empty"),
    ("x,y\n", None, "is empty"),
    ("x,y\n1,a\nabc,b\n", None, "column 'x': value 'abc' is not a number"),
    ("x,y\n1,a\n2,c\n", None, "column 'y': value 'c' is not one of its categories"),
    ("x\n1\n2\n", None, "column(s) ['y'] are in the schema but not in the table"),
    ("x,y,z\n1,a,0\n2,b,1\n", None, "column 'z': DP training needs its kind from the schema file"),
    ("x,y\n1,a\n2,b\n", {"columns": {"x": {"kind": "integer"}, "y": {"kind": "categorical", "categories": ["a", "b"]}}},
     "column 'x': too few rows for a DP estimate of its min, max"),
])
def test_bad_data(workspace, capsys, table, schema, message, seeded_secrets):
    (workspace / "t.csv").write_text(table)
    if schema:
        (workspace / "schema.yaml").write_text(yaml.safe_dump(schema))
    code, err = run_cli(["train", str(workspace / "recipe.yaml")], capsys)
    assert code == 2 and len(err) == 1 and message in err[0]
    assert not (workspace / "run").exists()


def test_missing_recipe_and_run_dir(tmp_path, capsys):
    code, err = run_cli(["train", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and "recipe" in err[0] and "not found" in err[0]
    code, err = run_cli(["generate", str(tmp_path), "-n", "3", "-o", str(tmp_path / "o.csv")], capsys)
    assert code == 2 and "is not a dplm run directory" in err[0]
    assert not (tmp_path / "o.csv").exists()


def test_train_then_generate(workspace, capsys):
    assert main(["train", str(workspace / "recipe.yaml"), "-q"]) == 0
    out = capsys.readouterr().out
    assert "privacy: epsilon = " in out and "valid-row rate 100.0%" in out
    assert pd.read_csv(workspace / "out.csv").shape == (2, 2)
    assert main(["generate", str(workspace / "run"), "-n", "5", "-o", str(workspace / "g.csv"), "-q"]) == 0
    generated = pd.read_csv(workspace / "g.csv")
    assert generated.shape == (5, 2) and generated["x"].between(0, 9).all() and set(generated["y"]) <= {"a", "b"}
    # Conditional generation: y comes after x in the schema; the output format follows the extension.
    pd.DataFrame({"y": ["b", "a", "b"]}).to_csv(workspace / "given.csv", index=False)
    for name, read in (("c.parquet", pd.read_parquet), ("c.jsonl", lambda p: pd.read_json(p, lines=True))):
        assert main(["generate", str(workspace / "run"), "--given", str(workspace / "given.csv"),
                     "-o", str(workspace / name), "-q"]) == 0
        completed = read(workspace / name)
        assert completed["y"].tolist() == ["b", "a", "b"] and completed["x"].between(0, 9).all()


@pytest.mark.parametrize("given, args, message", [
    ({"y": ["a", "c"]}, ["-o", "bad.csv"], "given column 'y', row 1: 'c' is not one of its categories"),
    ({"z": [1]}, ["-o", "bad.csv"], "given column 'z' is not in the run's schema"),
    ({"y": ["a"]}, ["-o", "bad.xlsx"], "bad.xlsx': unknown format '.xlsx'; use .csv, .parquet or .jsonl"),
    ({"y": ["a"]}, ["-n", "3", "-o", "bad.csv"], "give either -n N (rows to generate) or --given FILE"),
])
def test_generate_given_bad_input(workspace, capsys, given, args, message):
    assert main(["train", str(workspace / "recipe.yaml"), "-q"]) == 0
    pd.DataFrame(given).to_csv(workspace / "given.csv", index=False)
    args = [a if not a.startswith("bad") else str(workspace / a) for a in args]
    code, err = run_cli(["generate", str(workspace / "run"), "--given", str(workspace / "given.csv"), *args, "-q"],
                        capsys)
    assert code == 2 and len(err) == 1 and message in err[0]
    assert not list(workspace.glob("bad*")) and not list(workspace.glob(".bad*"))


def test_exit_code_of_the_installed_command(workspace):
    result = subprocess.run([sys.executable, "-m", "dplm.cli", "train", str(workspace / "recipe.yaml"),
                             "privacy.delta=2"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == "dplm: error: privacy.delta must be in (0, 1) (e.g. 1e-5)"


def test_plan_prints_epsilon_per_epoch(workspace, capsys):
    assert main(["plan", str(workspace / "recipe.yaml"), "train.max_epochs=2", "train.max_steps=null",
                 "--target-epsilon", "5"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "plan: batch 2 (given), learning rate 0.01 (auto), at most 2 epochs (given)"
    assert out[1].startswith("plan (DP): noise ") and "(auto), table statistics 50% of the budget" in out[1]
    assert any(line.startswith("4 training rows, batch 2: sample rate 0.5, 2 steps per epoch; rdp accountant") for line in out)
    assert any(line.startswith("table statistics: 2 Gaussian rounds of noise ") for line in out)
    assert out[-2].startswith("  epoch 2: 4 steps, epsilon ") and 4.95 < float(out[-2].split()[-1]) <= 5
    assert out[-1].startswith("the run: 4 steps (stopped by max_epochs), epsilon ") and \
        out[-1].split()[-4] == out[-2].split()[-1]


def test_killed_run_resumes_to_the_same_epsilon_and_the_cap(tmp_path):
    """SIGKILL a real DP training process at a random step, resume it: training continues
    from the checkpoint (never from zero) and ends where an uninterrupted run ends: the
    same steps, epsilon and stop at the cap. The DP-estimated schema and the canaries come
    back from the checkpoint: nothing is estimated or charged twice."""
    import json
    import random
    import signal
    import time
    from pathlib import Path

    import torch

    from test_privacy import independent_epsilon

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    steps = 120
    cmd = [sys.executable, "-m", "dplm.cli", "train", str(root / "recipes/census_dp.yaml"), "model.base=tiny-random",
           "data.sample_fraction=0.0128", "train.batch_size=8", "train.micro_batch_size=8", "train.max_epochs=100",
           "train.max_steps=null", "train.checkpoint_every=1", "privacy.max_epsilon=100", "privacy.accountant=rdp",
           "privacy.statistics_share=0",
           "privacy.noise_multiplier=1.5", f"data.schema={census_kinds_file(tmp_path)}", "privacy.metadata_epsilon=30",
           "audit.canaries=2", "audit.canary_inclusion=1", "sample.num_rows=5", f"output_dir={out}", "output_csv=null",
           "-q"]  # ~500 training rows (their DP count sizes q) and 2 canaries
    checkpoint = tmp_path / "run.checkpoint" / "checkpoint.pt"
    kill_at = random.Random().randint(3, 60)
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if checkpoint.exists() and torch.load(checkpoint, weights_only=False)["step"] >= kill_at:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = torch.load(checkpoint, weights_only=False)
    assert kill_at <= killed["step"] < steps and not (out / "config.yaml").exists()
    assert len(killed["accountant_history"]) == 1 and killed["accountant_history"][0][2] == killed["step"]
    q = 8 / (killed["run_state"]["count"] + 2)  # the DP count drawn before training, and the canaries
    training_epsilon = independent_epsilon(1.5, q, steps, 0.9e-5)  # a tenth of delta went to the category sets
    cap = 30 + 0.05 + training_epsilon * 1.0001  # metadata 30, the count 0.05 + training: the cap stops after 120 steps
    capped = [c if not c.startswith("privacy.max_epsilon=") else f"privacy.max_epsilon={cap}" for c in cmd]

    again = subprocess.run(capped, cwd=root, capture_output=True, text=True)
    assert again.returncode == 2 and "pass --resume" in again.stderr  # never restarts silently

    resumed = subprocess.run(capped + ["--resume"], cwd=root, capture_output=True, text=True)  # the cap may change
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    privacy = json.loads((out / "privacy.json").read_text())
    training = json.loads((out / "training.json").read_text())
    assert privacy["steps"] == steps and training["stop_reason"] == "max_epsilon"
    assert privacy["sample_rate"] == pytest.approx(q)
    assert privacy["epsilon"] == pytest.approx(30.05 + training_epsilon, rel=1e-4) and privacy["metadata_epsilon"] == 30.05
    assert privacy["epsilon"] <= cap
    assert yaml.safe_load((out / "schema.yaml").read_text()) == killed["run_state"]["schema"]
    assert pd.read_csv(out / "canaries.csv").drop(columns="(included)").astype(str).to_dict("list") == \
        pd.DataFrame(killed["run_state"]["canaries"]).astype(str).to_dict("list")
    assert training["resumed_from_step"] >= killed["step"]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, steps + 1))  # the steps before the kill are kept
    assert not checkpoint.parent.exists()


def test_resume_key_holds_every_setting_that_shapes_training():
    """A resume may change stopping limits only; canaries change the training units."""
    from dplm.config import RunConfig
    from dplm.workspace import RESUMABLE_CHANGES, checkpoints_for

    key = checkpoints_for(RunConfig()).key
    assert {"audit.canaries", "audit.canary_repeats", "privacy.noise_multiplier", "data.subject"} <= set(key)
    assert not {f"{section}.{name}" for section, names in RESUMABLE_CHANGES.items() for name in names} & set(key)


@pytest.mark.parametrize("recipe, given", [
    ("london_dp.yaml", {"room_type": ["Private room", "Entire home/apt"], "neighbourhood": ["Hackney", "Camden"]}),
    ("london.yaml", {"title": ["Sunny room near the park", None]}),
    ("sacred_dp.yaml", {"book": ["gen", "rev"]}),
])
def test_text_recipes_end_to_end(tmp_path, capsys, recipe, given):
    """The text recipes as shipped (tiny model, a few steps): train, then complete given rows."""
    from conftest import ROOT, shared_file

    source = shared_file("london.csv.gz" if recipe.startswith("london") else "sacred.csv.gz")
    fraction = 0.035 if recipe.startswith("london") else 0.08  # ~2,000 training rows
    run = tmp_path / "run"
    assert main(["train", str(ROOT / "recipes" / recipe), f"data.source={source}", f"output_dir={run}",
                 "output_csv=null", "model.base=tiny-random", f"data.sample_fraction={fraction}", "train.max_steps=2",
                 "train.max_training_time=null", "train.batch_size=16", "text.max_steps=2", "text.batch_size=16",
                 "sample.num_rows=4", "-q"]) == 0
    out = capsys.readouterr().out
    # Even a random model writes only valid rows (the grammar tracks a text's escapes); twice the
    # rows asked for, of which the calibration to the statistics keeps 4.
    drawn = re.search(r"sampling: (\d+) valid rows from (\d+) generated.*; kept (\d+) of them", out)
    assert drawn and int(drawn[1]) == int(drawn[2]) == 8 and int(drawn[3]) == 4 and ("epsilon = " in out) == ("_dp" in recipe)
    pd.DataFrame(given).to_csv(tmp_path / "given.csv", index=False)
    assert main(["generate", str(run), "--given", str(tmp_path / "given.csv"), "-o", str(tmp_path / "o.jsonl"),
                 "-q"]) == 0
    completed = pd.read_json(tmp_path / "o.jsonl", lines=True, dtype=False)
    for column, values in given.items():
        assert [None if pd.isna(v) else v for v in completed[column]] == values
    text = "title" if recipe.startswith("london") else "text"
    assert completed[text].map(lambda t: pd.isna(t) or isinstance(t, str)).all()
