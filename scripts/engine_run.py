#!/usr/bin/env python
"""The reference engine (mostlyai-engine) on a training table, for side-by-side benchmarks.

Runs in the engine's own environment (never dplm's: the engine is not a dependency):

    ENV/bin/python scripts/engine_run.py --train TRAIN.csv --rows N --out DIR [--dp-epsilon E]
        [--minutes M] [--subject KEY [--subjects SUBJECTS.csv --subject-key KEY]]

Trains the engine with its defaults (TABULAR model, flexible generation, early stopping on its
own validation split; with `--dp-epsilon` its DP-SGD with noise 1.5, clip 1.0, the total epsilon
of training and value protection capped at E), generates N rows (or, with `--subject`, N
subjects with their sequences) into DIR/synthetic.csv, and writes DIR/engine.json with the
seconds and the epsilon the engine reports. Install: see ../shared/ENVIRONMENT.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", required=True, help="CSV of the training rows")
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", type=int, required=True, help="rows (or subjects) to generate")
    parser.add_argument("--dp-epsilon", type=float, help="train with DP, total epsilon capped here")
    parser.add_argument("--minutes", type=float, default=None, help="training time limit (default: the engine's)")
    parser.add_argument("--subject", help="event table's subject column: a sequential model (tgt_context_key)")
    parser.add_argument("--subjects", help="CSV of the subject table (context), keyed by --subject-key")
    parser.add_argument("--subject-key", help="the subject table's key column")
    args = parser.parse_args()

    import torch
    from mostlyai import engine
    from mostlyai.engine.domain import DifferentialPrivacyConfig

    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workspace = out / "workspace"
    tgt = pd.read_csv(args.train)
    ctx = pd.read_csv(args.subjects) if args.subjects else None
    if args.subject and ctx is None:  # the engine's sequential model needs a context table of the subjects
        ctx = pd.DataFrame({args.subject: tgt[args.subject].drop_duplicates().to_numpy()})
    key = args.subject_key or args.subject
    dp = None
    if args.dp_epsilon:
        dp = DifferentialPrivacyConfig(max_epsilon=args.dp_epsilon, noise_multiplier=1.5, max_grad_norm=1.0)
    start = time.perf_counter()
    engine.split(tgt_data=tgt, ctx_data=ctx, tgt_context_key=args.subject, ctx_primary_key=key if ctx is not None else None,
                 model_type="TABULAR", workspace_dir=workspace)
    engine.analyze(differential_privacy=dp, workspace_dir=workspace)
    engine.encode(workspace_dir=workspace)
    limit = {"max_training_time": args.minutes} if args.minutes else {}
    engine.train(differential_privacy=dp, workspace_dir=workspace, **limit)
    train_seconds = time.perf_counter() - start
    if ctx is not None:  # fresh subjects: as many context rows as asked, with new keys
        fresh = ctx.sample(n=args.rows, replace=args.rows > len(ctx), random_state=0).reset_index(drop=True)
        fresh[key] = [f"s{i}" for i in range(args.rows)]
        engine.generate(ctx_data=fresh, workspace_dir=workspace)
    else:
        engine.generate(sample_size=args.rows, workspace_dir=workspace)
    rows = pd.concat([pd.read_parquet(p) for p in sorted((workspace / "SyntheticData").rglob("*.parquet"))],
                     ignore_index=True)
    rows.to_csv(out / "synthetic.csv", index=False)
    info = {"train_seconds": train_seconds, "seconds": time.perf_counter() - start, "rows": len(rows),
            "dp_epsilon_cap": args.dp_epsilon}
    progress = workspace / "ModelStore" / "model-data" / "progress-messages.csv"
    if progress.exists():
        log = pd.read_csv(progress)
        info["epochs"] = float(log["epoch"].max()) if "epoch" in log else None
        if "dp_eps" in log and log["dp_eps"].notna().any():
            # The engine keeps the last weights whose total (training + value protection) is within the cap.
            eps = log["dp_eps"].dropna()
            info["epsilon"] = float(eps[eps <= args.dp_epsilon].max()) if (eps <= args.dp_epsilon).any() else None
    (out / "engine.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info))


if __name__ == "__main__":
    main()
