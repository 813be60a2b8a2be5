import json

import pytest

import dplm
from dplm.config import RunConfig, from_dict
from dplm.report import report_run


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, census):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("tracked")
    census.iloc[:600].to_csv(root / "census.csv", index=False)
    config = from_dict(RunConfig, {
        "output_dir": str(root / "runs" / "tiny"), "data": {"source": str(root / "census.csv"),
                                                           "schema": "recipes/census_schema.yaml"},
        "model": {"base": "tiny-random"},
        "train": {"batch_size": 32, "micro_batch_size": 32, "max_steps": 4, "report_to": ["tensorboard", "mlflow"]},
        "privacy": {"enabled": True, "noise_multiplier": 1.0},
    })
    synth = dplm.fit(config=config, progress=False)
    run_dir = synth.save(config.output_dir, synthetic=synth.sample(60, progress=False))
    report_run(run_dir, target="income", progress=False)
    return root, run_dir


def test_mlflow_holds_each_steps_loss_and_epsilon_and_the_reports_scores(tracked_run):
    from mlflow.tracking import MlflowClient

    root, run_dir = tracked_run
    client = MlflowClient(f"sqlite:///{root / 'runs' / 'tracking' / 'mlflow.db'}")
    run_id = json.loads((run_dir / "tracking.json").read_text())["mlflow"]
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    losses = client.get_metric_history(run_id, "loss")
    assert [m.step for m in losses] == [1, 2, 3, 4]
    assert [m.value for m in losses] == pytest.approx([e["loss"] for e in log])
    assert client.get_metric_history(run_id, "epsilon")[-1].value == pytest.approx(log[-1]["epsilon"])
    report = json.loads((run_dir / "report.json").read_text())
    scores = client.get_run(run_id).data.metrics
    assert scores["report.accuracy"] == pytest.approx(report["accuracy"]["synthetic"]["overall"])
    assert scores["report.tstr_accuracy"] == pytest.approx(report["utility"]["tstr"]["accuracy"])
    params = client.get_run(run_id).data.params
    assert params["privacy.noise_multiplier"] == "1.0" and client.get_run(run_id).info.run_name == "tiny"


def test_tensorboard_holds_the_same_scalars(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, run_dir = tracked_run
    scalars = {}
    for events in (root / "runs" / "tracking" / "tensorboard" / "tiny").glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars[tag] = [e.value for e in accumulator.Scalars(tag)]
    assert len(scalars["loss"]) == 4 and len(scalars["rows_per_s"]) == 4
    report = json.loads((run_dir / "report.json").read_text())
    assert scalars["report.discriminator_auc"] == pytest.approx([report["embedding"]["discriminator_auc"]["synthetic"]])


def test_a_tracker_that_is_not_installed_is_a_one_line_error(monkeypatch):
    import importlib.util

    from dplm.tracking import Trackers

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    config = from_dict(RunConfig, {"train": {"report_to": ["mlflow"]}})
    with pytest.raises(dplm.DplmError, match=r"pip install 'dplm\[mlflow\]'"):
        Trackers(config)
    with pytest.raises(dplm.DplmError, match="train.report_to: .*wandb.* unknown tracker"):
        from_dict(RunConfig, {"train": {"report_to": ["wandb"]}}).validate()


def test_tensorboard_alone_gets_the_reports_scores_too(tmp_path, census):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    census.iloc[:300].to_csv(tmp_path / "census.csv", index=False)
    config = from_dict(RunConfig, {
        "output_dir": str(tmp_path / "runs" / "tb"), "data": {"source": str(tmp_path / "census.csv"),
                                                             "schema": "recipes/census_schema.yaml"},
        "model": {"base": "tiny-random"}, "train": {"batch_size": 32, "max_steps": 2, "report_to": ["tensorboard"]}})
    synth = dplm.fit(config=config, progress=False)
    run_dir = synth.save(config.output_dir, synthetic=synth.sample(40, progress=False))
    assert json.loads((run_dir / "tracking.json").read_text()) == {"tensorboard": "tb"}
    report_run(run_dir, target="income", progress=False)
    tags = set()
    for events in (tmp_path / "runs" / "tracking" / "tensorboard" / "tb").glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert {"loss", "lr", "report.accuracy", "report.tstr_accuracy"} <= tags
