"""The privacy-utility sweep (`dplm sweep`): the seed's noise x clip experiment in one command.

Every point of `sweep.noise_multipliers` x `sweep.max_grad_norms` trains the recipe with DP at
that setting to its end, samples `sweep.num_rows` rows, scores them (`dplm report`: accuracy,
discriminator AUC, DCR share, TSTR on `sweep.target`) and attacks them (`dplm audit`:
membership inference on the model, attribute inference on the rows). Non-DP runs of
`sweep.baseline_epochs` epochs (with `sweep.baseline_overrides`) are the reference lines. The
output folder holds

    points/NAME/        each point's run directory, with report.json, audit.json, point.json
    sweep.csv, .json    one row per point: settings, epsilon, delta, steps, seconds, scores,
                        attacks, stop reason, and the one-line error of a point that failed
    sweep.html          the charts and the table, self-contained
    *.png               epsilon vs accuracy, vs discriminator AUC, vs empirical privacy; compute
    sweep_recipe.yaml   the settings every point shares (a rerun with others is refused)
    sweep_grid.yaml     the last run's grid (`dplm sweep` reruns it unless the grid is given)
    tracking/           experiment trackers' logs, one run per point (train.report_to)

A rerun reads finished points back and runs the rest (and those that failed). Points run one
after another, side by side in `workers` processes (CPU threads split between them, or a
GPU each), or as tasks on a Ray cluster (`ray_address`; every node needs dplm and the data,
and the output folder should be on storage all nodes share).

A sweep is for the data owner, like a run directory: it compares rows with the private ones
and is not covered by epsilon. Settings chosen by looking at it are tuned on the private data,
a choice epsilon does not count either.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import math
import multiprocessing
import os
import shutil
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import pandas as pd
import torch
import yaml

from dplm.audit import audit_run
from dplm.config import RunConfig, apply_overrides, from_dict, load_recipe
from dplm.data import load_table, write_atomic
from dplm.errors import DplmError
from dplm.model import default_device
from dplm.report import headline_scores, pyplot, report_run
from dplm.schema import Schema
from dplm.stages import speed_before_data
from dplm.synthesizer import Synthesizer
from dplm.tracking import flatten, prepare_mlflow
from dplm.workspace import RunDirectory

GRID_KEYS = ("noise_multipliers", "max_grad_norms", "baseline_epochs")  # may grow between reruns
CHARTS = {"accuracy": "epsilon vs accuracy", "auc": "epsilon vs discriminator AUC",
          "privacy": "epsilon vs empirical privacy", "compute": "compute per point"}


@dataclasses.dataclass
class Point:
    """One training run of the sweep: DP at (noise, clip), or a non-DP baseline of some epochs."""

    name: str
    overrides: list[str]
    noise_multiplier: float | None = None
    max_grad_norm: float | None = None
    baseline_epochs: float | None = None

    @property
    def dp(self) -> bool:
        return self.baseline_epochs is None

    def record(self) -> dict:
        """The point's settings as its result row starts."""
        return {"name": self.name, "dp": self.dp, "noise_multiplier": self.noise_multiplier,
                "max_grad_norm": self.max_grad_norm, "baseline_epochs": self.baseline_epochs}


def grid(config: RunConfig) -> list[Point]:
    """The sweep's points: DP ones first (noise-major), then the baselines."""
    s = config.sweep
    points = [Point(f"dp-noise{n:g}-clip{c:g}", ["privacy.enabled=true", f"privacy.noise_multiplier={n!r}",
                                                  f"privacy.max_grad_norm={c!r}"], n, c)
              for n in s.noise_multipliers for c in s.max_grad_norms]
    points += [Point(f"nodp-epochs{e:g}", [*s.baseline_overrides, "privacy.enabled=false", f"train.max_epochs={e!r}"],
                     baseline_epochs=e) for e in s.baseline_epochs]
    names = [p.name for p in points]
    if len(set(names)) < len(names):
        raise DplmError(f"the sweep grid repeats a point ({sorted({n for n in names if names.count(n) > 1})[0]}); "
                        "give distinct values in sweep.noise_multipliers, max_grad_norms and baseline_epochs")
    if not points:
        raise DplmError("the sweep has no points: give noise multipliers and clip norms (--noise, --clip) "
                        "and/or baseline epochs (--baseline-epochs)")
    return points


