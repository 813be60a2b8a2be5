"""The Python API: fit a table, sample rows, save and load a run directory.

A run directory holds everything needed to sample later:

    adapter/          LoRA adapter (peft save_pretrained)
    tokenizer/        the tokenizer
    schema.yaml       the schema, with where each column's metadata came from
    config.yaml       the full run configuration
    privacy.json      epsilon, delta, noise, clip, sample rate, steps, accountant (or dp: false)
    train_log.jsonl   one line per step: loss, epsilon, rows/s, ...
    split.json        which input rows were held out (indexes only)
    training.json     steps, epochs, rows, tokens, seconds, stop reason
    synthetic.csv     rows sampled after training (when saved with them), for `dplm report`
    canaries.csv      random records added to the training rows (audit.canaries), for `dplm audit`
    audit.json        written by `dplm audit`: membership inference, canary exposure, attribute inference
    tracking.json     the experiment trackers' run ids (train.report_to), for the report's scores

It is written to a temporary folder and renamed into place only when complete, so a
failed run leaves no partial directory behind.

A run directory is for the data owner: train_log.jsonl, training.json, split.json, the
report and the audit are computed from the private rows outside the privacy budget
(`PRIVATE_DIAGNOSTICS`). `export_run` (`dplm export`) copies only what may be shared
(`RELEASE`) into a new folder, with a MANIFEST.md saying what epsilon covers.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from dplm import model as models
from dplm.audit import random_records
from dplm.config import RunConfig, from_dict
from dplm.data import load_table
from dplm.errors import DplmError
from dplm.privacy import secret_rng
from dplm.sample import SampleStats, grammar_masks, output_token_ids, sample_rows
from dplm.schema import Schema, coerce_table, dp_metadata_spend, estimate_schema_dp, infer_schema, require_kinds
from dplm.serialize import RowCodec
from dplm.tracking import Trackers
from dplm.train import Checkpoints, TrainResult, process_rank, train

METADATA_DELTA_SHARE = 0.1  # of privacy.delta, for DP category sets (only when some are estimated)
PUBLIC_QUANTITIES = {
    "column_names_and_kinds": (
        "the table's column names and their order (the synthetic rows' column order), which must match the "
        "schema, and every column's kind, which under DP the schema gives (never read off the data)"
    ),
    "num_training_units": (
        "exact count of training units (rows, or subjects with data.subject), used for the sampling rate "
        "q = batch_size / N; treated as public, as in Opacus and the DP-SGD literature (add/remove-one-unit "
        "neighbours change it by one)"
    ),
    "steps": (
        "the number of DP steps: fixed before training by train.max_steps, train.max_epochs and the epsilon "
        "cap (data-independent; train.max_training_time is refused under DP)"
    ),
}
NEIGHBOURS = ("training tables that differ by adding or removing one privacy unit; the holdout split is fixed "
              "by train.seed before training and held-out rows reach nothing that is released")
# What `dplm export` copies from a run directory, and why each may be shared.
RELEASE = {
    "adapter": "the LoRA weights: trained by DP-SGD (covered by epsilon under DP)",
    "tokenizer": "the base model's tokenizer, unchanged (public)",
    "schema.yaml": "columns, kinds and metadata: user-given (public) or DP-estimated (covered by epsilon)",
    "config.yaml": "the run's settings, all given by the user (public; local folders cut from its file paths)",
    "privacy.json": "the accounting: epsilon, delta, settings and the quantities treated as public",
    "synthetic.csv": "rows sampled from the adapter and the schema: post-processing (covered by epsilon under DP)",
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


def split_indexes(num_rows: int, holdout_fraction: float, seed: int,
                  subjects: pd.Series | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/holdout split: `permutation[:n_train]` trains, the rest is held out.

    With `subjects` (one id per row) the permutation is over subjects, so all rows of a
    subject fall on the same side."""
    if subjects is None:
        order = np.random.default_rng(seed).permutation(num_rows)
        n_train = int(round(num_rows * (1 - holdout_fraction)))
        return order[:n_train], order[n_train:]
    codes, uniques = pd.factorize(subjects)
    train_subjects, _ = split_indexes(len(uniques), holdout_fraction, seed)
    in_train = np.isin(codes, train_subjects)
    return np.flatnonzero(in_train), np.flatnonzero(~in_train)


