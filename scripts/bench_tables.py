#!/usr/bin/env python
"""dplm's defaults on every development table, DP and not, beside the reference engine.

    .venv/bin/python scripts/bench_tables.py --out DIR [--tables census,german,diamonds,london]
        [--systems dplm,engine] [--modes dp,nodp] [--epsilon 2.5] [--engine-python ENV/bin/python]
        [--set section.key=value ...] [--rows N] [--rescore | --resample]

For each table (scripts/dev_tables.py: its schema from the public codebook, nothing else) it
splits 80/20 by the benchmark protocol (`dev_tables.protocol_split`), trains dplm on the training rows with
the defaults only (the schema; under DP `privacy.enabled` and `privacy.max_epsilon`), samples
as many rows as the holdout has (at most `--rows`), and scores them with `dplm report` (DIR/TABLE/SYSTEM-MODE/
report.json). The engine (mostlyai-engine, in its own environment: `--engine-python`) trains on
the same training rows with its defaults, DP at the same total epsilon. Finished cells are read
back, so a rerun only runs what is missing (`--rescore` scores them again, `--resample` draws
dplm's rows again from the saved model first). Prints one table: accuracy, discriminator AUC, TSTR
on the table's target, rule consistency, epsilon and seconds, beside the holdout and the
shuffled-columns floor. Run one at a time: two CPU-heavy jobs on 2 cores skew both.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from dev_tables import ROOT, TABLES, protocol_split


def split(table):
    """The table's training and holdout rows by the benchmark protocol (by subject for histories)."""
    return protocol_split(table.load(), table.subject)


def run_dplm(table, train, holdout, dp: bool, epsilon: float, overrides: list[str], out: Path, rows: int) -> dict:
    from dplm.config import RunConfig, apply_overrides, from_dict
    from dplm.synthesizer import Synthesizer

    # dplm trains on the protocol's training rows, all of them (its report here uses the protocol's holdout)
    values = {"data": {"schema": str(table.schema_path), "source": None, "holdout_fraction": 0.0}}
    if table.subject:
        values["data"].update(subject=table.subject, order_by=table.order_by)
    if dp:
        values["privacy"] = {"enabled": True, "max_epsilon": epsilon}
    config = from_dict(RunConfig, apply_overrides(values, overrides))
    start = time.perf_counter()
    synth = Synthesizer.fit(train, config, progress=False)
    synthetic = synth.sample(rows, progress=False)
    synth.save(out / "run", synthetic=synthetic)
    return {"seconds": time.perf_counter() - start,
            "train_seconds": synth.training.seconds + sum(m.training.seconds for m in synth.text_models),
            "epsilon": synth.privacy_record.get("epsilon"), "plan": synth.training_plan and synth.training_plan.to_dict(), **written(synth, synthetic, out)}


def resample_dplm(out: Path, rows: int) -> dict:
    """Draw a finished dplm cell's synthetic rows again from its saved model (after a change to sampling)."""
    import dplm

    synth = dplm.load(out / "run")
    return written(synth, synth.sample(rows, progress=False), out)


def written(synth, rows, out: Path) -> dict:
    """Write the synthetic rows to out/synthetic.csv; how sampling went."""
    if synth.is_history:
        rows.write(out / "synthetic.csv")
    else:
        rows.to_csv(out / "synthetic.csv", index=False)
    stats = synth.last_sample_stats
    return {"sample_seconds": stats.seconds, "valid_rate": stats.valid_rate, "rows_kept": stats.rows_kept}


def count(table, holdout, cap: int | None) -> int:
    """Synthetic rows to draw: as many as the holdout has (subjects, for histories), at most `cap`."""
    n = holdout[table.subject].nunique() if table.subject else len(holdout)
    return min(n, cap or n)


def run_engine(python: str, table, train, dp: bool, epsilon: float, out: Path, minutes: float | None,
               rows: int) -> dict:
    """The engine on the training rows (scripts/engine_run.py; the schema's text columns by its LANGUAGE model)."""
    from dplm.schema import Schema

    out.mkdir(parents=True, exist_ok=True)
    train.to_csv(out / "train.csv", index=False)
    command = [python, str(ROOT / "scripts" / "engine_run.py"), "--train", str(out / "train.csv"),
               "--rows", str(rows), "--out", str(out)]
    if table.subject:
        command += ["--subject", table.subject]
    if texts := Schema.from_yaml(str(table.schema_path)).names_of("text"):
        command += ["--text-columns", *texts]
    if minutes:
        command += ["--minutes", str(minutes)]
    if dp:
        command += ["--dp-epsilon", str(epsilon)]
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    (out / "train.csv").unlink()
    return json.loads((out / "engine.json").read_text())