def shared_settings(config: RunConfig) -> dict:
    """What every point shares: the recipe without its output paths, grid lists and trackers
    (which log results and do not shape them)."""
    values = config.to_dict()
    for key in ("output_dir", "output_csv"):
        values.pop(key)
    for key in GRID_KEYS:
        values["sweep"].pop(key)
    for key in ("report_to", "tracking_dir"):
        values["train"].pop(key)
    return values


def point_settings(config: RunConfig, point: Point, out_dir: Path) -> dict:
    """The full settings of one point's run (absolute paths: a worker may start elsewhere)."""
    values = apply_overrides(config.to_dict(), [*point.overrides, "output_csv=null", "train.checkpoint_every=null"])
    values["output_dir"] = str((out_dir / "points" / point.name).resolve())
    values["train"]["tracking_dir"] = str((out_dir / "tracking").resolve())
    for section, key in (("data", "source"), ("data", "schema")):
        if values[section][key] and Path(values[section][key]).exists():
            values[section][key] = str(Path(values[section][key]).resolve())
    from_dict(RunConfig, values).validate()
    return values


def run_point(values: dict, point: dict, threads: int | None = None) -> dict:
    """Train, sample, score and attack one point; never raises: a failure is its one-line error."""
    result = dict(point)
    start = time.perf_counter()
    try:
        if threads:
            torch.set_num_threads(threads)
        config = from_dict(RunConfig, values)
        synth = Synthesizer.fit(config=config, progress=False)
        sample_start = time.perf_counter()
        rows = synth.sample(config.sweep.num_rows, progress=False)
        sample_seconds = time.perf_counter() - sample_start
        run_dir = synth.save(config.output_dir, synthetic=rows)
        _, report_json = report_run(run_dir, target=config.sweep.target, progress=False)
        audit = audit_run(run_dir, num_records=config.sweep.audit_records, num_references=config.sweep.audit_records,
                          sensitive=config.audit.sensitive_column)
        t, p = synth.training, synth.privacy_record
        mia, attr = audit["membership_inference"], audit.get("attribute_inference", {})
        result.update({
            "epsilon": p.get("epsilon"), "delta": p.get("delta"), "accountant": p.get("accountant"),
            "steps": t.steps, "epochs": t.epochs, "stop_reason": t.stop_reason,
            "train_seconds": t.seconds, "rows_per_second": t.rows_per_second, "sample_seconds": sample_seconds,
            **headline_scores(json.loads(report_json.read_text())),
            "membership_auc": mia["auc"], "membership_tpr_at_1pct_fpr": mia["tpr_at_1pct_fpr"],
            "empirical_epsilon": audit.get("canaries", {}).get("one_run", {}).get("epsilon_lower_bound"),
            "attribute_column": attr.get("column"), "attribute_advantage": attr.get("advantage"),
            **{f"attribute_{a}_{who}": attr[a][f"accuracy_{who}"] for a in ("nearest_neighbour", "classifier")
               for who in ("members", "non_members") if a in attr},
            "error": None,
        })
    except Exception as e:  # the sweep goes on; the point keeps its one-line error and traceback
        result["error"] = _one_line(e)
        result["traceback"] = traceback.format_exc()
    result["seconds"] = time.perf_counter() - start
    return result


def check_columns(config: RunConfig) -> None:
    """Before any point runs: the data loads and holds the columns the scores need."""
    if config.data.source is None:
        raise DplmError("data.source is not set: a sweep trains every point on the same table; give its path")
    if config.sweep.target is None:
        raise DplmError("sweep.target is not set: name the column the report's TSTR score predicts "
                        "(e.g. sweep.target=income)")
    columns = list(load_table(config.data.source).columns)
    for setting, column in (("sweep.target", config.sweep.target), ("audit.sensitive_column",
                                                                     config.audit.sensitive_column)):
        if column is not None and (column not in columns or column not in (config.data.columns or columns)):
            raise DplmError(f"{setting} '{column}' is not a modelled column of '{config.data.source}'; "
                            f"choose one of {', '.join(config.data.columns or columns)}")
    if config.audit.sensitive_column and config.data.schema:
        kinds = {c.name: c.kind for c in Schema.from_yaml(config.data.schema).columns}
        if kinds.get(config.audit.sensitive_column, "categorical") != "categorical":
            raise DplmError(f"audit.sensitive_column '{config.audit.sensitive_column}' is "
                            f"{kinds[config.audit.sensitive_column]}: attribute inference guesses a categorical column")


