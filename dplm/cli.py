"""Command line: `dplm train RECIPE [key=value ...]`, `dplm generate RUN_DIR (-n N | --given FILE) -o FILE`,
`dplm report RUN_DIR`, `dplm audit RUN_DIR`, `dplm plan RECIPE`, `dplm export RUN_DIR OUT_DIR`,
`dplm sweep RECIPE [key=value ...] [--noise ..] [--clip ..] [-o DIR]`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import yaml

from dplm.audit import audit_run
from dplm.config import load_recipe
from dplm.data import check_output_file, load_table, write_table
from dplm.errors import DplmError
from dplm.experiment import default_summary, load_sweep_config, sweep
from dplm.histories import Histories
from dplm.report import report_run
from dplm.rules import suggested
from dplm.synthesizer import Synthesizer, plan
from dplm.train import process_rank
from dplm.workspace import checkpoints_for, export_run


def summary(synth, df=None) -> str:
    """The lines a user needs after a run: privacy, training, validity."""
    lines = list(synth.training_plan.lines()) if synth.training_plan and synth.training else []
    p = synth.privacy_record
    if p.get("dp"):
        cap = f" (cap {p['max_epsilon']})" if p.get("max_epsilon") is not None else ""
        split = (f" (schema {p['metadata_epsilon']:.4g} + training {p['training_epsilon']:.4f})"
                 if p.get("metadata_epsilon") else "")
        if p.get("statistics_rounds"):
            split += f" [table statistics: {len(p['statistics_rounds'])} rounds, composed with DP-SGD in training]"
        steps = "" if p.get("models") else (f"noise {p['noise_multiplier']}, sample rate {p['sample_rate']:.3g}, "
                                            f"{p['steps']} steps, ")
        lines.append(f"privacy: epsilon = {p['epsilon']:.4f}{split}{cap} at delta = {p['delta']:g} "
                     f"[{p['accountant']} accountant, {steps}clip {p['max_grad_norm']}, unit: {p['privacy_unit']}]")
        for m in p.get("models") or []:  # a run with text models: what each trained, in the accountant's order
            what = "table model" if m["model"] == "table" else f"text model '{m['column']}'"
            lines.append(f"  {what}: {m['steps']} steps at noise {m['noise_multiplier']:.4g}, sample rate "
                         f"{m['sample_rate']:.3g}; epsilon after it {m['epsilon_after']:.4f}")
    else:
        lines.append("privacy: none (DP off)")
    sources = p.get("metadata_sources", {})
    by_source = {s: [c for c, v in sources.items() if v == s] for s in ("user", "data", "dp")}
    lines.append("schema metadata: " + "; ".join(f"{s}-given: {len(cols)} column(s)" if s == "user" else
                                                 f"{'learned from data (not DP)' if s == 'data' else 'DP-estimated'}: "
                                                 f"{', '.join(cols)}" for s, cols in by_source.items() if cols))
    t = synth.training
    if t:  # the run directory's private diagnostics: shown to the data owner, never exported
        unit = "subjects" if synth.is_history else "rows"
        cut = "".join(f", {n} histories cut at data.max_history ({synth.codec.max_rows} rows)" if c.startswith("histories")
                      else f", {n} '{c}' texts cut at max_tokens" for c, n in synth.values_cut.items())
        pretraining = synth.pretraining
        first = (f"first {pretraining.steps} steps on {pretraining.rows_seen} rows drawn from the statistics "
                 f"({pretraining.seconds:.0f} s), then " if pretraining else "")
        lines.append(f"training (private diagnostics, not covered by epsilon): {first}{t.steps} steps, {t.rows_seen} "
                     f"{unit} ({t.epochs:.3f} epochs), {t.seconds:.0f} s, {t.rows_per_second:.1f} {unit}/s, stopped by "
                     f"{t.stop_reason}, last loss {t.final_loss if t.final_loss is None else round(t.final_loss, 4)}"
                     + (f", resumed at step {t.resumed_from_step}" if t.resumed_from_step else "")
                     + (f", {t.processes} processes" if t.processes > 1 else "") + cut)
        for text_model in synth.text_models:
            r = text_model.training
            lines.append(f"text model '{text_model.column}' (private diagnostics): {r.steps} steps, {r.rows_seen} rows "
                         f"({r.epochs:.3f} epochs), {r.seconds:.0f} s, stopped by {r.stop_reason}, last loss "
                         f"{r.final_loss if r.final_loss is None else round(r.final_loss, 4)}")
    s = synth.last_sample_stats
    if s:
        what = "subjects" if synth.is_history else "rows"
        lines.append(f"sampling: {s.rows_returned} valid {what} from {s.rows_generated} generated "
                     f"(valid-row rate {s.valid_rate:.1%}, {s.generated_per_returned:.2f} generated per returned), "
                     f"{s.rows_returned / s.seconds:.1f} rows/s"
                     + (f"; kept {s.rows_kept} of them, nearest the "
                        + ("training subjects' counts per rows and span" if synth.is_history else "statistics' one-way counts")
                        + " (sample.calibration)" if s.rows_kept is not None else ""))
    suggestions = suggested(synth.rules.to_dict(), synth.schema.rules) if synth.rules else []
    if suggestions:
        lines.append("rules the statistics show, kept in every row once declared under the schema's rules: "
                     + "; ".join(rule_line(r) for r in suggestions))
    return "\n".join(lines)


def rule_line(entry: dict) -> str:
    """A suggested `rules:` entry in one line (a mapping without its values)."""
    kind, body = next(iter(entry.items()))
    return f"mapping: {{from: {body['from']}, to: {body['to']}, values: ...}}" if kind == "mapping" else \
        f"{kind}: [{', '.join(body)}]"


def cmd_train(args) -> None:
    config = load_recipe(args.recipe, args.overrides)
    checkpoints = checkpoints_for(config, args.resume)
    synth = Synthesizer.fit(config=config, progress=not args.quiet, checkpoints=checkpoints)
    if process_rank()[0] != 0:  # with several processes, rank 0 samples and writes
        return
    df = synth.sample(config.sample.num_rows, progress=not args.quiet)
    run_dir = synth.save(config.output_dir, synthetic=df)
    print(f"run directory: {run_dir} (synthetic rows: {run_dir / 'synthetic.csv'})")
    if config.output_csv:
        print(write_synthetic(df, config.output_csv))
    print(summary(synth))


def write_synthetic(out, path) -> str:
    """Write rows (or histories: the event table, and the subject table beside it) by the
    file's extension; the line that says what was written."""
    if isinstance(out, Histories):
        paths = out.write(path)
        return (f"synthetic subjects: {len(out)} with {len(out.events)} rows in {paths[0]}"
                + (f", their own columns in {paths[1]}" if len(paths) > 1 else ""))
    write_table(out, path)
    return f"synthetic rows: {path} ({len(out)} rows, {len(out.columns)} columns)"


