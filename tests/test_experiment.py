import json

import numpy as np
import pandas as pd
import pytest

from dplm.cli import main
from dplm.config import load_recipe
from dplm.errors import DplmError
from dplm.experiment import grid, sweep
from test_report import screenshot, share_of_color

# Tiny runs: a random 2-layer model, a few steps, 60 sampled rows per point.
TINY = ["model.base=tiny-random", "train.batch_size=64", "train.micro_batch_size=64", "train.max_epochs=0.1",
        "train.warmup_steps=1", "privacy.accountant=rdp", "privacy.max_epsilon=null", "sweep.num_rows=60",
        "sweep.audit_records=60", "sweep.target=income", "sample.batch_size=64", "data.sample_fraction=1",
        "audit.canaries=20"]


@pytest.fixture(scope="module")
def data(tmp_path_factory, census):
    path = tmp_path_factory.mktemp("sweepdata") / "census.csv"
    census.iloc[:1200].to_csv(path, index=False)
    return path


def recipe(data, *extra):
    return load_recipe("recipes/census_sweep.yaml", [f"data.source={data}", *TINY, *extra])


def rdp_epsilon(noise, sample_rate, steps, delta):
    """Epsilon by Opacus' own RDP accountant, independently of dplm.privacy."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(noise, sample_rate, steps)]
    return accountant.get_epsilon(delta)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("sweep") / "grid"
    config = recipe(data, "sweep.noise_multipliers=[1.0, 4.0]", "sweep.max_grad_norms=[1.0]",
                    "sweep.baseline_epochs=[0.1]", "train.report_to=[mlflow]")
    return config, out, sweep(config, out, progress=False)


def test_sweep_writes_one_scored_row_per_point_with_the_accountants_epsilon(finished):
    config, out, table = finished
    assert list(table["name"]) == ["dp-noise1-clip1", "dp-noise4-clip1", "nodp-epochs0.1"]
    assert table["error"].isna().all()
    for r in table[table["dp"]].to_dict("records"):
        record = json.loads((out / "points" / r["name"] / "privacy.json").read_text())
        units = record["num_training_units"] + record["audit_canaries"]["training"]  # the DP count and the canaries
        assert abs(units - 970) < 200 and record["sample_rate"] == pytest.approx(64 / units)
        assert r["epsilon"] == pytest.approx(0.05 + rdp_epsilon(r["noise_multiplier"], 64 / units, r["steps"], 1e-5),
                                             rel=1e-6)
        assert 0 <= r["empirical_epsilon"] <= r["epsilon"]  # the one-run audit's lower bound, beside the claim
    dp = table[table["dp"]].set_index("noise_multiplier")
    assert dp.loc[1.0, "epsilon"] > dp.loc[4.0, "epsilon"] > 0
    baseline = table[~table["dp"]].iloc[0]
    assert np.isnan(baseline["epsilon"]) and baseline["steps"] == 2  # 0.1 epoch of ~970 rows, batch 64
    for column in ("accuracy", "discriminator_auc", "dcr_share", "tstr_accuracy", "membership_auc",
                   "attribute_advantage", "train_seconds", "seconds"):
        assert table[column].between(-1, 10_000).all(), column
    assert (table["attribute_column"] == "income").all()
    saved = pd.read_csv(out / "sweep.csv")
    assert list(saved["name"]) == list(table["name"])
    assert json.loads((out / "sweep.json").read_text())[0]["epsilon"] == pytest.approx(table["epsilon"].iloc[0])
    for name in table["name"]:  # each point is a run directory with its report and audit
        assert {"report.json", "audit.json", "point.json", "config.yaml"} <= {p.name for p in (out / "points" / name).iterdir()}
    for png in ("accuracy", "auc", "privacy", "compute"):
        assert (out / f"{png}.png").stat().st_size > 5000


def test_a_sweep_logs_one_tracker_run_per_point(finished):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    _, out, table = finished
    client = MlflowClient(f"sqlite:///{out / 'tracking' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("dplm").experiment_id])
    by_name = {r.info.run_name: r.data.metrics for r in runs}
    assert set(by_name) == set(table["name"])
    for r in table.to_dict("records"):
        assert by_name[r["name"]]["report.accuracy"] == pytest.approx(r["accuracy"])


def test_sweep_page_renders_in_a_real_browser(finished, tmp_path):
    _, out, _ = finished
    pixels = screenshot(out / "sweep.html", tmp_path / "shot.png")
    # The DP line (matplotlib's first colour): its length follows the points' secret DP noise (0.00047 seen).
    assert share_of_color(pixels, (0x1f, 0x77, 0xb4)) > 0.0002
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200
    assert "dp-noise4-clip1" in (out / "sweep.html").read_text()


def test_a_rerun_reads_points_back_and_only_runs_new_ones(finished, data, monkeypatch):
    config, out, table = finished
    ran = []
    import dplm.experiment as sweep_module

    real = sweep_module.run_point
    monkeypatch.setattr(sweep_module, "run_point", lambda values, point, threads=None: ran.append(point["name"])
                        or real(values, point, threads))
    again = sweep(config, out, progress=False)
    assert ran == [] and list(again["epsilon"].dropna()) == list(table["epsilon"].dropna())
    wider = recipe(data, "sweep.noise_multipliers=[1.0, 4.0, 8.0]", "sweep.max_grad_norms=[1.0]",
                   "sweep.baseline_epochs=[0.1]")
    grown = sweep(wider, out, progress=False)
    assert ran == ["dp-noise8-clip1"] and len(grown) == 4
    with pytest.raises(DplmError, match="other settings .*train.learning_rate"):
        sweep(recipe(data, "train.learning_rate=0.01"), out, progress=False)


def test_a_failing_point_keeps_its_error_and_the_others_go_on(tmp_path, data):
    # With a cap of epsilon 1, noise 0.3 cannot take a single step; noise 8 can.
    config = recipe(data, "privacy.max_epsilon=1.0", "train.pretrain_rows=0", "sweep.noise_multipliers=[0.3, 8]",
                    "sweep.max_grad_norms=[1]", "sweep.baseline_epochs=[]")
    table = sweep(config, tmp_path / "s", progress=False)
    failed = table.set_index("name").loc["dp-noise0.3-clip1"]
    assert failed["error"].startswith("privacy.max_epsilon 1.0 is too small for even one step")
    assert "\n" not in failed["error"]
    assert table.set_index("name").loc["dp-noise8-clip1", "error"] is None or \
        pd.isna(table.set_index("name").loc["dp-noise8-clip1", "error"])


def test_two_workers_and_a_local_ray_cluster_give_the_same_points(tmp_path, data):
    pytest.importorskip("ray")
    config = recipe(data, "sweep.noise_multipliers=[2.0]", "sweep.max_grad_norms=[0.5, 1.0]",
                    "sweep.baseline_epochs=[]")
    by_workers = sweep(config, tmp_path / "workers", workers=2, progress=False)
    by_ray = sweep(config, tmp_path / "ray", ray_address="local", progress=False)
    for table in (by_workers, by_ray):
        assert table["error"].isna().all() and list(table["name"]) == ["dp-noise2-clip0.5", "dp-noise2-clip1"]
    # Epsilon is the accountant's for the settings and the point's DP count, wherever the point ran.
    for folder, table in (("workers", by_workers), ("ray", by_ray)):
        for r in table.to_dict("records"):
            record = json.loads((tmp_path / folder / "points" / r["name"] / "privacy.json").read_text())
            assert r["epsilon"] == pytest.approx(
                0.05 + rdp_epsilon(2.0, record["sample_rate"], r["steps"], 1e-5), rel=1e-9)


def test_cli_sweep_prints_each_point_and_a_rerun_keeps_its_grid(tmp_path, data, capsys):
    args = ["sweep", "recipes/census_sweep.yaml", f"data.source={data}", *TINY, "-o", str(tmp_path / "s")]
    assert main([*args, "--noise", "4", "--clip", "1", "--baseline-epochs", ""]) == 0
    out = capsys.readouterr().out
    assert "dp-noise4-clip1: noise 4 clip 1: epsilon" in out and "sweep: 1 of 1 points done" in out
    assert main([*args, "-q"]) == 0  # no grid flags: the folder's own grid, not the recipe's 34 points
    assert "sweep: 1 of 1 points done" in capsys.readouterr().out
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("not a sweep")
    assert main([*args[:-1], str(tmp_path / "other"), "--noise", "4", "--clip", "1"]) == 2
    assert "is not a dplm sweep" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--noise", "", "--baseline-epochs", ""], "the sweep has no points"),
    (["--noise", "1,1.0", "--clip", "1"], "the sweep grid repeats a point (dp-noise1-clip1)"),
    (["--noise", "0,1"], "sweep.noise_multipliers, sweep.max_grad_norms and sweep.baseline_epochs must hold numbers > 0"),
    (["--noise", "1]"], "is not a valid YAML value"),
    (["--noise", "a"], "config 'sweep.noise_multipliers[0]': 'a' is not a valid float"),
    (["sweep.target=nope"], "sweep.target 'nope' is not a modelled column"),
    (["audit.sensitive_column=age"], "audit.sensitive_column 'age' is integer"),
])
def test_bad_sweep_settings_are_one_line_errors_before_anything_runs(tmp_path, data, capsys, flags, message):
    code = main(["sweep", "recipes/census_sweep.yaml", f"data.source={data}", *TINY, *flags, "-o", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "s").exists()


def test_the_default_grid_is_the_seeds():
    config = load_recipe("recipes/census_sweep.yaml")
    points = grid(config)
    noises = sorted({p.noise_multiplier for p in points if p.dp})
    assert noises == [0.25, 0.5, 0.75, 1, 1.5, 2, 4, 8, 16, 32]
    assert sorted({p.max_grad_norm for p in points if p.dp}) == [0.5, 1, 2]
    assert sum(p.dp for p in points) == 30


def test_the_default_settings_worth_in_non_dp_epochs_by_hand():
    from dplm.experiment import default_summary

    rows = [{"dp": True, "noise_multiplier": 1.5, "max_grad_norm": 1.0, "epsilon": 1.19, "accuracy": 0.86,
             "train_seconds": 72.0, "error": None}]
    rows += [{"dp": False, "baseline_epochs": e, "accuracy": a, "train_seconds": 30.0 * e, "error": None}
             for e, a in ((1, 0.80), (2, 0.85), (4, 0.90))]
    assert default_summary(pd.DataFrame(rows), (1.5, 1.0)).endswith(
        "reaches accuracy 0.8600: worth 2 epoch(s) of non-DP training (0.8500), at 1.2 times their training time")
    assert default_summary(pd.DataFrame(rows), (2.0, 1.0)) is None  # the recipe's setting is not on the grid