def _one_line(e: Exception) -> str:
    message = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return message if isinstance(e, DplmError) else f"{type(e).__name__}: {message}"


def prepare_output(config: RunConfig, out_dir: Path) -> None:
    """Create the sweep folder, or check that an existing one ran the same recipe."""
    recipe_file = out_dir / "sweep_recipe.yaml"
    settings = shared_settings(config)
    if recipe_file.exists():
        before = yaml.safe_load(recipe_file.read_text())
        if before != settings:
            now, then = flatten(settings), flatten(before)
            changed = sorted(k for k, v in now.items() if then.get(k) != v) or sorted(set(then) - set(now))
            raise DplmError(f"output folder '{out_dir}' holds a sweep of other settings ({', '.join(changed[:3])} "
                            "changed); resume it with the same recipe, or give a new folder with -o")
        return
    if out_dir.exists() and any(out_dir.iterdir()):
        raise DplmError(f"output folder '{out_dir}' exists and is not a dplm sweep; give a new folder with -o")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(recipe_file, yaml.safe_dump(settings, sort_keys=False))


def sweep(config: RunConfig, out_dir: str | Path, workers: int = 1, ray_address: str | None = None,
          progress: bool = True) -> pd.DataFrame:
    """Run (or resume) the sweep of `config` into `out_dir`; returns one row per point and
    writes sweep.csv/.json after each point, and the charts and sweep.html at the end."""
    out_dir = Path(out_dir)
    config.validate()
    check_columns(config)
    if workers < 1:
        raise DplmError("--workers must be at least 1")
    points = grid(config)
    settings = {p.name: point_settings(config, p, out_dir) for p in points}  # bad settings fail before any run
    prepare_output(config, out_dir)
    write_atomic(out_dir / "sweep_grid.yaml", yaml.safe_dump({k: getattr(config.sweep, k) for k in GRID_KEYS}))
    if "mlflow" in config.train.report_to:  # its store and experiment, once, before workers start
        prepare_mlflow(from_dict(RunConfig, next(iter(settings.values()))))
    results = {}
    for p in points:
        saved = out_dir / "points" / p.name / "point.json"
        if saved.exists():
            result = json.loads(saved.read_text())
            if not result.get("error") and all(result.get(k) == v for k, v in p.record().items()):
                results[p.name] = result
    todo = [p for p in points if p.name not in results]
    if progress:
        print(f"sweep: {len(points)} points ({len(points) - len(todo)} done before), {len(todo)} to run "
              f"{'on Ray' if ray_address else f'in {workers} worker(s)'}; results in {out_dir}", flush=True)

    def finished(result: dict) -> None:
        folder = out_dir / "points" / result["name"]
        folder.mkdir(parents=True, exist_ok=True)
        RunDirectory(folder).write_json("point.json", result)
        results[result["name"]] = result
        _write_tables([results[p.name] for p in points if p.name in results], out_dir)
        if progress:
            print(point_line(result), flush=True)

    for p in todo:  # a failed or interrupted point starts again from nothing
        shutil.rmtree(out_dir / "points" / p.name, ignore_errors=True)
        shutil.rmtree(out_dir / "tracking" / "tensorboard" / p.name, ignore_errors=True)
    jobs = [(settings[p.name], p.record()) for p in todo]
    if ray_address:
        _run_on_ray(jobs, ray_address, finished)
    elif workers == 1:
        for values, point in jobs:
            finished(run_point(values, point))
    else:
        _run_in_processes(jobs, workers, finished)
    table = _write_tables([results[p.name] for p in points], out_dir)
    write_page(table, config, out_dir)
    return table