def cmd_generate(args) -> None:
    if (args.num_rows is None) == (args.given is None):
        raise DplmError("give either -n N (rows to generate) or --given FILE (one row per given row), not both")
    if args.num_rows is not None and args.num_rows < 1:
        raise DplmError("-n must be at least 1")
    check_output_file(args.output)
    synth = Synthesizer.load(args.run_dir)
    given = load_table(args.given, synth.schema.names_of("categorical", "text")) if args.given else None
    df = synth.sample(args.num_rows, seed=args.seed, temperature=args.temperature, progress=not args.quiet,
                      given=given)
    print(write_synthetic(df, args.output))
    print(summary(synth))


def cmd_report(args) -> None:
    html_path, json_path = report_run(args.run_dir, synthetic=args.synthetic, num_rows=args.num_rows,
                                      target=args.target, out_dir=args.output, progress=not args.quiet)
    metrics = json.loads(json_path.read_text())
    acc, emb = metrics["accuracy"], metrics["embedding"]["discriminator_auc"]
    print(f"report: {html_path} and {json_path} ({metrics['report_seconds']:.0f} s)")
    rules = metrics.get("rules", {})
    kept = (f", rows keeping the table's {len(rules['rules'])} rules {rules['synthetic']['all_rules']:.1%}"
            if rules.get("rules") else "")
    print(f"accuracy {acc['synthetic']['overall']:.4f} (holdout {acc['holdout']['overall']:.4f}, shuffled columns "
          f"{acc['shuffled']['overall']:.4f}), discriminator AUC {emb['synthetic']:.3f} (holdout {emb['holdout']:.3f}, "
          f"shuffled {emb['shuffled']:.3f}), DCR share {metrics['privacy']['synthetic']['dcr_share']:.3f}{kept}")
    declared = metrics.get("declared_rules")
    if declared:
        print(f"{declared.get('unit', 'rows')} keeping the schema's {len(declared['rules'])} declared rules: "
              f"{declared['synthetic']['all_rules']:.1%} (holdout {declared['holdout']['all_rules']:.1%})")


