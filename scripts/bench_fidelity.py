#!/usr/bin/env python
"""Fidelity benchmark: train a recipe, sample rows, score them; one row of docs/benchmarks.md.

    .venv/bin/python scripts/bench_fidelity.py RECIPE [section.key=value ...] --out DIR [--rows N]

Trains RECIPE (with the overrides) on its data's training split, samples N rows (default
9,768, the census benchmark holdout's size) into DIR/synthetic.csv (a recipe of histories,
`data.subject`: as many subjects as the holdout has, or `--subjects N`, their event table with
the subject key in DIR/synthetic.csv and their own columns beside it), scores them against the
training and holdout rows into DIR/report.json and DIR/report.html (`dplm report`), and
prints the scores, the epsilon and the compute; a recipe with text columns also gets its table part
at the holdout's size (the table model's rows alone, as `bench_tables` scores a table without text).
The run directory is DIR/run; DIR/bench.json
holds the printed figures. Run one at a time: two CPU-heavy jobs on 2 cores skew both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    parser.add_argument("--out", required=True, help="folder for the run, the rows and the report")
    parser.add_argument("--rows", type=int, default=9768, help="synthetic rows to sample and score")
    parser.add_argument("--subjects", type=int, help="histories: synthetic subjects (default: the holdout's)")
    parser.add_argument("--target", default="income", help="column for the TSTR score (skipped if absent); a "
                                                           "categorical one is also what text columns predict")
    args = parser.parse_intermixed_args()

    import torch

    from dplm.config import load_recipe
    from dplm.report import report_run
    from dplm.synthesizer import Synthesizer

    out = Path(args.out)
    config = load_recipe(args.recipe, [*args.overrides, f"output_dir={out / 'run'}", "output_csv=null"])
    started = time.perf_counter()
    synth = Synthesizer.fit(config=config, progress=False)
    fit_seconds = time.perf_counter() - started
    count = args.rows
    if synth.is_history:  # as many subjects as the holdout has
        from dplm.data import load_table

        key = config.data.subject
        count = args.subjects or load_table(config.data.source).iloc[synth.split["holdout"]][key].nunique()
    start = time.perf_counter()
    rows = synth.sample(count, progress=False)
    sample_seconds = time.perf_counter() - start
    run_dir = synth.save(out / "run", synthetic=rows)
    if synth.is_history:
        rows.write(out / "synthetic.csv")
    else:
        rows.to_csv(out / "synthetic.csv", index=False)
    target = args.target if args.target in synth.schema.names else None
    _, json_path = report_run(run_dir, synthetic=out / "synthetic.csv", target=target, out_dir=out, progress=False)
    scores = json.loads(json_path.read_text())
    table_part = table_part_at_holdout_size(synth, config) if synth.text_models else None
    t, p, stats = synth.training, synth.privacy_record, synth.last_sample_stats
    acc = scores["accuracy"]["synthetic"]
    result = {
        "recipe": args.recipe, "overrides": args.overrides, "rows": len(rows),
        "accuracy": {k: acc[k] for k in ("overall", "univariate", "bivariate", "trivariate")},
        "holdout_accuracy": scores["accuracy"]["holdout"]["overall"],
        "table_part_at_holdout_size": table_part,
        "discriminator_auc": scores["embedding"]["discriminator_auc"]["synthetic"],
        "dcr_share": scores["privacy"]["synthetic"]["dcr_share"],
        "tstr_accuracy": scores.get("utility", {}).get("tstr", {}).get("accuracy"),
        "trtr_accuracy": scores.get("utility", {}).get("trtr", {}).get("accuracy"),
        "epsilon": p.get("epsilon"), "delta": p.get("delta"), "accountant": p.get("accountant"),
        "steps": t.steps, "epochs": t.epochs, "train_seconds": t.seconds, "train_rows_per_s": t.rows_per_second,
        "fit_seconds": fit_seconds, "sample_seconds": sample_seconds, "sample_rows_per_s": len(rows) / sample_seconds,
        "text_models": [{"column": m.column, "steps": m.training.steps, "seconds": m.training.seconds,
                         "rows_per_s": m.training.rows_per_second} for m in synth.text_models],
        "valid_rate": stats.valid_rate,
        "text": scores.get("text", {}),
        "histories": scores.get("histories"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                   f"torch {torch.__version__}",
    }
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    a = result["accuracy"]
    eps = "no DP" if result["epsilon"] is None else f"epsilon {result['epsilon']:.3f} ({result['accountant']})"
    tstr = "" if result["tstr_accuracy"] is None else \
        f", TSTR {result['tstr_accuracy']:.3f} (real {result['trtr_accuracy']:.3f})"
    def figure(value) -> str:  # a table of one or two non-text columns has no bi- or trivariate figure
        return "-" if value is None else f"{value:.4f}"

    print(f"{args.recipe} {' '.join(args.overrides)}\n"
          f"accuracy {figure(a['overall'])} (uni {figure(a['univariate'])}, bi {figure(a['bivariate'])}, "
          f"tri {figure(a['trivariate'])}; "
          f"holdout {result['holdout_accuracy']:.4f}), discriminator AUC {result['discriminator_auc']:.3f}, "
          f"DCR share {result['dcr_share']:.3f}{tstr}; {eps}\n"
          f"training {t.steps} steps, {t.epochs:.2f} epochs, {t.seconds:.0f} s ({t.rows_per_second:.1f} rows/s)"
          + "".join(f", text model '{m.column}' {m.training.steps} steps, {m.training.seconds:.0f} s "
                    f"({m.training.rows_per_second:.1f} rows/s)" for m in synth.text_models) + "; "
          f"sampling {len(rows)} rows in {sample_seconds:.0f} s ({result['sample_rows_per_s']:.1f} rows/s); "
          f"fit {fit_seconds:.0f} s in all")
    if table_part:
        print(f"table part at the holdout's size ({table_part['rows']:,} rows of the table model alone, its columns "
              f"only): {table_part['synthetic']:.4f} (holdout {table_part['holdout']:.4f}, shuffled "
              f"{table_part['shuffled']:.4f})")
    h = result["histories"]
    if h:
        syn, hol = h["synthetic"], h["holdout"]
        print(f"histories: {h['subjects']['synthetic']} subjects; overall {syn['overall']:.4f} (holdout {hol['overall']:.4f}), "
              f"coherence {syn['coherence']:.4f} ({hol['coherence']:.4f}), discriminator AUC {syn['discriminator_auc']:.3f} "
              f"({hol['discriminator_auc']:.3f}), rows per subject {syn['mean_rows_per_subject']:.2f} (training "
              f"{h['mean_rows_per_subject_training']:.2f}), copies {syn['copied_subject_share']:.3f} "
              f"({hol['copied_subject_share']:.3f})")
        print("per subject: " + ", ".join(f"{c} {v:.4f} ({hol['per_subject'][c]:.4f})" for c, v in syn["per_subject"].items()))
    for column, text in result["text"].items():
        if "note" in text:
            print(f"text '{column}': {text['note']}")
            continue
        syn, ref = text["synthetic"], text["holdout"]
        context = f", '{text['context']}' from the text {syn['context_accuracy']:.3f} (real {ref['context_accuracy']:.3f}, " \
                  f"majority {text['context_majority_share']:.3f})" if text.get("context") else ""
        print(f"text '{column}': discriminator AUC {syn['discriminator_auc']:.3f} (real {ref['discriminator_auc']:.3f})"
              f"{context}, verbatim training texts {syn['verbatim_training_share']:.3f} (holdout "
              f"{ref['verbatim_training_share']:.3f}), length accuracy {syn['length_accuracy']:.3f}, known words "
              f"{syn['known_word_share']:.3f} (real {ref['known_word_share']:.3f})")
    return 0


def table_part_at_holdout_size(synth, config) -> dict:
    """A text run's table part as the tables' benchmarks score it (`bench_tables`: as many rows as the
    holdout has, so sampling noise is the holdout's): the table model's rows alone, its columns only."""
    from dplm.data import load_table
    from dplm.evaluate import Binner, accuracy, align_types, shuffled_columns

    schema = synth.table_schema
    names = [n for n in schema.output_order or schema.names if n in schema.names]
    table = load_table(config.data.source)
    train = align_types(table.iloc[synth.split["train"]], schema)[names]
    holdout = align_types(table.iloc[synth.split["holdout"]], schema)[names]
    rows = synth.sample_table(len(holdout), config.sample.seed, config.sample.temperature, False, None)
    binner = Binner(train)
    return {"rows": len(holdout), **{name: accuracy(train, df, binner)["overall"] for name, df in (
        ("synthetic", align_types(rows, schema)[names]), ("holdout", holdout),
        ("shuffled", shuffled_columns(train, len(holdout))))}}


if __name__ == "__main__":
    sys.exit(main())