def _run_in_processes(jobs, workers: int, finished) -> None:
    gpus = torch.cuda.device_count()
    threads = None if gpus else max(1, len(os.sched_getaffinity(0)) // min(workers, len(jobs)))
    measure_speeds_alone([values for values, _ in jobs], threads)
    context = multiprocessing.get_context("spawn")
    slots = context.Queue()
    for i in range(workers):
        slots.put(i)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_start,
                             initargs=(slots, gpus)) as pool:
        futures = {pool.submit(run_point, values, point, threads): point for values, point in jobs}
        for future in as_completed(futures):
            try:
                result = future.result()
            except Exception as e:  # the worker process died (out of memory, killed): rerun to retry
                result = {**futures[future], "error": _one_line(e)}
            finished(result)


def measure_speeds_alone(settings: list[dict], threads: int | None) -> None:
    """Each DP point's machine speed (`stages.speed_before_data`), measured here, one at a time
    and before any point runs, with the threads a worker will have: the workers read it from the
    cache. A timing taken in a worker beside other points' private training would depend on
    them, and it sizes the batch, steps and noise the point's plan releases."""
    before = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(threads)
        for values in settings:
            config = from_dict(RunConfig, values)
            if config.privacy.enabled:
                speed_before_data(config, config.data.schema, default_device())
    finally:
        torch.set_num_threads(before)


def _worker_start(slots, gpus: int) -> None:
    slot = slots.get()
    if gpus:  # one GPU per worker
        os.environ["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)


def _run_on_ray(jobs, address: str, finished) -> None:
    try:
        import ray  # an optional dependency (dplm[ray])
    except ImportError:
        raise DplmError("--ray needs Ray: pip install 'dplm[ray]'") from None
    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=0)(run_point)
    pending = {task.remote(values, point, None if gpus else 1): point for values, point in jobs}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        point = pending.pop(done[0])
        try:
            result = ray.get(done[0])
        except Exception as e:  # the task's worker died (out of memory, node lost)
            result = {**point, "error": _one_line(e)}
        finished(result)


def point_line(r: dict) -> str:
    """One printed line per finished point."""
    what = (f"noise {r['noise_multiplier']:g} clip {r['max_grad_norm']:g}" if r["dp"]
            else f"no DP, {r['baseline_epochs']:g} epoch{'' if r['baseline_epochs'] == 1 else 's'}")
    if r.get("error"):
        return f"  {r['name']}: {what}: failed: {r['error']}"
    def number(key: str, spec: str) -> str:
        return "n/a" if r.get(key) is None else format(r[key], spec)

    eps = f"epsilon {number('epsilon', '.3g')}" if r["dp"] else "no DP"
    return (f"  {r['name']}: {what}: {eps}, accuracy {number('accuracy', '.4f')}, AUC "
            f"{number('discriminator_auc', '.3f')}, TSTR {number('tstr_accuracy', '.3f')}, membership AUC "
            f"{number('membership_auc', '.3f')}, attribute advantage {number('attribute_advantage', '+.3f')}, "
            f"{r['steps']} steps, {r['seconds']:.0f} s")


def _write_tables(rows: list[dict], out_dir: Path) -> pd.DataFrame:
    records = [{k: v for k, v in r.items() if k != "traceback"} for r in rows]
    table = pd.DataFrame(records)
    write_atomic(out_dir / "sweep.csv", table.to_csv(index=False))
    write_atomic(out_dir / "sweep.json", json.dumps(records, indent=2))
    return table


# ---- charts and page ---------------------------------------------------------------------

