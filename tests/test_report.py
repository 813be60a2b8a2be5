import json
import os
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dplm.cli import main
from dplm.report import write_report
from test_evaluate import shuffled


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium not installed (apt-get install chromium)")
    return path


def screenshot(html_path, png_path):
    subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--hide-scrollbars", f"--user-data-dir={png_path.parent / 'profile'}", "--window-size=1200,5000",
                    f"--screenshot={png_path}", html_path.as_uri()], check=True, capture_output=True, timeout=120)
    return np.asarray(Image.open(png_path).convert("RGB")).astype(int)


def share_of_color(pixels, rgb, tolerance=12) -> float:
    return float((np.abs(pixels - np.array(rgb)).max(axis=2) <= tolerance).mean())


def test_report_renders_in_a_real_browser(tmp_path, census):
    order = np.random.default_rng(1).permutation(len(census))
    train, holdout = census.iloc[order[:2000]], census.iloc[order[2000:2300]]
    synthetic = shuffled(census.iloc[order[2300:2600]])
    log = [{"step": s, "loss": 3 - s / 10, "epsilon": 0.1 * s} for s in range(1, 11)]
    html_path, json_path = write_report(train, holdout, synthetic, tmp_path, target="income",
                                        run_info={"summary": {"epsilon": 1.0, "steps": 10}, "log": log})
    metrics = json.loads(json_path.read_text())
    assert metrics["accuracy"]["holdout"]["overall"] > metrics["accuracy"]["synthetic"]["overall"]
    # The shuffled-columns floor: marginals kept, dependencies gone (scores like the shuffled rows).
    acc = metrics["accuracy"]
    assert acc["shuffled"]["univariate"] > acc["shuffled"]["bivariate"] and acc["holdout"]["overall"] > acc["shuffled"]["overall"]
    assert abs(acc["shuffled"]["overall"] - acc["synthetic"]["overall"]) < 0.02
    rules = metrics["rules"]
    assert [r["columns"] for r in rules["rules"]] == [["education", "education_num"], ["capital_gain", "capital_loss"]]
    assert rules["holdout"]["all_rules"] == 1.0 and rules["synthetic"]["all_rules"] < 0.95
    assert set(metrics["utility"]) >= {"tstr", "trtr"} and metrics["run"]["steps"] == 10
    assert "potion-base-8M" in metrics["yardstick"] and "Not mostlyai-qa 1.10" in html_path.read_text()
    pixels = screenshot(html_path, tmp_path / "shot.png")
    # The charts draw real data in blue (#1f77b4) and synthetic in orange (#ff7f0e): a page whose
    # images failed to render would show neither.
    assert share_of_color(pixels, (0x1f, 0x77, 0xb4)) > 0.002
    assert share_of_color(pixels, (0xff, 0x7f, 0x0e)) > 0.002
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, census):
    root = tmp_path_factory.mktemp("reportrun")
    census.iloc[:1500].to_csv(root / "data.csv", index=False)
    code = main(["train", "recipes/census.yaml", f"output_dir={root / 'run'}", "output_csv=null",
                 f"data.source={root / 'data.csv'}", "model.base=tiny-random", "train.max_steps=2",
                 "train.max_training_time=null", "train.batch_size=8", "sample.num_rows=40", "-q"])
    assert code == 0
    return root / "run"


def test_cli_report_on_a_run(run_dir, capsys):
    assert main(["report", str(run_dir), "--target", "income", "-q"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and (run_dir / "report.html").exists()
    metrics = json.loads((run_dir / "report.json").read_text())
    split = json.loads((run_dir / "split.json").read_text())  # ~80 / 20 of the 1,500 rows
    assert metrics["rows"] == {"training": len(split["train"]), "holdout": len(split["holdout"]), "synthetic": 40}
    assert len(split["train"]) + len(split["holdout"]) == 1500 and 250 < len(split["holdout"]) < 350
    assert metrics["run"]["steps"] == 2


@pytest.mark.parametrize("args,message", [
    (["--target", "salary"], "target column 'salary' is not in the table"),
    (["--synthetic", "/no/such.csv"], "synthetic file '/no/such.csv' not found"),
])
def test_cli_report_bad_input(run_dir, capsys, args, message):
    assert main(["report", str(run_dir), "-q", "-o", str(run_dir / "bad"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (run_dir / "bad" / "report.html").exists()


def test_cli_report_bad_synthetic_files(run_dir, tmp_path, capsys):
    pd.DataFrame({"age": [30]}).to_csv(tmp_path / "narrow.csv", index=False)
    assert main(["report", str(run_dir), "-q", "--synthetic", str(tmp_path / "narrow.csv")]) == 2
    assert "lacks column(s)" in capsys.readouterr().err
    pd.read_csv(run_dir / "synthetic.csv").iloc[:0].to_csv(tmp_path / "empty.csv", index=False)
    assert main(["report", str(run_dir), "-q", "--synthetic", str(tmp_path / "empty.csv")]) == 2
    assert "empty.csv' is empty" in capsys.readouterr().err