def cmd_audit(args) -> None:
    result = audit_run(args.run_dir, num_records=args.num_records, num_references=args.references,
                       sensitive=args.sensitive)
    mia = result["membership_inference"]
    dp = f"DP, epsilon {result['epsilon']:.4g}" if result["dp"] else "no DP"
    unit = "subjects (whole histories)" if result.get("unit") == "subject" else "rows"
    print(f"audit ({dp}): membership inference AUC {mia['auc']:.3f} (chance 0.5), TPR at 1% FPR "
          f"{mia['tpr_at_1pct_fpr']:.3f} (chance 0.01), {mia['members']} training vs {mia['non_members']} holdout {unit}")
    if "canaries" in result:
        c = result["canaries"]
        if "mean_exposure" in c:
            print(f"canaries: {c['count']} drawn, {c['training']} trained ({c['repeats']} rows each); exposure of the "
                  f"trained mean {c['mean_exposure']:.2f} / max {c['max_exposure']:.2f} bits (unseen ~1, memorized up "
                  f"to {c['max_possible']:.1f}; {c['references']} references)")
        if "one_run" in c:
            o = c["one_run"]
            claimed = f"; the accountant's epsilon {result['epsilon']:.4g}" if result["dp"] else ""
            print(f"empirical epsilon (one run, {o['confidence']:.0%} confidence): at least {o['epsilon_lower_bound']:.3f}, "
                  f"from {o['correct']} of {o['guesses']} membership guesses on {o['canaries']} canaries{claimed}")
        for column, t in c.get("text", {}).items():
            print(f"text canaries in '{column}' (random words, their tokens alone): exposure mean "
                  f"{t['mean_exposure']:.2f} / max {t['max_exposure']:.2f} bits")
    if "attribute_inference" in result:
        a = result["attribute_inference"]
        print(f"attribute inference of '{a['column']}' from the synthetic rows: accuracy on training rows vs holdout "
              f"rows: nearest row {a['nearest_neighbour']['accuracy_members']:.3f} vs "
              f"{a['nearest_neighbour']['accuracy_non_members']:.3f}, classifier {a['classifier']['accuracy_members']:.3f} "
              f"vs {a['classifier']['accuracy_non_members']:.3f} (majority {a['majority']['accuracy_members']:.3f}); "
              f"advantage {a['advantage']:+.3f} (0: no more about members than about anyone)")
    print(f"written: {Path(args.run_dir) / 'audit.json'}")