def charts(table: pd.DataFrame, default: tuple[float, float]) -> dict[str, bytes]:
    """PNG bytes of each chart in CHARTS: DP points by epsilon (one line per clip, the
    recipe's own setting ringed), non-DP baselines as horizontal lines labelled by epochs."""
    plt = pyplot()
    ok = table[table["error"].isna()] if "error" in table else table
    dp = ok[ok["dp"]].sort_values("epsilon") if len(ok) else ok
    base = ok[~ok["dp"]].sort_values("baseline_epochs") if len(ok) else ok
    out = {}

    def panel(ax, column: str, label: str, chance: float | None = None):
        for clip, group in dp.groupby("max_grad_norm"):
            ax.plot(group["epsilon"], group[column], "o-", label=f"DP, clip {clip:g}")
        mark = dp[(dp["noise_multiplier"] == default[0]) & (dp["max_grad_norm"] == default[1])]
        if len(mark):
            ax.plot(mark["epsilon"], mark[column], "o", ms=16, mfc="none", mec="red", mew=2,
                    label=f"recipe default (noise {default[0]:g}, clip {default[1]:g})")
        styles = ["--", "-.", ":", (0, (5, 1)), (0, (1, 1))]
        for i, (_, b) in enumerate(base.iterrows()):  # darker for more epochs, labelled in the legend
            ax.axhline(b[column], color=str(0.65 - 0.5 * (i + 1) / len(base)), ls=styles[i % len(styles)], lw=1.2,
                       label=f"no DP, {b['baseline_epochs']:g} epoch{'' if b['baseline_epochs'] == 1 else 's'}")
        if chance is not None:  # attacks: chance level, and a scale where noise around it looks like noise
            ax.axhline(chance, color="black", lw=0.8, ls=":")
            low, high = ax.get_ylim()
            ax.set_ylim(min(low, chance - 0.1), max(high, chance + 0.1))
        if len(dp):
            ax.set_xscale("log")
        ax.set_xlabel("epsilon (log scale)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))

    def save(fig, name):
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        out[name] = buf.getvalue()

    for name, column, label in (("accuracy", "accuracy", "accuracy (1 - TVD, uni/bi/trivariate)"),
                                ("auc", "discriminator_auc", "discriminator AUC (0.5: indistinguishable)")):
        fig, ax = plt.subplots(figsize=(8.5, 4.5))
        if column in ok:
            panel(ax, column, label)
        ax.set_title(CHARTS[name])
        save(fig, name)
    fig, axes = plt.subplots(1, 3, figsize=(22, 4.5))
    for ax, column, label, chance in ((axes[0], "membership_auc", "membership inference AUC (model losses)", 0.5),
                                      (axes[1], "attribute_advantage", "attribute inference advantage", 0.0),
                                      (axes[2], "empirical_epsilon", "empirical epsilon (one-run lower bound, 95 %)",
                                       None)):
        if column in ok and ok[column].notna().any():
            panel(ax, column, label, chance)
    if len(dp):  # what the accountant promises: no empirical bound may pass it
        axes[2].plot(dp["epsilon"], dp["epsilon"], color="black", lw=0.8, ls=":", label="the accountant's epsilon")
        axes[2].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(CHARTS["privacy"])
    save(fig, "privacy")
    fig, ax = plt.subplots(figsize=(max(7, 0.3 * len(ok)), 4.5))
    if len(ok):
        order = pd.concat([dp, base])
        ax.bar(range(len(order)), order["train_seconds"], color=["C0" if d else "gray" for d in order["dp"]],
               label="training")
        ax.bar(range(len(order)), order["seconds"] - order["train_seconds"], bottom=order["train_seconds"],
               color="C1", alpha=0.6, label="sampling, report, audit")
        ax.set_xticks(range(len(order)), order["name"], rotation=75, ha="right", fontsize=7)
        ax.legend(fontsize=8)
    ax.set_ylabel("seconds")
    ax.set_title(CHARTS["compute"])
    save(fig, "compute")
    return out


def default_summary(table: pd.DataFrame, default: tuple[float, float]) -> str | None:
    """The seed's reading of the chart: DP at the recipe's own setting is worth how many epochs
    of non-DP training, at how many times their training compute."""
    if "accuracy" not in table:
        return None
    ok = table[table["error"].isna()]
    point = ok[ok["dp"] & (ok["noise_multiplier"] == default[0]) & (ok["max_grad_norm"] == default[1])]
    base = ok[~ok["dp"]].sort_values("baseline_epochs")
    if point.empty or base.empty:
        return None
    p = point.iloc[0]
    head = (f"DP at the recipe's setting (noise {default[0]:g}, clip {default[1]:g}: epsilon {p['epsilon']:.3g}) "
            f"reaches accuracy {p['accuracy']:.4f}")
    beats = (base["accuracy"] > p["accuracy"]).to_numpy()
    first_better = int(beats.argmax()) if beats.any() else len(base)  # baselines until one beats DP
    if first_better == 0:
        first = base.iloc[0]
        return f"{head}, below non-DP training for {first['baseline_epochs']:g} epoch(s) ({first['accuracy']:.4f})"
    b = base.iloc[first_better - 1]
    return (f"{head}: worth {b['baseline_epochs']:g} epoch(s) of non-DP training ({b['accuracy']:.4f}), at "
            f"{p['train_seconds'] / b['train_seconds']:.1f} times their training time")


TABLE_COLUMNS = ["name", "noise_multiplier", "max_grad_norm", "baseline_epochs", "epsilon", "steps", "epochs",
                 "accuracy", "discriminator_auc", "dcr_share", "tstr_accuracy", "membership_auc",
                 "attribute_advantage", "empirical_epsilon", "train_seconds", "seconds", "stop_reason", "error"]


def write_page(table: pd.DataFrame, config: RunConfig, out_dir: Path) -> Path:
    """The charts as PNG files and sweep.html (charts inlined, the table, failures)."""
    pngs = charts(table, (config.privacy.noise_multiplier, config.privacy.max_grad_norm))
    for name, data in pngs.items():
        write_atomic(out_dir / f"{name}.png", data)
    s, p = config.sweep, config.privacy

    def cell(v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))

    columns = [c for c in TABLE_COLUMNS if c in table]
    rows = "".join("<tr>" + "".join(f"<td>{cell(r[c])}</td>" for c in columns) + "</tr>"
                   for r in table.to_dict("records"))
    images = "".join(f'<h2>{html.escape(title)}</h2><img alt="{html.escape(title)}" '
                     f'src="data:image/png;base64,{base64.b64encode(pngs[name]).decode()}">'
                     for name, title in CHARTS.items())
    accountant = p.accountant.upper()
    reading = default_summary(table, (p.noise_multiplier, p.max_grad_norm))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>dplm sweep</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1300px}} table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}} img{{max-width:100%}}
