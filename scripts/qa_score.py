#!/usr/bin/env python
"""Score synthetic rows with the reference's own evaluator (mostlyai-qa), for docs/benchmarks.md.

Runs in the engine's environment (never dplm's: mostlyai-qa is not a dependency):

    ENV/bin/python scripts/qa_score.py --train TRAIN.csv --holdout HOLDOUT.csv --synthetic SYN.csv --out DIR
        [--key SUBJECT_COLUMN]

Writes DIR/qa.json with the metrics mostlyai-qa's `report` returns (accuracy, similarity,
distances) and its HTML report beside it. With `--key` the tables are event tables of subjects
(mostlyai-qa's `tgt_context_key`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("train", "holdout", "synthetic", "out"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--key", help="subject column: sequential data")
    args = parser.parse_args()
    from mostlyai import qa

    qa.init_logging()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    frames = {name: pd.read_csv(getattr(args, name)) for name in ("train", "holdout", "synthetic")}
    extra = {"tgt_context_key": args.key} if args.key else {}
    _, metrics = qa.report(syn_tgt_data=frames["synthetic"], trn_tgt_data=frames["train"],
                           hol_tgt_data=frames["holdout"], report_path=out / "qa.html", **extra)
    result = metrics.model_dump(mode="json") if hasattr(metrics, "model_dump") else metrics
    (out / "qa.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
