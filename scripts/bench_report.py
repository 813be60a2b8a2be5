"""Time the model report on the census benchmark split (39,074 training, 9,768 holdout and
9,768 "synthetic" rows) and print its numbers for calibration:

* the holdout scored as if it were synthetic (the report's reference column),
* a table whose columns are shuffled independently (each column's values permuted),
* optionally a CSV of real synthetic rows (--synthetic FILE).

    .venv/bin/python scripts/bench_report.py [--synthetic runs/census_dp/synthetic.csv]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd

from dplm.datasets import load_census
from dplm.report import write_report

KEYS = [("accuracy overall", ("accuracy", "overall")), ("accuracy univariate", ("accuracy", "univariate")),
        ("accuracy bivariate", ("accuracy", "bivariate")), ("accuracy trivariate", ("accuracy", "trivariate")),
        ("centroid similarity", ("embedding", "centroid_similarity")),
        ("discriminator AUC", ("embedding", "discriminator_auc")), ("DCR share", ("privacy", "dcr_share")),
        ("exact copies", ("privacy", "exact_copies_of_training_rows"))]


def pick(metrics: dict, which: str, path: tuple) -> float:
    section = metrics[path[0]]
    return section[path[1]][which] if path[0] == "embedding" else section[which][path[1]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic", help="CSV of synthetic census rows to score as well")
    parser.add_argument("--out", default="runs/bench_report")
    args = parser.parse_args()
    census = load_census()
    order = np.random.default_rng(0).permutation(len(census))
    train, holdout = census.iloc[order[:39074]], census.iloc[order[39074:]]
    rng = np.random.default_rng(1)
    cases = {"shuffled columns": pd.DataFrame({c: holdout[c].to_numpy()[rng.permutation(len(holdout))]
                                              for c in holdout.columns})}
    if args.synthetic:
        cases["synthetic file"] = pd.read_csv(args.synthetic)[list(census.columns)]
    results = {}
    for name, fake in cases.items():
        start = time.perf_counter()
        _, json_path = write_report(train, holdout, fake, Path(args.out) / name.replace(" ", "_"), target="income")
        seconds = time.perf_counter() - start
        results[name] = json.loads(json_path.read_text())
        results[name]["wall_seconds"] = seconds
    first = next(iter(results.values()))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; rows: {first['rows']}")
    header = ["metric", "holdout as synthetic"] + list(results)
    print(" | ".join(header))
    for label, path in KEYS:
        row = [label, pick(first, "holdout", path)] + [pick(m, "synthetic", path) for m in results.values()]
        print(" | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row))
    for name, m in results.items():
        u = m["utility"]
        print(f"{name}: TSTR accuracy {u['tstr']['accuracy']:.4f} AUC {u['tstr']['roc_auc'] or float('nan'):.4f}; "
              f"TRTR accuracy {u['trtr']['accuracy']:.4f} AUC {u['trtr']['roc_auc']:.4f}; "
              f"report runtime {m['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