.note{{background:#fff3cd;padding:.6em;border:1px solid #e0c97f}}</style></head><body>
<h1>Privacy-utility sweep</h1>
<p class="note">For the data owner: this page compares synthetic rows with the private training and
holdout rows and is not covered by epsilon; settings chosen by looking at it are tuned on the private data, which
epsilon does not count either. Share a point's model and rows with <code>dplm export</code>.</p>
<p>{len(table)} points: noise multipliers {', '.join(f'{v:g}' for v in s.noise_multipliers) or 'none'} &times; clip
norms {', '.join(f'{v:g}' for v in s.max_grad_norms) or 'none'} with DP (delta {p.delta:g}, {accountant} accountant,
total epsilon with the schema's metadata epsilon, if any), and non-DP baselines of
{', '.join(f'{v:g}' for v in s.baseline_epochs) + ' epochs' if s.baseline_epochs else 'none'}. Each point samples {s.num_rows} rows; TSTR predicts <code>{html.escape(str(s.target))}</code>; the audit
attacks {s.audit_records} training and holdout rows.</p>
{f"<p><b>{html.escape(reading)}</b>.</p>" if reading else ""}
{images}
<h2>Points</h2><table><tr>{''.join(f'<th>{c}</th>' for c in columns)}</tr>{rows}</table>
</body></html>"""
    path = out_dir / "sweep.html"
    write_atomic(path, page)
    return path


def load_sweep_config(recipe: str, overrides: list[str], noise: str | None = None, clip: str | None = None,
                      baseline_epochs: str | None = None, output: str | None = None) -> tuple[RunConfig, Path]:
    """A recipe with the command line's grid flags as `sweep.*` overrides, and the sweep folder
    (`output`, default the recipe's output_dir). Rerunning a folder keeps its grid, save for
    what the flags or overrides give: growing it is asked for, never a default."""
    flags = {"noise_multipliers": noise, "max_grad_norms": clip, "baseline_epochs": baseline_epochs}
    config = load_recipe(recipe, [*overrides, *(f"sweep.{k}=[{v}]" for k, v in flags.items() if v is not None)])
    out_dir = Path(output or config.output_dir)
    stored = out_dir / "sweep_grid.yaml"
    if stored.exists():
        before = yaml.safe_load(stored.read_text())
        for key in GRID_KEYS:
            if flags[key] is None and not any(o.startswith(f"sweep.{key}=") for o in overrides):
                setattr(config.sweep, key, before[key])
    return config, out_dir
