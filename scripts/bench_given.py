#!/usr/bin/env python
"""Conditional generation: given the holdout's values of some columns, how close are the
completed rows to real ones, and at what speed?

    .venv/bin/python scripts/bench_given.py RUN_DIR --given sex,race [--candidates 1,16] [--out FILE]

Samples one row per holdout row of RUN_DIR's data, keeping its `--given` columns
(`synth.sample(given=...)`), once per candidate count (`sample.given_candidates`; 1 pastes
the given values in without weighting), and scores each set like `dplm report`'s accuracy
against the training rows; also the bivariate accuracy of every (given, free) column pair,
where pasting values in without conditioning shows (a 'Husband' who is 'Female'). The run's
own unconditional synthetic.csv and the holdout are scored the same way for reference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--given", required=True, help="comma-separated columns to give")
    parser.add_argument("--candidates", default="1,16", help="comma-separated particle counts to compare")
    parser.add_argument("--out", help="JSON file for the figures")
    args = parser.parse_args()

    import pandas as pd

    from dplm.data import load_table
    from dplm.evaluate import Binner, accuracy
    from dplm.evaluate import align_types
    from dplm.synthesizer import Synthesizer

    synth = Synthesizer.load(args.run_dir)
    schema, given_columns = synth.schema, args.given.split(",")
    table = load_table(synth.config.data.source)
    train = align_types(table.iloc[synth.split["train"]], schema)
    holdout = align_types(table.iloc[synth.split["holdout"]], schema)
    binner = Binner(train)
    pairs = [f"{a} × {b}" if schema.names.index(a) < schema.names.index(b) else f"{b} × {a}"
             for a in given_columns for b in schema.names if b not in given_columns]

    def score(df) -> dict:
        acc = accuracy(train, df, binner)
        return {"overall": acc["overall"], "given_free_pairs": sum(acc["per_pair"][p] for p in pairs) / len(pairs)}

    result = {"given": given_columns, "rows": len(holdout), "holdout": score(holdout)}
    unconditional = pd.read_csv(f"{args.run_dir}/synthetic.csv")
    result["unconditional"] = score(align_types(unconditional[schema.names], schema))
    for candidates in map(int, args.candidates.split(",")):
        synth.config.sample.given_candidates = candidates
        start = time.perf_counter()
        rows = synth.sample(given=holdout[given_columns], progress=False)
        seconds = time.perf_counter() - start
        kept = align_types(rows, schema)[given_columns].fillna("<missing>").astype(str)
        assert kept.equals(holdout[given_columns].fillna("<missing>").astype(str)), "given values changed"
        result[f"candidates_{candidates}"] = {**score(align_types(rows, schema)), "seconds": seconds,
                                              "rows_per_s": len(rows) / seconds}
    for name, r in result.items():
        if isinstance(r, dict):
            extra = f", {r['rows_per_s']:.0f} rows/s" if "rows_per_s" in r else ""
            print(f"{name}: accuracy {r['overall']:.4f}, (given, free) pairs {r['given_free_pairs']:.4f}{extra}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