class Synthesizer:
    """A fine-tuned model plus everything needed to sample valid rows from it."""

    def __init__(self, config: RunConfig, codec: RowCodec, model, device=None):
        self.config = config
        self.codec = codec
        self.schema = codec.schema
        self.tokenizer = codec.tokenizer
        self.model = model
        self.device = device or models.default_device()
        self.training: TrainResult | None = None
        self.privacy_record: dict = {"dp": False}
        self.metadata: dict = {"epsilon": 0.0, "delta": 0.0, "estimated": {}}
        self.canaries: pd.DataFrame | None = None
        self.split: dict | None = None
        self.last_sample_stats: SampleStats | None = None
        self.values_cut: dict[str, int] = {}  # training texts cut at max_tokens, per column (private)
        self.tracking_ids: dict = {}  # experiment tracker runs (train.report_to)

    # ---- fit --------------------------------------------------------------------------

    @classmethod
    def fit(cls, data=None, config: RunConfig | None = None, schema: Schema | str | None = None,
            progress: bool = True, checkpoints: Checkpoints | None = None) -> Synthesizer:
        """Fine-tune on `data` (DataFrame, path, Dataset; default `config.data.source`),
        saving resumable `checkpoints` if given (see `train.Checkpoints`)."""
        config = copy.deepcopy(config or RunConfig())
        config.validate()
        device = models.default_device()  # first: under a multi-process launcher this joins the group
        if data is not None:  # the run records where its rows came from, for `dplm report`
            config.data.source = str(data) if isinstance(data, (str, Path)) else None
        table = _input_table(data, config)
        if isinstance(schema, str) or (schema is None and config.data.schema):
            schema = Schema.from_yaml(schema or config.data.schema)
        train_idx, holdout_idx = split_rows(table, config)
        train_df = table.iloc[train_idx]
        subjects = None
        if config.data.subject:
            # The subject column says whose rows are whose; it is not modelled or generated.
            codes, _ = pd.factorize(train_df[config.data.subject])
            subjects = pd.Series(np.arange(len(codes))).groupby(codes).agg(list).tolist()
            train_df = train_df.drop(columns=[config.data.subject])
        tokenizer = models.load_tokenizer(config.model.base)

        def text_lengths(texts: list[str]) -> list[int]:
            return [len(ids) for ids in tokenizer(texts, add_special_tokens=False).input_ids]

        metadata = {"epsilon": 0.0, "delta": 0.0, "estimated": {}}
        p = config.privacy
        resumed = checkpoints.load() if checkpoints else None
        if resumed:  # the schema, its DP spend and the canaries the checkpoint was trained with
            schema = Schema.from_dict(resumed["run_state"]["schema"])
            metadata = resumed["run_state"]["metadata"]
        elif p.enabled:
            units = subjects if subjects is not None else [[i] for i in range(len(train_df))]
            # Rank 0 draws (secret noise differs per process); every rank gets its result.
            schema, metadata = _from_rank0(lambda: estimate_schema_dp(
                train_df, schema, units, p.metadata_epsilon, p.delta * METADATA_DELTA_SHARE, text_lengths,
                secret_rng(p.secure_mode)))
            if p.max_epsilon is not None and metadata["epsilon"] >= p.max_epsilon:
                raise DplmError(f"privacy.metadata_epsilon {p.metadata_epsilon} leaves nothing of privacy.max_epsilon "
                                f"{p.max_epsilon} for training; lower it or give the schema's metadata")
            schema.check_dp_safe()
        else:
            schema = infer_schema(train_df, schema, text_lengths=text_lengths)
        if schema.output_order is None and set(train_df.columns) == set(schema.names):
            schema.set_output_order(list(train_df.columns))  # the rows come out in the table's column order
        rows = coerce_table(train_df, schema)
        canaries = None
        if config.audit.canaries:  # random records whose exposure `dplm audit` measures
            canaries = (pd.DataFrame(resumed["run_state"]["canaries"]) if resumed
                        else _from_rank0(lambda: random_records(schema, config.audit.canaries, secret_rng())))
            first, repeats = len(rows), config.audit.canary_repeats
            rows = pd.concat([rows, coerce_table(pd.concat([canaries] * repeats, ignore_index=True), schema)],
                             ignore_index=True)
            if subjects is not None:  # each canary is one more subject
                subjects = subjects + [[first + i + r * len(canaries) for r in range(repeats)]
                                       for i in range(len(canaries))]
        codec = RowCodec(schema, tokenizer, config.model.value_tokens)
        # On its device before LoRA: peft/Opacus need the adapter created where it will train.
        model = _base_model(config, codec, device)
        m = config.model
        torch.manual_seed(config.train.seed)  # LoRA's random init
        model = models.add_lora(model, m.lora_r, m.lora_alpha, m.lora_dropout, m.target_modules)
        synth = cls(config, codec, model, device)
        sequences = codec.encode_table(rows)
        synth.values_cut = codec.values_cut()
        if checkpoints:
            checkpoints.run_state = {"schema": schema.to_dict(), "metadata": metadata,
                                     "canaries": None if canaries is None else canaries.to_dict("list")}
        masks = grammar_masks(codec, output_token_ids(model), sequences, device) if config.train.grammar_loss else None
        trackers = Trackers(config) if config.train.report_to and process_rank()[0] == 0 else None
        try:
            synth.training = train(model, sequences, tokenizer.pad_token_id, config.train, config.privacy, device,
                                   progress=progress, subjects=subjects, checkpoints=checkpoints,
                                   metadata_epsilon=metadata["epsilon"], metadata_delta=metadata["delta"], masks=masks,
                                   log_step=None if trackers is None else lambda entry: trackers.log(entry, entry["step"]))
        finally:
            if trackers:
                synth.tracking_ids = trackers.run_ids
                trackers.finish()
        if checkpoints and process_rank()[0] == 0:
            # The model is out: a checkpoint of it would resume without the steps taken since.
            shutil.rmtree(checkpoints.folder, ignore_errors=True)
        synth.metadata = metadata
        synth.canaries = canaries
        synth.split = {"seed": config.train.seed, "subject": config.data.subject, "train": train_idx.tolist(),
                       "holdout": holdout_idx.tolist()}
        if subjects is not None:  # the data's subjects, not the canaries added to them
            synth.split["num_training_subjects"] = len(subjects) - (0 if canaries is None else len(canaries))
        synth.privacy_record = synth._privacy_record()
        return synth

    def _privacy_record(self) -> dict:
        metadata = {c.name: c.source for c in self.schema.columns}
        release = {"release": dict(RELEASE), "private_diagnostics": {"note": PRIVATE_NOTE, **PRIVATE_DIAGNOSTICS}}
        if not self.config.privacy.enabled:
            return {"dp": False, "metadata_sources": metadata, **release}
        record = {"dp": True, **self.training.privacy, "max_grad_norm": self.config.privacy.max_grad_norm,
                  "metadata_estimated_under_dp": self.metadata["estimated"],
                  "metadata_user_given": [c.name for c in self.schema.columns if c.source == "user"],
                  "privacy_unit": "row", "neighbouring": NEIGHBOURS, "secure_mode": self.config.privacy.secure_mode,
                  "metadata_sources": metadata, "public_quantities": dict(PUBLIC_QUANTITIES), **release}
        if self.canaries is not None:  # random records, also sampling units: q counts them
            record["audit_canary_rows"] = len(self.canaries) * self.config.audit.canary_repeats
        subject = self.config.data.subject
        if subject:
            # Rows per subject are unbounded: one subject changes the row count by any amount,
            # so no exact row count is released, only the subject count (changed by one).
            record["privacy_unit"] = f"subject (column '{subject}')"
            record["max_records_per_subject"] = self.config.privacy.max_records_per_subject
            record["num_training_subjects"] = self.split["num_training_subjects"]
        else:
            record["num_training_rows"] = len(self.split["train"])
        return record

    # ---- sample -----------------------------------------------------------------------

    def sample(self, num_rows: int | None = None, seed: int | None = None, temperature: float | None = None,
               progress: bool = True, given: pd.DataFrame | None = None) -> pd.DataFrame:
        """`num_rows` synthetic rows, every one valid under the schema. With `given` (a
        DataFrame of any of the schema's columns), one row per given row that keeps its given
        values and draws the others conditionally on them (`sample.GivenValues`)."""
        s = self.config.sample
        df, self.last_sample_stats = sample_rows(
            self.model, self.codec, num_rows or s.num_rows, s.batch_size, temperature or s.temperature,
            s.seed if seed is None else seed, self.device, progress, given, s.given_candidates)
        return df

    # ---- save / load ------------------------------------------------------------------

    def save(self, run_dir: str | Path, synthetic: pd.DataFrame | None = None) -> Path:
        """Write the run directory atomically (see module docstring), with `synthetic` rows if given."""
        run_dir = Path(run_dir)
        if run_dir.exists() and not (run_dir / "config.yaml").exists() and any(run_dir.iterdir()):
            raise DplmError(f"output_dir '{run_dir}' exists and is not a dplm run; choose another folder")
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=run_dir.parent, prefix=f".{run_dir.name}-"))
        try:
            # The base (its value-token rows included) is rebuilt from the schema at load: save LoRA only.
            self.model.save_pretrained(tmp / "adapter", save_embedding_layers=False)
            self.tokenizer.save_pretrained(tmp / "tokenizer")
            self.schema.to_yaml(tmp / "schema.yaml")
            (tmp / "config.yaml").write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False))
            (tmp / "privacy.json").write_text(json.dumps(self.privacy_record, indent=2))
            if synthetic is not None:
                synthetic.to_csv(tmp / "synthetic.csv", index=False)
            if self.canaries is not None:
                self.canaries.to_csv(tmp / "canaries.csv", index=False)
            if self.split:
                (tmp / "split.json").write_text(json.dumps(self.split))
            if self.training:
                info = {k: v for k, v in vars(self.training).items() if k not in ("privacy", "log")}
                info["rows_per_second"] = self.training.rows_per_second
                info["text_values_cut"] = self.values_cut
                (tmp / "training.json").write_text(json.dumps(info, indent=2))
                (tmp / "train_log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in self.training.log))
            if self.tracking_ids:  # reopens the run's tracker runs for the report's scores
                (tmp / "tracking.json").write_text(json.dumps(self.tracking_ids))
            if run_dir.exists():
                shutil.rmtree(run_dir)
            tmp.rename(run_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return run_dir

    def export(self, out_dir: str | Path, synthetic: pd.DataFrame | None = None) -> Path:
        """Write only what may be shared (see `export_run`) into the new folder `out_dir`."""
        with tempfile.TemporaryDirectory() as tmp:
            return export_run(self.save(Path(tmp) / "run", synthetic), out_dir)

    @classmethod
    def load(cls, run_dir: str | Path, device=None) -> Synthesizer:
        run_dir = Path(run_dir)
        if not (run_dir / "config.yaml").exists():
            raise DplmError(f"'{run_dir}' is not a dplm run directory (no config.yaml); give the folder `dplm train` wrote")
        config = from_dict(RunConfig, yaml.safe_load((run_dir / "config.yaml").read_text()))
        schema = Schema.from_yaml(run_dir / "schema.yaml")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(run_dir / "tokenizer")
        device = device or models.default_device()
        codec = RowCodec(schema, tokenizer, config.model.value_tokens)
        model = models.load_adapter(_base_model(config, codec, device), run_dir / "adapter")
        model.eval()
        synth = cls(config, codec, model, device)
        synth.privacy_record = json.loads((run_dir / "privacy.json").read_text())
        if (run_dir / "split.json").exists():
            synth.split = json.loads((run_dir / "split.json").read_text())
        return synth


def export_run(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Copy what a run may share (`RELEASE`: adapter, tokenizer, schema, config, privacy.json,
    synthetic rows) into the new folder `out_dir`, with a MANIFEST.md saying what epsilon
    covers and what is public. The private diagnostics stay behind. Written atomically."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not (run_dir / "config.yaml").exists():
        raise DplmError(f"'{run_dir}' is not a dplm run directory (no config.yaml); give the folder `dplm train` wrote")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DplmError(f"export folder '{out_dir}' already exists; give a new folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    try:
        copied = []
        for name in RELEASE:
            source = run_dir / name
            if source.is_dir():
                shutil.copytree(source, tmp / name)
            elif source.exists():
                shutil.copy2(source, tmp / name)
            else:
                continue
            copied.append(name)
        if "config.yaml" in copied:
            (tmp / "config.yaml").write_text(yaml.safe_dump(_without_local_folders(
                yaml.safe_load((run_dir / "config.yaml").read_text())), sort_keys=False))
        privacy = json.loads((run_dir / "privacy.json").read_text())
        (tmp / "MANIFEST.md").write_text(manifest(privacy, copied, run_dir.name))
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _without_local_folders(config: dict) -> dict:
    """The run's settings with each input and output file path cut to its file name: where the
    data owner keeps files (user names, folder names) is not part of the release."""
    for section, key in (("", "output_dir"), ("", "output_csv"), ("data", "source"), ("data", "schema")):
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
                  f"{privacy['privacy_unit']}; neighbouring datasets: {privacy.get('neighbouring', NEIGHBOURS)}.", "",
                  "Covered by epsilon (derived from the private rows only through DP mechanisms):"]
        estimated = privacy.get("metadata_estimated_under_dp") or {}
        covered = {"adapter": RELEASE["adapter"], "synthetic.csv": RELEASE["synthetic.csv"]}
        lines += [f"- `{n}`: {why}" for n, why in covered.items() if n in files]
        if estimated:
            lines.append("- `schema.yaml`: the DP-estimated metadata of " + ", ".join(
                f"{c} ({', '.join(f)})" for c, f in estimated.items()))
        lines += ["", "Public (given by the user, from the pretrained model, or treated as public):"]
        lines += [f"- `{n}`: {RELEASE[n]}" for n in ("tokenizer", "config.yaml", "privacy.json") if n in files]
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


def plan(config: RunConfig, data=None, schema: Schema | str | None = None) -> dict:
    """The privacy a recipe's run will report, without training: sampling units and rate,
    the steps it takes (its planned steps, or fewer where the epsilon cap stops it), and
    epsilon after each epoch and at the end, metadata included, at the run's deltas. The
    same `PrivacyBudget` the run uses, so the end figure is the one privacy.json will show.
    `data` and `schema` as in `fit` (defaults: `config.data.source`, `config.data.schema`)."""
    import math

    from dplm.privacy import PrivacyBudget
    from dplm.train import planned_steps

    config.validate()
    p, t, subject = config.privacy, config.train, config.data.subject
    table = _input_table(data, config)
    train_rows = table.iloc[split_rows(table, config)[0]]
    if subject:
        units = train_rows[subject].nunique() + config.audit.canaries
        train_rows = train_rows.drop(columns=[subject])
    else:
        units = len(train_rows) + config.audit.canaries * config.audit.canary_repeats
    if isinstance(schema, str) or (schema is None and config.data.schema):
        schema = Schema.from_yaml(schema or config.data.schema)
    schema = require_kinds(train_rows, schema)
    metadata = dp_metadata_spend(schema, p.metadata_epsilon, p.delta * METADATA_DELTA_SHARE)
    sample_rate = t.batch_size / units
    steps_per_epoch = math.ceil(units / t.batch_size)
    total_steps, stop_reason = planned_steps(units, t)
    budget = PrivacyBudget(p.accountant, p.noise_multiplier, sample_rate, p.delta - metadata["delta"],
                           p.max_epsilon, metadata["epsilon"], metadata["delta"])
    epochs = []
    while budget.steps < total_steps:
        if not budget.allows_next_step():
            stop_reason = "max_epsilon"
            break
        budget.step()
        if budget.steps % steps_per_epoch == 0:
            epochs.append((budget.steps, budget.epsilon()))
    return {"units": units, "unit": "subjects" if subject else "rows", "sample_rate": sample_rate,
            "steps_per_epoch": steps_per_epoch, "planned_steps": total_steps, "stop_reason": stop_reason,
            "epochs": epochs, "metadata_estimated": metadata["estimated"], **budget.record()}


def _input_table(data, config: RunConfig) -> pd.DataFrame:
    """The table to model: `data` (default `config.data.source`), cut to `config.data.columns`
    (and the subject column) when the recipe names them."""
    table = load_table(data if data is not None else config.data.source)
    columns = config.data.columns
    if not columns:
        return table
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DplmError(f"data.columns names '{missing[0]}', which is not a column of the table; choose from "
                        f"{list(table.columns)}")
    subject = [config.data.subject] if config.data.subject and config.data.subject not in columns else []
    return table[list(columns) + subject]


def split_rows(table: pd.DataFrame, config: RunConfig) -> tuple[np.ndarray, np.ndarray]:
    """Training and holdout row indexes (by subject when `data.subject` is set)."""
    subject = config.data.subject
    if subject is not None and subject not in table.columns:
        raise DplmError(f"data.subject '{subject}' is not a column of the table; choose one of {list(table.columns)}")
    train_idx, holdout_idx = split_indexes(len(table), config.data.holdout_fraction, config.train.seed,
                                           table[subject] if subject else None)
    if config.data.max_rows:
        train_idx = train_idx[: config.data.max_rows]
    if len(train_idx) == 0:
        raise DplmError("no training rows left after the holdout split; lower data.holdout_fraction")
    return train_idx, holdout_idx


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


def _from_rank0(compute):
    """`compute()` on rank 0 and its result (or its DplmError) on every rank; with one process,
    just `compute()`."""
    rank, world = process_rank()
    result = [None]
    if rank == 0:
        try:
            result = [compute()]
        except DplmError as e:
            result = [e]
    if world > 1:
        torch.distributed.broadcast_object_list(result, src=0)
    if isinstance(result[0], DplmError):
        raise result[0]
    return result[0]


def _base_model(config: RunConfig, codec: RowCodec, device):
    """The frozen base model on `device`; with `model.prune_vocab` its output layer scores
    only the tokens rows use."""
    dtype = models.weight_dtype(config.model.precision, device)
    model = models.load_base_model(config.model.base, len(codec.tokenizer), dtype, config.model.layers)
    models.init_value_embeddings(model, codec.value_token_texts())
    if config.model.prune_vocab:
        models.restrict_output_vocab(model, codec.output_token_ids())
    return model.to(device)


def fit(data=None, config: RunConfig | None = None, **kwargs) -> Synthesizer:
    """Shorthand for `Synthesizer.fit`."""
    return Synthesizer.fit(data, config, **kwargs)


def load(run_dir) -> Synthesizer:
    """Shorthand for `Synthesizer.load`."""
    return Synthesizer.load(run_dir)

