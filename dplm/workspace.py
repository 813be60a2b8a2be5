"""The run directory: its files, which of them are released and which are private diagnostics,
and every read, write and export of them (one owner, as mostlyai-engine's workspace).

    adapter/          LoRA adapter (peft save_pretrained)
    tokenizer/        the tokenizer
    schema.yaml       the schema, with where each column's metadata came from
    config.yaml       the full run configuration
    privacy.json      epsilon, delta, noise, clip, sample rate, steps, accountant (or dp: false)
    plan.json         the settings the plan chose (planner.py)
    statistics.json   the table's binned counts, its rules and the column order read from them
    history.json      histories: the codec's layout and the counts calibrated sampling follows
    synthetic.csv     rows sampled after training (when saved with them), for `dplm report`
    synthetic_subjects.csv  histories: the synthetic subjects' own columns
    train_log.jsonl   one line per step: loss, epsilon, rows/s, ...
    split.json        which input rows were held out (indexes only)
    training.json     steps, epochs, rows, tokens, seconds, stop reason
    canaries.csv      random records added to the training rows (audit.canaries), for `dplm audit`
    audit.json        written by `dplm audit`: membership inference, canary exposure, attribute inference
    report.html/json  written by `dplm report`
    tracking.json     the experiment trackers' run ids (train.report_to), for the report's scores

A run directory is written to a temporary folder and renamed into place only when complete, so
a failed run leaves no partial directory behind. It is for the data owner: train_log.jsonl,
training.json, split.json, the report and the audit are computed from the private rows outside
the privacy budget (`PRIVATE_DIAGNOSTICS`). `export_run` (`dplm export`) copies only what may be
shared (`RELEASE`) into a new folder, with a MANIFEST.md saying what epsilon covers. A run's
checkpoints sit beside it (`checkpoints_for`: `<output_dir>.checkpoint`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import yaml

from dplm.config import RunConfig, from_dict
from dplm.data import write_atomic
from dplm.errors import DplmError
from dplm.histories import Histories, layout_schemas
from dplm.marginals import Marginals
from dplm.planner import TrainingPlan
from dplm.schema import Schema
from dplm.train import Checkpoints

# What `dplm export` copies from a run directory, and why each may be shared.
RELEASE = {
    "adapter": "the LoRA weights: trained by DP-SGD (covered by epsilon under DP)",
    "tokenizer": "the base model's tokenizer, unchanged (public)",
    "schema.yaml": "columns, kinds and metadata: user-given (public) or DP-estimated (covered by epsilon)",
    "config.yaml": "the run's settings, all given by the user (public; local folders cut from its file paths)",
    "privacy.json": "the accounting: epsilon, delta, settings and the quantities treated as public",
    "plan.json": "the training plan: the settings dplm chose, from public quantities only (planner.py)",
    "statistics.json": ("the table's binned one- and two-way counts and the rules and column order read from them: "
                        "Gaussian-noised under DP (covered by epsilon: their rounds are in the accountant)"),
    "synthetic.csv": ("rows sampled from the adapter and the schema, kept by the statistics' one-way counts "
                      "(histories: by the counts of subjects per rows and span; sample.calibration): post-processing (covered by "
                      "epsilon under DP)"),
    "synthetic_subjects.csv": "histories: the sampled subjects' own columns (post-processing, like synthetic.csv)",
    "history.json": ("histories: which columns are the subject's and which its rows', the ordering column and the "
                     "history cap and the subject counts calibrated sampling follows (without DP exact, per rows and span; "
                     "under DP per rows, DP-estimated and counted in epsilon)"),
    "text_models": ("a LoRA adapter per text column with its own model (`text_models/<k>/adapter`): trained by DP-SGD "
                    "(covered by epsilon under DP, composed with the table model's steps)"),
    "text_models.json": "which column each text model writes, its prompt's columns and the text plan (public quantities)",
}
# What stays in the run directory: for the data owner, not covered by epsilon.
PRIVATE_DIAGNOSTICS = {
    "train_log.jsonl": "each step's exact loss, realised batch size and timings, from the private batches",
    "training.json": "rows and tokens seen, last loss and timings of the private batches, texts cut at their cap",
    "split.json": "which input rows trained and which were held out",
    "report.html": "scores comparing the synthetic rows with the private training and holdout rows",
    "report.json": "scores comparing the synthetic rows with the private training and holdout rows",
    "audit.json": "membership and canary attacks measured on the private training rows",
    "canaries.csv": "the audit's secret canary records",
    "tracking.json": "ids of the experiment tracker runs that log the training diagnostics and scores",
    "point.json": "a sweep point's scores, audit and timings",
}
PRIVATE_NOTE = "for the data owner; not covered by epsilon: never share them (`dplm export` leaves them out)"
NOT_A_RUN = "'{}' is not a dplm run directory (no config.yaml); give the folder `dplm train` wrote"


class RunDirectory:
    """One run directory: each file read by name (`json`, `config`, `schema`, ...); `write`
    writes a whole run atomically, `write_json` / `write_text` one file written after the run
    (the report, the audit, a sweep point)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def check(self) -> RunDirectory:
        """The directory, if it is a run's; else a one-line error."""
        if not (self.path / "config.yaml").exists():
            raise DplmError(NOT_A_RUN.format(self.path))
        return self

    def has(self, name: str) -> bool:
        return (self.path / name).exists()

    def json(self, name: str, default=None):
        """A JSON file's content (`default` when the run has no such file)."""
        path = self.path / name
        return json.loads(path.read_text()) if path.exists() else default

    def config(self) -> RunConfig:
        return from_dict(RunConfig, yaml.safe_load((self.path / "config.yaml").read_text()))

    def schema(self) -> Schema:
        return Schema.from_yaml(self.path / "schema.yaml")

    def plan(self) -> TrainingPlan | None:
        values = self.json("plan.json")
        return values and TrainingPlan.from_dict(values)

    def marginals(self) -> Marginals | None:
        values = self.json("statistics.json")
        return values and Marginals.from_dict(values["marginals"])

    def history_schemas(self) -> tuple[Schema, Schema] | None:
        """A run of histories: its subject columns' and event columns' schemas (None for rows)."""
        layout = self.json("history.json")
        return layout and layout_schemas(layout, self.schema())

    def train_log(self) -> list[dict]:
        path = self.path / "train_log.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def write_json(self, name: str, value) -> Path:
        return self.write_text(name, json.dumps(value, indent=2, default=float))

    def write_text(self, name: str, text: str) -> Path:
        """One file, whole or not at all (`data.write_atomic`)."""
        return write_atomic(self.path / name, text)

    def write(self, synth, synthetic=None) -> Path:
        """Write the run of `synth` (a `Synthesizer`), with `synthetic` rows if given, into a
        temporary folder renamed into place when complete."""
        run_dir = self.path
        if run_dir.exists() and not (run_dir / "config.yaml").exists() and any(run_dir.iterdir()):
            raise DplmError(f"output_dir '{run_dir}' exists and is not a dplm run; choose another folder")
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=run_dir.parent, prefix=f".{run_dir.name}-"))
        try:
            files = RunDirectory(tmp)
            # The base (its value-token rows included) is rebuilt from the schema at load: save LoRA only.
            synth.model.save_pretrained(tmp / "adapter", save_embedding_layers=False)
            synth.tokenizer.save_pretrained(tmp / "tokenizer")
            for k, text_model in enumerate(synth.text_models):
                text_model.model.save_pretrained(tmp / "text_models" / str(k) / "adapter", save_embedding_layers=False)
            if synth.text_models:
                files.write_json("text_models.json", {"plan": synth.text_plan.to_dict(),
                                                      "models": [t.layout() for t in synth.text_models]})
            synth.schema.to_yaml(tmp / "schema.yaml")
            files.write_text("config.yaml", yaml.safe_dump(synth.config.to_dict(), sort_keys=False))
            files.write_json("privacy.json", synth.privacy_record)
            if synth.training_plan:
                files.write_json("plan.json", synth.training_plan.to_dict())
            if synth.marginals:
                files.write_text("statistics.json", json.dumps(
                    {"dp": synth.config.privacy.enabled, "column_order": synth.codec.schema.names,
                     "rules": synth.rules.to_dict(), "marginals": synth.marginals.to_dict()}, indent=1))
            if isinstance(synthetic, Histories):
                synthetic.write(tmp / "synthetic.csv")
            elif synthetic is not None:
                synthetic.to_csv(tmp / "synthetic.csv", index=False)
            if synth.is_history:
                files.write_json("history.json", {**synth.codec.layout(), **synth.bounds.counts()})
            if synth.canaries is not None:
                synth.canaries.to_csv(tmp / "canaries.csv", index=False)
            if synth.split:
                files.write_text("split.json", json.dumps(synth.split))
            if synth.training:
                info = {k: v for k, v in vars(synth.training).items() if k not in ("privacy", "log")}
                info["rows_per_second"] = synth.training.rows_per_second
                info["text_values_cut"] = synth.values_cut
                if synth.text_models:
                    info["text_models"] = [{k: v for k, v in vars(t.training).items() if k not in ("privacy", "log")}
                                           for t in synth.text_models if t.training]
                if synth.pretraining:  # the first stage, on rows drawn from the statistics
                    info["pretraining"] = {k: v for k, v in vars(synth.pretraining).items()
                                           if k not in ("privacy", "log")}
                files.write_json("training.json", info)
                files.write_text("train_log.jsonl", "".join(json.dumps(e) + "\n" for e in synth.training.log))
            if synth.tracking_ids:  # reopens the run's tracker runs for the report's scores
                files.write_text("tracking.json", json.dumps(synth.tracking_ids))
            if run_dir.exists():
                shutil.rmtree(run_dir)
            tmp.rename(run_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return run_dir


def export_run(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Copy what a run may share (`RELEASE`: adapter, tokenizer, schema, config, privacy.json,
    synthetic rows) into the new folder `out_dir`, with a MANIFEST.md saying what epsilon
    covers and what is public. The private diagnostics stay behind. Written atomically."""
    run = RunDirectory(run_dir).check()
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DplmError(f"export folder '{out_dir}' already exists; give a new folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    try:
        copied = []
        for name in RELEASE:
            source = run.path / name
            if source.is_dir():
                shutil.copytree(source, tmp / name)
            elif source.exists():
                shutil.copy2(source, tmp / name)
            else:
                continue
            copied.append(name)
        exported = RunDirectory(tmp)
        if "config.yaml" in copied:
            exported.write_text("config.yaml", yaml.safe_dump(without_local_folders(
                yaml.safe_load((run.path / "config.yaml").read_text())), sort_keys=False))
        exported.write_text("MANIFEST.md", manifest(run.json("privacy.json"), copied, run.path.name))
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def without_local_folders(config: dict) -> dict:
    """The run's settings with each input and output file path cut to its file name: where the
    data owner keeps files (user names, folder names) is not part of the release."""
    for section, key in (("", "output_dir"), ("", "output_csv"), ("data", "source"), ("data", "schema"),
                         ("data", "subjects"), ("train", "tracking_dir")):
        holder = config.get(section, {}) if section else config
        if isinstance(holder.get(key), str):
            holder[key] = Path(holder[key].replace("\\", "/")).name
    return config


def manifest(privacy: dict, files: list[str], run_name: str) -> str:
    """The MANIFEST.md of an export: what epsilon covers, what is public, what was left out."""
    lines = [f"# dplm export of run '{run_name}'", ""]
    if privacy.get("dp"):
        lines += [f"Differential privacy: epsilon = {privacy['epsilon']:.4f} at delta = {privacy['delta']:g} "
                  f"(schema metadata {privacy['metadata_epsilon']:.4g} + training {privacy['training_epsilon']:.4f}; "
                  f"{privacy['accountant']} accountant, {privacy['steps']} steps), privacy unit: "
                  f"{privacy['privacy_unit']}; neighbouring datasets: {privacy['neighbouring']}.", "",
                  "Covered by epsilon (derived from the private rows only through DP mechanisms):"]
        estimated = privacy.get("metadata_estimated_under_dp") or {}
        covered = {n: RELEASE[n] for n in ("adapter", "text_models", "synthetic.csv", "synthetic_subjects.csv",
                                           "statistics.json", "history.json")}
        lines += [f"- `{n}`: {why}" for n, why in covered.items() if n in files]
        if estimated:
            lines.append("- `schema.yaml`: the DP-estimated metadata of " + ", ".join(
                f"{c} ({', '.join(f)})" for c, f in estimated.items()))
        lines += ["", "Public (given by the user, from the pretrained model, or treated as public):"]
        lines += [f"- `{n}`: {RELEASE[n]}" for n in ("tokenizer", "config.yaml", "plan.json", "text_models.json",
                                                     "privacy.json") if n in files]
        if privacy.get("metadata_user_given"):
            lines.append("- `schema.yaml`: the user-given metadata of " + ", ".join(privacy["metadata_user_given"]))
        lines += [f"- {name.replace('_', ' ')}: {why}" for name, why in privacy.get("public_quantities", {}).items()]
    else:
        lines += ["Differential privacy: **none** (DP was off). Nothing here is covered by a privacy guarantee: "
                  "the adapter, the synthetic rows and the schema's learned metadata come from the private rows "
                  "directly.", "", "Files:"]
        lines += [f"- `{n}`" for n in files]
    lines += ["", "Left out: the run directory's private diagnostics, " + PRIVATE_NOTE + ":"]
    lines += [f"- `{n}`: {why}" for n, why in PRIVATE_DIAGNOSTICS.items()]
    return "\n".join(lines) + "\n"


# Settings a resumed run may change: they only say when to stop or how to compute.
RESUMABLE_CHANGES = {"train": {"max_epochs", "max_steps", "max_training_time", "threads", "micro_batch_size",
                               "checkpoint_every"}, "privacy": {"max_epsilon"}}


def checkpoints_for(config: RunConfig, resume: bool = False) -> Checkpoints | None:
    """Checkpoints of a `dplm train` run, next to its output folder (`<output_dir>.checkpoint`)."""
    if not config.train.checkpoint_every:
        return None
    key = {f"{section}.{name}": value for section, values in config.to_dict().items() if isinstance(values, dict)
           and section in ("data", "model", "train", "privacy", "audit") for name, value in values.items()
           if name not in RESUMABLE_CHANGES.get(section, ())}
    folder = Path(config.output_dir).with_name(Path(config.output_dir).name + ".checkpoint")
    return Checkpoints(folder, config.train.checkpoint_every, resume, key)
