#!/usr/bin/env python
"""The reference engine (mostlyai-engine) on a training table, for side-by-side benchmarks.

Runs in the engine's own environment (never dplm's: the engine is not a dependency):

    ENV/bin/python scripts/engine_run.py --train TRAIN.csv --rows N --out DIR [--dp-epsilon E]
        [--minutes M] [--subject KEY [--subjects SUBJECTS.csv --subject-key KEY] | --text-columns COL [COL ...]]

Trains the engine with its defaults (TABULAR model, flexible generation, early stopping on its
own validation split; with `--dp-epsilon` its DP-SGD with noise 1.5, clip 1.0, the total epsilon
of training and value protection capped at E), generates N rows (or, with `--subject`, N
subjects with their sequences) into DIR/synthetic.csv, and writes DIR/engine.json with the
seconds and the epsilon the engine reports. Install: see ../shared/ENVIRONMENT.md.

With `--text-columns`, text beside tabular columns as the engine's docs have it: a TABULAR model on
the other columns (DIR/workspace), then a LANGUAGE model (LANGUAGE_TEXT encoding, its default
model MOSTLY_AI/LSTMFromScratch-3m, trained from scratch, no download) on the text columns with
the tabular columns as its context (DIR/workspace-text); the texts are generated for the
generated tabular rows. `--minutes` limits each model's training (so up to 2M in all). Under DP
each model gets half: a cap of E/2 with half the engine's default value protection (0.5 of
its 1.0; the text model spends its part on the context columns too), so the two totals add up
to at most E; engine.json has each model's epsilon and train seconds (`tabular`, `text`) and
their sums (`epsilon`, `train_seconds`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

KEY = "engine_row_key"  # the key joining the text model's rows to their tabular context


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", required=True, help="CSV of the training rows")
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", type=int, required=True, help="rows (or subjects) to generate")
    parser.add_argument("--dp-epsilon", type=float, help="train with DP, total epsilon capped here")
    parser.add_argument("--minutes", type=float, default=None,
                        help="training time limit of each model (default: the engine's)")
    parser.add_argument("--subject", help="event table's subject column: a sequential model (tgt_context_key)")
    parser.add_argument("--subjects", help="CSV of the subject table (context), keyed by --subject-key")
    parser.add_argument("--subject-key", help="the subject table's key column")
    parser.add_argument("--text-columns", nargs="+", help="free-text columns: a LANGUAGE model given the others")
    args = parser.parse_args()
    if args.text_columns and args.subject:
        parser.error("--text-columns is for flat tables only (not with --subject)")

    import torch

    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.text_columns:
        return run_with_text(args, out)
    tgt = pd.read_csv(args.train)
    ctx = pd.read_csv(args.subjects) if args.subjects else None
    if args.subject and ctx is None:  # the engine's sequential model needs a context table of the subjects
        ctx = pd.DataFrame({args.subject: tgt[args.subject].drop_duplicates().to_numpy()})
    key = args.subject_key or args.subject
    start = time.perf_counter()
    workspace = out / "workspace"
    fit(workspace, tgt, ctx, args.subject, key if ctx is not None else None, "TABULAR", None,
        dp_config(args.dp_epsilon), args.minutes)
    train_seconds = time.perf_counter() - start
    if ctx is not None:  # fresh subjects: as many context rows as asked, with new keys
        fresh = ctx.sample(n=args.rows, replace=args.rows > len(ctx), random_state=0).reset_index(drop=True)
        fresh[key] = [f"s{i}" for i in range(args.rows)]
        rows = generated(workspace, ctx_data=fresh)
    else:
        rows = generated(workspace, sample_size=args.rows)
    rows.to_csv(out / "synthetic.csv", index=False)
    info = {"train_seconds": train_seconds, "seconds": time.perf_counter() - start, "rows": len(rows),
            "dp_epsilon_cap": args.dp_epsilon, **progress(workspace, args.dp_epsilon)}
    (out / "engine.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info))


def run_with_text(args, out: Path) -> None:
    """A TABULAR model on the other columns, then a LANGUAGE model on the text columns given them."""
    data = pd.read_csv(args.train)
    texts = list(args.text_columns)
    tabular = [c for c in data.columns if c not in texts]
    data[KEY] = range(len(data))
    half = args.dp_epsilon / 2 if args.dp_epsilon else None
    start = time.perf_counter()
    models = {}
    t0 = time.perf_counter()
    fit(out / "workspace", data[tabular], None, None, None, "TABULAR", None, dp_config(half, 0.5), args.minutes)
    models["tabular"] = {"train_seconds": time.perf_counter() - t0, **progress(out / "workspace", half)}
    t0 = time.perf_counter()
    fit(out / "workspace-text", data[[KEY, *texts]], data[[KEY, *tabular]], KEY, KEY, "LANGUAGE",
        dict.fromkeys(texts, "LANGUAGE_TEXT"), dp_config(half, 0.5), args.minutes)
    models["text"] = {"train_seconds": time.perf_counter() - t0, **progress(out / "workspace-text", half)}
    train_seconds = time.perf_counter() - start
    rows = generated(out / "workspace", sample_size=args.rows)
    rows[KEY] = range(len(rows))  # fresh keys: the generated rows are the texts' context
    written = generated(out / "workspace-text", ctx_data=rows)
    rows = rows.merge(written, on=KEY, how="left")[list(data.columns.drop(KEY))]
    rows.to_csv(out / "synthetic.csv", index=False)
    eps = [m.get("epsilon") for m in models.values()]
    info = {"train_seconds": train_seconds, "seconds": time.perf_counter() - start, "rows": len(rows),
            "dp_epsilon_cap": args.dp_epsilon, "dp_epsilon_cap_per_model": half, "text_columns": texts,
            "epsilon": sum(eps) if half and None not in eps else None, **models}
    (out / "engine.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info))


def dp_config(epsilon: float | None, value_protection: float = 1.0):
    """The engine's DP config capped at `epsilon` (None without DP): noise 1.5, clip 1.0, value protection."""
    if not epsilon:
        return None
    from mostlyai.engine.domain import DifferentialPrivacyConfig

    return DifferentialPrivacyConfig(max_epsilon=epsilon, noise_multiplier=1.5, max_grad_norm=1.0,
                                     value_protection_epsilon=value_protection)