def cmd_plan(args) -> None:
    """The plan a recipe's run will follow (what it chooses and what it was given) and, under
    DP, epsilon per epoch and at its end, without training (schema metadata and the table's
    statistics included). `--target-epsilon` plans for that cap, with the noise chosen for it."""
    overrides = list(args.overrides)
    if args.target_epsilon:
        overrides += [f"privacy.max_epsilon={args.target_epsilon!r}", "privacy.noise_multiplier=null"]
    config = load_recipe(args.recipe, overrides)
    result = plan(config)
    for line in result["plan_lines"]:
        print(line)
    if result.get("text_columns"):
        print(f"text models for {', '.join(result['text_columns'])} (a prompt of the row's other values):")
        for line in result["text_plan_lines"]:
            print(f"  {line}")
    if not config.privacy.enabled:
        print(f"{result['units']} training {result['unit']}; no DP")
        if result["suggested_rules"]:
            print("rules the table's statistics show, kept in every row once declared under the schema's rules:\n"
                  + yaml.safe_dump({"rules": result["suggested_rules"]}, sort_keys=False, allow_unicode=True).rstrip())
        return
    p, chosen = config.privacy, result["plan"]
    print(f"{result['units']} training {result['unit']}, batch {chosen['batch_size']}: sample rate "
          f"{result['sample_rate']:.4g}, {result['steps_per_epoch']} steps per epoch; {p.accountant} accountant, "
          f"delta {result['delta']:g} (training {result['training_delta']:g} + schema {result['metadata_delta']:g})")
    if result["metadata_estimated"]:
        print(f"schema metadata estimated under DP: epsilon {result['metadata_epsilon']:g} for "
              + ", ".join(result["metadata_estimated"]))
    if result["statistics_rounds"]:
        print(f"table statistics: {len(result['statistics_rounds'])} Gaussian rounds of noise "
              f"{result['statistics_rounds'][0]['noise_multiplier']:.4g}, composed with the DP-SGD steps")
    print(f"noise multiplier {chosen['noise_multiplier']:.4g}" + (" (the table model):" if result.get("text_columns")
                                                                 else ":"))
    for epoch, (steps, eps) in enumerate(result["epochs"], start=1):
        print(f"  epoch {epoch}: {steps} steps, epsilon {eps:.4f}")
    texts = (" with the text models'", "the table model ") if result.get("text_columns") else ("", "")
    print(f"the run: {result['steps']} steps{texts[0]} ({texts[1]}stopped by {result['stop_reason']}), epsilon "
          f"{result['epsilon']:.4f} at delta {result['delta']:g}")


def cmd_sweep(args) -> None:
    config, out_dir = load_sweep_config(args.recipe, args.overrides, args.noise, args.clip, args.baseline_epochs,
                                        args.output)
    table = sweep(config, out_dir, workers=args.workers, ray_address=args.ray, progress=not args.quiet)
    failed = int(table["error"].notna().sum()) if "error" in table else 0
    print(f"sweep: {len(table) - failed} of {len(table)} points done"
          + (f", {failed} failed (their errors: {out_dir / 'sweep.csv'})" if failed else "")
          + f"; {out_dir / 'sweep.html'}, {out_dir / 'sweep.csv'}, {out_dir / 'sweep.json'}")
    if failed == len(table):
        raise DplmError(f"every point of the sweep failed; the first: {table['error'].iloc[0]}")
    reading = default_summary(table, (config.privacy.noise_multiplier, config.privacy.max_grad_norm))
    if reading:
        print(reading)