def score(table, train, holdout, synthetic_csv: Path, out: Path) -> dict:
    from dplm.data import load_table
    from dplm.evaluate import align_types
    from dplm.report import write_report
    from dplm.schema import Schema

    schema = Schema.from_yaml(str(table.schema_path))
    fake = load_table(synthetic_csv, schema.names_of("categorical", "text"))
    if table.subject:  # subject columns (data.subject_columns) are written beside, in their own table
        from dplm.histories import subjects_path

        if subjects_path(synthetic_csv).exists():
            own = load_table(subjects_path(synthetic_csv), schema.names_of("categorical", "text"))
            fake = fake.merge(own, on=table.subject, how="left")
    histories = None
    if table.subject:
        from dplm.histories import Histories
        from dplm.report import typed

        def subjects(df):
            return Histories(pd.DataFrame({table.subject: df[table.subject].unique()}), typed(df, table.subject, schema))

        histories = ({"training": subjects(train), "holdout": subjects(holdout), "synthetic": subjects(fake)},
                     table.subject, table.order_by)
    paths = write_report(align_types(train[schema.names], schema), align_types(holdout[schema.names], schema),
                         align_types(fake[schema.names], schema), out, target=table.target,
                         categorical=schema.names_of("categorical"), text_columns=schema.names_of("text") or None,
                         histories=histories)
    return json.loads(paths[1].read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tables", default="census,german,diamonds,london")
    parser.add_argument("--systems", default="dplm,engine")
    parser.add_argument("--modes", default="dp,nodp")
    parser.add_argument("--epsilon", type=float, default=2.5)
    parser.add_argument("--engine-minutes", type=float, help="the engine's training time limit (default: its own)")
    parser.add_argument("--engine-python", default=str(ROOT.parent / "refenv" / "bin" / "python"))
    parser.add_argument("--set", nargs="*", default=[], help="section.key=value for dplm's runs (probes only)")
    parser.add_argument("--rows", type=int, help="synthetic rows at most (default: the holdout's count)")
    parser.add_argument("--no-score", action="store_true", help="train and sample only (score later)")
    parser.add_argument("--rescore", action="store_true", help="score every finished cell again")
    parser.add_argument("--resample", action="store_true",
                        help="draw dplm's synthetic rows again from each finished cell's saved model, then score")
    args = parser.parse_args()
    out = Path(args.out)
    results = []
    for name in args.tables.split(","):
        table = TABLES[name]
        train, holdout = split(table)
        rows = count(table, holdout, args.rows)
        for system in args.systems.split(","):
            for mode in args.modes.split(","):
                cell = out / name / f"{system}-{mode}"
                done, ran = cell / "cell.json", cell / "info.json"
                if done.exists() and not (args.rescore or args.resample):
                    results.append(json.loads(done.read_text()))
                    continue
                cell.mkdir(parents=True, exist_ok=True)
                dp = mode == "dp"
                if not ran.exists():
                    info = (run_dplm(table, train, holdout, dp, args.epsilon, args.set, cell, rows) if system == "dplm"
                            else run_engine(args.engine_python, table, train, dp, args.epsilon, cell,
                                            args.engine_minutes, rows))
                    ran.write_text(json.dumps(info, indent=2, default=str))
                elif args.resample and system == "dplm":
                    info = {**json.loads(ran.read_text()), **resample_dplm(cell, rows)}
                    ran.write_text(json.dumps(info, indent=2, default=str))
                if args.no_score:
                    continue
                info = json.loads(ran.read_text())
                report = score(table, train, holdout, cell / "synthetic.csv", cell)
                record = {"table": name, "system": system, "mode": mode, **info, **summary(report)}
                done.write_text(json.dumps(record, indent=2, default=str))
                results.append(record)
                print(line(record), flush=True)
    print(f"\n| table | system | mode | accuracy | AUC | TSTR | rules kept | valid rows | epsilon | train s | "
          f"holdout acc / AUC | shuffled acc / AUC |\n| {' | '.join(['---'] * 12)} |")
    for record in results:
        print(line(record))
    return 0


def summary(report: dict) -> dict:
    acc, auc = report["accuracy"], report["embedding"]["discriminator_auc"]
    out = {"accuracy": acc["synthetic"]["overall"], "auc": auc["synthetic"],
           "holdout_accuracy": acc["holdout"]["overall"], "holdout_auc": auc["holdout"],
           "shuffled_accuracy": acc.get("shuffled", {}).get("overall"), "shuffled_auc": auc.get("shuffled"),
           "tstr": report.get("utility", {}).get("tstr", {}).get("accuracy"),
           "trtr": report.get("utility", {}).get("trtr", {}).get("accuracy"),
           "rules_kept": report.get("rules", {}).get("synthetic", {}).get("all_rules")}
    for column, t in report.get("text", {}).items():  # text tables: each text column's figures
        if "synthetic" in t:
            out.setdefault("text", {})[column] = {"synthetic": t["synthetic"], "real": t["holdout"],
                                                  "context": t.get("context")}
    if "histories" in report:
        h = report["histories"]
        out["histories"] = {name: {k: v for k, v in h[name].items() if k not in ("coherence_per_column",)}
                            for name in ("synthetic", "holdout")}
    return out


def line(r: dict) -> str:
    def f(v, d=3):
        return "-" if v is None else f"{v:.{d}f}"

    texts = "".join(f"\n|   text '{c}' | AUC {f(t['synthetic']['discriminator_auc'])} (real {f(t['real']['discriminator_auc'])}) "
                    f"| {t['context']} from text {f(t['synthetic'].get('context_accuracy'))} (real "
                    f"{f(t['real'].get('context_accuracy'))}) | known words {f(t['synthetic'].get('known_word_share'))} "
                    f"(real {f(t['real'].get('known_word_share'))}) | verbatim {f(t['synthetic']['verbatim_training_share'])} "
                    f"(holdout {f(t['real']['verbatim_training_share'])}) |" for c, t in r.get("text", {}).items())
    return (f"| {r['table']} | {r['system']} | {r['mode']} | {f(r['accuracy'], 4)} | {f(r['auc'])} | {f(r['tstr'])} | "
            f"{f(r.get('rules_kept'))} | {f(r.get('valid_rate'))} | {f(r.get('epsilon') or r.get('epsilon_training'), 3)} | "
            f"{f(r.get('train_seconds'), 0)} | {f(r['holdout_accuracy'], 4)} / {f(r['holdout_auc'])} | "
            f"{f(r.get('shuffled_accuracy'), 4)} / {f(r.get('shuffled_auc'))} |" + texts)


if __name__ == "__main__":
    sys.exit(main())