def fit(workspace: Path, tgt, ctx, context_key, ctx_key, model_type: str, encodings, dp, minutes) -> None:
    """Split, analyze, encode and train one engine model in its own workspace."""
    from mostlyai import engine

    engine.split(tgt_data=tgt, ctx_data=ctx, tgt_context_key=context_key, ctx_primary_key=ctx_key,
                 model_type=model_type, tgt_encoding_types=encodings, workspace_dir=workspace)
    engine.analyze(differential_privacy=dp, workspace_dir=workspace)
    engine.encode(workspace_dir=workspace)
    limit = {"max_training_time": minutes} if minutes else {}
    engine.train(differential_privacy=dp, workspace_dir=workspace, **limit)


def generated(workspace: Path, **how) -> pd.DataFrame:
    """Generate with the workspace's model (`sample_size=` or `ctx_data=`); the rows it wrote."""
    from mostlyai import engine

    engine.generate(workspace_dir=workspace, **how)
    return pd.concat([pd.read_parquet(p) for p in sorted((workspace / "SyntheticData").rglob("*.parquet"))],
                     ignore_index=True)


def progress(workspace: Path, cap: float | None) -> dict:
    """Epochs and epsilon from the engine's log: the largest within the cap (its weights are the last ones
    within it); if none was, the engine keeps the weights it stopped with: their epsilon, with `over_cap`."""
    path = workspace / "ModelStore" / "model-data" / "progress-messages.csv"
    if not path.exists():
        return {}
    log = pd.read_csv(path)
    info = {"epochs": float(log["epoch"].max()) if "epoch" in log else None}
    if cap and "dp_eps" in log and log["dp_eps"].notna().any():
        eps = log["dp_eps"].dropna()
        if (eps <= cap).any():
            info["epsilon"] = float(eps[eps <= cap].max())
        else:
            info.update(epsilon=float(eps.iloc[-1]), over_cap=True)
    return info


if __name__ == "__main__":
    main()