def cmd_export(args) -> None:
    out = export_run(args.run_dir, args.out_dir)
    print(f"export: {out} ({', '.join(sorted(p.name for p in out.iterdir()))}); see {out / 'MANIFEST.md'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dplm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="fine-tune on a table as a YAML recipe says")
    train.add_argument("recipe", help="YAML recipe, e.g. recipes/census_dp.yaml")
    train.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.max_steps=20 privacy.enabled=true")
    train.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    train.add_argument("--resume", action="store_true",
                       help="continue an interrupted run from its checkpoint (<output_dir>.checkpoint)")
    train.set_defaults(func=cmd_train)
    gen = sub.add_parser("generate", help="sample synthetic rows from a run directory")
    gen.add_argument("run_dir")
    gen.add_argument("-n", "--num-rows", type=int, help="rows to generate")
    gen.add_argument("--given", help="CSV/Parquet/JSONL of some columns' values: one row is generated per given "
                                     "row, keeping them and drawing the other columns conditionally")
    gen.add_argument("-o", "--output", required=True, help="file to write: .csv, .parquet or .jsonl")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--temperature", type=float, default=None)
    gen.add_argument("-q", "--quiet", action="store_true")
    gen.set_defaults(func=cmd_generate)
    plan = sub.add_parser("plan", help="epsilon per epoch for a recipe, without training")
    plan.add_argument("recipe")
    plan.add_argument("overrides", nargs="*")
    plan.add_argument("--target-epsilon", type=float, help="also find the noise multiplier that reaches this")
    plan.set_defaults(func=cmd_plan)
    aud = sub.add_parser("audit", help="membership inference and canary exposure of a run's model")
    aud.add_argument("run_dir")
    aud.add_argument("-n", "--num-records", type=int, default=1000, help="training and holdout rows to attack")
    aud.add_argument("--references", type=int, default=1000, help="random records to rank each canary among")
    aud.add_argument("--sensitive", help="categorical column attribute inference guesses (default: "
                                         "audit.sensitive_column, else the report's target, else the last one)")
    aud.set_defaults(func=cmd_audit)
    exp = sub.add_parser("export", help="copy what a run may share (model, schema, privacy record, synthetic "
                                        "rows) into a new folder, without its private diagnostics")
    exp.add_argument("run_dir")
    exp.add_argument("out_dir", help="a new folder")
    exp.set_defaults(func=cmd_export)
    swp = sub.add_parser("sweep", help="train, score and audit a recipe at every noise x clip of a grid, plus "
                                       "non-DP baselines; charts of epsilon vs accuracy, AUC and attacks")
    swp.add_argument("recipe")
    swp.add_argument("overrides", nargs="*", help="section.key=value, e.g. sweep.target=income")
    swp.add_argument("--noise", help="noise multipliers, e.g. 0.5,1,2 (default: sweep.noise_multipliers, the "
                                     "seed's 0.25 ... 32)")
    swp.add_argument("--clip", help="max_grad_norm values, e.g. 0.5,1,2 (default: sweep.max_grad_norms)")
    swp.add_argument("--baseline-epochs", help="epochs of the non-DP baselines, e.g. 1,2,4 (default: "
                                               "sweep.baseline_epochs; empty for none)")
    swp.add_argument("-o", "--output", help="sweep folder (default: the recipe's output_dir); rerun to resume "
                                            "(with the same grid unless --noise/--clip/--baseline-epochs are given)")
    swp.add_argument("--workers", type=int, default=1, help="points run side by side on this machine "
                                                            "(CPU threads split between them, or a GPU each)")
    swp.add_argument("--ray", metavar="ADDRESS", help="run each point as a task on this Ray cluster "
                                                      "('auto', 'ray://host:10001'; 'local' starts one here)")
    swp.add_argument("-q", "--quiet", action="store_true")
    swp.set_defaults(func=cmd_sweep)
    rep = sub.add_parser("report", help="score a run: HTML report and JSON metrics")
    rep.add_argument("run_dir")
    rep.add_argument("--synthetic", help="CSV of synthetic rows (default: the run's synthetic.csv)")
    rep.add_argument("-n", "--num-rows", type=int, help="sample this many fresh rows instead")
    rep.add_argument("--target", help="column to predict for the TSTR utility score")
    rep.add_argument("-o", "--output", help="folder for report.html/report.json (default: the run directory)")
    rep.add_argument("-q", "--quiet", action="store_true")
    rep.set_defaults(func=cmd_report)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notices
    try:
        args.func(args)
    except DplmError as e:
        print(f"dplm: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
