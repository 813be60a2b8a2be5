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
import dataclasses
import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from dplm import model as models
from dplm.audit import random_records
from dplm.config import RunConfig, TrainConfig, from_dict
from dplm.data import load_table
from dplm.errors import DplmError
from dplm.histories import (
    HISTORY_PLAN_ROWS, LENGTH_TOLERANCE, HistoryCodec, Histories, TrainingHistories, calibrated_subjects,
    check_subject_columns_constant, check_subject_table, drawn_lengths, rows_gap, sample_histories,
)
from dplm.marginals import Marginals, Rules, measure
from dplm.planner import MachineSpeed, Plan, machine_speed, make_plan, resolved, row_tokens, statistics_history
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
    "plan": (
        "the settings dplm chose (plan.json): from the unit count, epsilon, delta, the schema's kinds and given "
        "bounds, and the compute budget only (a history counts as a fixed number of rows in the budget)"
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

    With `subjects` (one id per row) the permutation is over the sorted distinct subjects, so
    all rows of a subject fall on the same side."""
    if subjects is None:
        order = np.random.default_rng(seed).permutation(num_rows)
        n_train = int(round(num_rows * (1 - holdout_fraction)))
        return order[:n_train], order[n_train:]
    in_train = subjects.isin(subject_split(subjects, holdout_fraction, seed)).to_numpy()
    return np.flatnonzero(in_train), np.flatnonzero(~in_train)


def subject_split(keys: pd.Series, holdout_fraction: float, seed: int) -> set:
    """The training subjects: the permutation over the sorted distinct `keys`, its first share."""
    uniques = np.unique(keys.dropna().to_numpy())
    train, _ = split_indexes(len(uniques), holdout_fraction, seed)
    return set(uniques[train].tolist())


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
        self.plan: Plan | None = None  # what the run chose (planner.make_plan)
        self.marginals: Marginals | None = None  # the table's statistics (DP under DP)
        self.rules: Rules | None = None  # pairs sampling keeps tied (marginals.Rules)
        self.pretraining: TrainResult | None = None  # the first stage on rows drawn from the statistics
        self.subject_counts: list | None = None  # histories: `histories.subject_counts` (noisy under DP)
        self.subject_sums: dict | None = None  # histories without DP: `histories.subject_sums`

    @property
    def plan_record(self) -> dict | None:
        return self.plan.to_dict() if self.plan else None

    # ---- fit --------------------------------------------------------------------------

    @classmethod
    def fit(cls, data=None, config: RunConfig | None = None, schema: Schema | str | None = None,
            progress: bool = True, checkpoints: Checkpoints | None = None, subjects=None) -> Synthesizer:
        """Fine-tune on `data` (DataFrame, path, Dataset; default `config.data.source`),
        saving resumable `checkpoints` if given (see `train.Checkpoints`). With `data.subject`
        (histories, the default mode) `subjects` is the subject table (or `data.subjects`)."""
        config = copy.deepcopy(config or RunConfig())
        config.validate()
        device = models.default_device()  # first: under a multi-process launcher this joins the group
        if data is not None:  # the run records where its rows came from, for `dplm report`
            config.data.source = str(data) if isinstance(data, (str, Path)) else None
        if subjects is not None:
            config.data.subjects = str(subjects) if isinstance(subjects, (str, Path)) else None
        key, is_history = config.data.subject, bool(config.data.subject) and config.data.mode == "histories"
        table = _input_table(data, config)
        subject_table = None
        if is_history:
            table, subject_table = _history_tables(table, subjects, config)
        if isinstance(schema, str) or (schema is None and config.data.schema):
            schema = Schema.from_yaml(schema or config.data.schema)
        train_idx, holdout_idx = split_rows(table, config, subject_table)
        train_df = table.iloc[train_idx]
        history = None
        flat_units = None  # flat mode: each subject's row positions
        if is_history:
            train_subjects = subject_table[subject_table[key].isin(training_keys(table, config, subject_table))] \
                if subject_table is not None else None
            history = TrainingHistories.of(train_df, train_subjects, key, config.data.order_by)
            train_df = history.frame  # the subject's columns beside its rows: what the schema describes
        elif key:
            # The subject column says whose rows are whose; it is not modelled or generated.
            codes, _ = pd.factorize(train_df[key])
            flat_units = pd.Series(np.arange(len(codes))).groupby(codes).agg(list).tolist()
            train_df = train_df.drop(columns=[key])
        tokenizer = models.load_tokenizer(config.model.base)

        def text_lengths(texts: list[str]) -> list[int]:
            return [len(ids) for ids in tokenizer(texts, add_special_tokens=False).input_ids]

        metadata = {"epsilon": 0.0, "delta": 0.0, "estimated": {}}
        p = config.privacy
        resumed = checkpoints.load() if checkpoints else None
        # `given`: the user's schema (under DP, before any estimate): the plan and the statistics'
        # rounds depend on it alone, as `dplm plan` sees it.
        if resumed:  # the schema (in its order), its DP spend and the canaries the checkpoint was trained with
            schema = Schema.from_dict(resumed["run_state"]["schema"])
            given = Schema.from_dict(resumed["run_state"]["given_schema"])
            metadata = resumed["run_state"]["metadata"]
        elif p.enabled:
            units = history.units if history else flat_units if flat_units is not None else \
                [[i] for i in range(len(train_df))]
            given = require_kinds(train_df, schema)
            # Rank 0 draws (secret noise differs per process); every rank gets its result.
            schema, metadata = _from_rank0(lambda: estimate_schema_dp(
                train_df, given, units, p.metadata_epsilon, p.delta * METADATA_DELTA_SHARE, text_lengths,
                secret_rng(p.secure_mode)))
            if history:  # the longest history kept: public, or a noisy quantile (its epsilon counted)
                metadata = _from_rank0(lambda: history.bound_length(config.data.max_history, metadata,
                                                                    epsilon=p.metadata_epsilon,
                                                                    rng=secret_rng(p.secure_mode)))
            if p.max_epsilon is not None and metadata["epsilon"] >= p.max_epsilon:
                raise DplmError(f"privacy.metadata_epsilon {p.metadata_epsilon} leaves nothing of privacy.max_epsilon "
                                f"{p.max_epsilon} for training; lower it or give the schema's metadata")
            schema.check_dp_safe()
        else:
            schema = given = history.infer_schema(schema, text_lengths) if history else \
                infer_schema(train_df, schema, text_lengths=text_lengths)
            if history:
                metadata = history.bound_length(config.data.max_history, metadata, schema)
        if history:  # every rank, and a resumed run: the cap and counts the metadata holds (drawn once, on rank 0)
            history.restore_length(metadata)
        if schema.output_order is None and set(train_df.columns) == set(schema.names):
            schema.set_output_order(list(train_df.columns))  # the rows come out in the table's column order
        if history:
            history.type(schema)
            rows = history.events
        else:
            rows = coerce_table(train_df, schema)
        canaries = None
        if config.audit.canaries:  # random records whose exposure `dplm audit` measures
            canaries = (pd.DataFrame(resumed["run_state"]["canaries"]) if resumed
                        else _from_rank0(lambda: random_records(schema, config.audit.canaries, secret_rng())))
            repeats = config.audit.canary_repeats
            if history:  # each canary is one more subject, with `repeats` copies of the record as its rows
                history.add_canaries(canaries, repeats)
                rows = history.events
            else:
                first = len(rows)
                rows = pd.concat([rows, coerce_table(pd.concat([canaries] * repeats, ignore_index=True), schema)],
                                 ignore_index=True)
                if flat_units is not None:  # each canary is one more subject
                    flat_units = flat_units + [[first + i + r * len(canaries) for r in range(repeats)]
                                           for i in range(len(canaries))]
        units = history.event_units if history else flat_units if flat_units is not None else \
            [[i] for i in range(len(rows))]
        plan_units = len(history.units) if history else len(units)
        unit_rows = history.plan_rows(p.enabled) if history else None
        # A resumed run keeps the speed its plan was sized by (another machine would measure another).
        speed = resumed["run_state"]["speed"] if resumed else machine_speed(config, given, device, unit_rows)
        plan = make_plan(config, plan_units, given, metadata["epsilon"], metadata["delta"], unit_rows=unit_rows,
                         speed=MachineSpeed(**speed) if isinstance(speed, dict) else speed)
        config = resolved(config, plan)
        stats_schema = history.event_schema(schema) if history else schema
        if resumed:  # measured once, with the checkpoint (never charged twice)
            marginals = resumed["run_state"]["marginals"] and Marginals.from_dict(resumed["run_state"]["marginals"])
        elif not p.enabled:
            marginals = measure(rows, stats_schema, units, None)
        elif plan.statistics_noise:
            z = plan.statistics_noise
            marginals = _from_rank0(lambda: measure(rows, stats_schema, units,
                                                    {"one_way": z, "two_way": z, "both_nonzero": z},
                                                    secret_rng(p.secure_mode), _statistics_schema(given, history)))
        else:
            marginals = None
        if marginals and config.model.column_order == "auto" and not resumed:
            schema = ordered(schema, marginals.column_order(config.train.seed))
        rules = marginals.rules() if marginals else None
        if history:
            codec, orders = history.codec(schema, tokenizer, config.model.value_tokens, metadata), None
            sequences = history.encode(codec)
        else:
            codec = RowCodec(schema, tokenizer, config.model.value_tokens)
            orders = row_orders(codec, len(rows), config) if config.model.column_order == "random" else None
            sequences = codec.encode_table(rows, orders)
        # On its device before LoRA: peft/Opacus need the adapter created where it will train.
        model = _base_model(config, codec, device)
        m = config.model
        torch.manual_seed(config.train.seed)  # LoRA's random init
        model = models.add_lora(model, m.lora_r, m.lora_alpha, m.lora_dropout, m.target_modules)
        synth = cls(config, codec, model, device)
        synth.plan, synth.marginals, synth.rules = plan, marginals, rules
        synth.values_cut = codec.values_cut()
        if history:
            synth.values_cut = {**synth.values_cut, **history.cut}
            synth.subject_counts, synth.subject_sums = metadata["subject_counts"], metadata["subject_sums"]
        if checkpoints:
            checkpoints.run_state = {"schema": schema.to_dict(), "given_schema": given.to_dict(), "metadata": metadata,
                                     "canaries": None if canaries is None else canaries.to_dict("list"),
                                     "marginals": marginals.to_dict() if marginals else None,
                                     "speed": plan.speed and dataclasses.asdict(plan.speed)}
        token_ids = output_token_ids(model)
        masks = grammar_masks(codec, token_ids, sequences, device, orders) if config.train.grammar_loss else None
        if plan.pretrain_rows and not resumed:  # free: rows drawn from the DP statistics (post-processing)
            start_rows = coerce_table(marginals.tree_rows(plan.pretrain_rows, schema,
                                                          np.random.default_rng(config.train.seed), rules), schema)
            start_orders = row_orders(codec, len(start_rows), config) if orders else None
            start = codec.encode_table(start_rows, start_orders)
            start_masks = grammar_masks(codec, token_ids, start, device, start_orders) \
                if config.train.grammar_loss else None
            synth.pretraining = train(model, start, tokenizer.pad_token_id, pretraining_config(config.train),
                                      dataclasses.replace(p, enabled=False), device, progress=progress,
                                      masks=start_masks)
        trackers = Trackers(config) if config.train.report_to and process_rank()[0] == 0 else None
        try:
            synth.training = train(model, sequences, tokenizer.pad_token_id, config.train, config.privacy, device,
                                   progress=progress, subjects=flat_units, checkpoints=checkpoints,
                                   metadata_epsilon=metadata["epsilon"], metadata_delta=metadata["delta"], masks=masks,
                                   log_step=None if trackers is None else lambda entry: trackers.log(entry, entry["step"]),
                                   prior=statistics_history(plan, _statistics_schema(given, history)),
                                   unit_tokens=float(row_tokens(schema) * HISTORY_PLAN_ROWS) if history else None)
        finally:
            if trackers:
                synth.tracking_ids = trackers.run_ids
                trackers.finish()
        if checkpoints and process_rank()[0] == 0:
            # The model is out: a checkpoint of it would resume without the steps taken since.
            shutil.rmtree(checkpoints.folder, ignore_errors=True)
        synth.metadata = metadata
        synth.canaries = canaries
        synth.split = {"seed": config.train.seed, "subject": key, "train": train_idx.tolist(),
                       "holdout": holdout_idx.tolist()}
        if key:  # the data's subjects, not the canaries added to them
            count = len(history.units) if history else len(flat_units)
            synth.split["num_training_subjects"] = count - (0 if canaries is None else len(canaries))
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
            record["num_training_subjects"] = self.split["num_training_subjects"]
            if self.is_history:  # one whole history a subject, at most max_history rows of it
                record["unit_contribution"] = "one sequence: the subject's history, cut at max_history rows"
                record["max_history"] = self.codec.max_rows
                record["max_history_source"] = "user" if self.config.data.max_history else "dp"
            else:
                record["max_records_per_subject"] = self.config.privacy.max_records_per_subject
        else:
            record["num_training_rows"] = len(self.split["train"])
        return record

    # ---- sample -----------------------------------------------------------------------

    @property
    def is_history(self) -> bool:
        """Does the model write whole subjects (`histories.HistoryCodec`), or rows?"""
        return isinstance(self.codec, HistoryCodec)

    def sample(self, num_rows: int | None = None, seed: int | None = None, temperature: float | None = None,
               progress: bool = True, given: pd.DataFrame | None = None) -> pd.DataFrame | Histories:
        """`num_rows` synthetic rows, every one valid under the schema. With `given` (a
        DataFrame of any of the schema's columns), one row per given row that keeps its given
        values and draws the others conditionally on them (`sample.GivenValues`). Rows that
        break the table's rules (`marginals.Rules`) are drawn again.

        A run of histories (`data.subject`) returns `num_rows` whole subjects instead: a
        `histories.Histories` (the subject table and the event table, fresh keys 1..n); `given`
        then holds subject columns, one subject per given row."""
        s = self.config.sample
        draws = s.draws_per_unit(self.is_history)
        num_rows, seed, temperature = num_rows or s.num_rows, s.seed if seed is None else seed, temperature or s.temperature
        # The table's rules, except those between given columns (their values are the user's).
        rules = self.rules.without(list(given.columns) if given is not None else []) if self.rules else None
        keep = (lambda rows: rules.kept(rows, self.schema)) if rules else None
        if self.is_history:
            key = self.config.data.subject
            keys = given[key].tolist() if given is not None and key in given.columns else None
            calibrate = given is None and self.subject_counts is not None and draws > 1
            drawn, rng = math.ceil(num_rows * draws) if calibrate else num_rows, np.random.default_rng(seed)

            def draw(lengths=None):
                return sample_histories(self.model, self.codec, drawn, key, s.batch_size, temperature, seed,
                                        self.device, progress, given.drop(columns=[key]) if keys is not None else given,
                                        keep, self.schema.output_order or self.schema.names, lengths)

            out, self.last_sample_stats = draw()
            if calibrate:
                counts, cap = self.subject_counts, self.codec.max_rows

                def chosen_of(drawn_subjects, sums):
                    return calibrated_subjects(drawn_subjects, key, counts, cap, num_rows, rng,
                                               self.codec.order_column(), sums)

                chosen = chosen_of(out, self.subject_sums)
                if self.subject_sums and rows_gap(chosen, key, counts, cap) > LENGTH_TOLERANCE:
                    chosen = chosen_of(out, None)  # the sums pull the rows off: rows and spans alone
                if rows_gap(chosen, key, counts, cap) > LENGTH_TOLERANCE:
                    # The model's own lengths stay off the counts after raking (few or noisy steps):
                    # draw again, each history held to a number of rows drawn from the counts (and
                    # chosen by rows and spans alone: raking such a model's sums pulls the rows off).
                    first = self.last_sample_stats
                    out, again = draw(drawn_lengths(counts, cap, self.codec.min_rows, drawn, rng))
                    self.last_sample_stats = SampleStats(first.rows_generated + again.rows_generated,
                                                         first.rows_returned + again.rows_returned,
                                                         first.seconds + again.seconds)
                    chosen = chosen_of(out, None)
                out = chosen
                self.last_sample_stats = dataclasses.replace(self.last_sample_stats, rows_kept=len(out))
            if keys is not None:  # the given subjects keep their keys
                out = out.with_keys(key, keys)
            return out
        calibrate = given is None and self.marginals is not None and draws > 1
        codec = self.codec
        if given is not None and self.config.model.column_order == "random":
            # The model has seen every order: it writes the given columns first, then draws the others.
            codec = RowCodec(ordered(self.schema, [n for n in self.schema.names if n in given.columns]),
                             self.codec.tokenizer, self.codec.value_tokens)
        df, self.last_sample_stats = sample_rows(
            self.model, codec, math.ceil(num_rows * draws) if calibrate else num_rows, s.batch_size,
            temperature, seed, self.device, progress, given, s.given_candidates, keep)
        if calibrate:
            df = self.marginals.calibrated(df, self.schema, num_rows, np.random.default_rng(seed))
            self.last_sample_stats = dataclasses.replace(self.last_sample_stats, rows_kept=len(df))
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
            if self.plan:
                (tmp / "plan.json").write_text(json.dumps(self.plan.to_dict(), indent=2))
            if self.marginals:
                (tmp / "statistics.json").write_text(json.dumps(
                    {"dp": self.config.privacy.enabled, "column_order": self.schema.names,
                     "rules": self.rules.to_dict(), "marginals": self.marginals.to_dict()}, indent=1))
            if isinstance(synthetic, Histories):
                synthetic.write(tmp / "synthetic.csv")
            elif synthetic is not None:
                synthetic.to_csv(tmp / "synthetic.csv", index=False)
            if self.is_history:
                (tmp / "history.json").write_text(json.dumps(
                    {**self.codec.layout(), "subject_counts": self.subject_counts, "subject_sums": self.subject_sums}, indent=2))
            if self.canaries is not None:
                self.canaries.to_csv(tmp / "canaries.csv", index=False)
            if self.split:
                (tmp / "split.json").write_text(json.dumps(self.split))
            if self.training:
                info = {k: v for k, v in vars(self.training).items() if k not in ("privacy", "log")}
                info["rows_per_second"] = self.training.rows_per_second
                info["text_values_cut"] = self.values_cut
                if self.pretraining:  # the first stage, on rows drawn from the statistics
                    info["pretraining"] = {k: v for k, v in vars(self.pretraining).items() if k not in ("privacy", "log")}
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
        layout = json.loads((run_dir / "history.json").read_text()) if (run_dir / "history.json").exists() else None
        if layout:
            codec = HistoryCodec.from_layout(layout, schema, tokenizer, config.model.value_tokens)
        else:
            codec = RowCodec(schema, tokenizer, config.model.value_tokens)
        model = models.load_adapter(_base_model(config, codec, device), run_dir / "adapter")
        model.eval()
        synth = cls(config, codec, model, device)
        synth.privacy_record = json.loads((run_dir / "privacy.json").read_text())
        synth.subject_counts = layout and layout.get("subject_counts")
        synth.subject_sums = layout and layout.get("subject_sums")
        if (run_dir / "plan.json").exists():
            synth.plan = Plan.from_dict(json.loads((run_dir / "plan.json").read_text()))
        if (run_dir / "statistics.json").exists():
            synth.marginals = Marginals.from_dict(json.loads((run_dir / "statistics.json").read_text())["marginals"])
            synth.rules = synth.marginals.rules()
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
        covered = {n: RELEASE[n] for n in ("adapter", "synthetic.csv", "synthetic_subjects.csv", "statistics.json",
                                           "history.json")}
        lines += [f"- `{n}`: {why}" for n, why in covered.items() if n in files]
        if estimated:
            lines.append("- `schema.yaml`: the DP-estimated metadata of " + ", ".join(
                f"{c} ({', '.join(f)})" for c, f in estimated.items()))
        lines += ["", "Public (given by the user, from the pretrained model, or treated as public):"]
        lines += [f"- `{n}`: {RELEASE[n]}" for n in ("tokenizer", "config.yaml", "plan.json", "privacy.json")
                  if n in files]
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
    """What a recipe's run will do, without training: the plan (`planner.make_plan`: every
    setting the recipe leaves out, chosen from public quantities), and under DP the sampling
    units and rate, the DP-SGD steps (fewer where the epsilon cap stops them), and epsilon after
    each epoch and at the end, schema metadata and the table's statistics included, at the
    run's deltas: the figure privacy.json will show. `data` and `schema` as in `fit`
    (defaults: `config.data.source`, `config.data.schema`)."""
    from dplm.privacy import PrivacyBudget, epsilon_of_history
    from dplm.train import planned_steps

    config.validate()
    p, subject = config.privacy, config.data.subject
    is_history = bool(subject) and config.data.mode == "histories"
    table, subject_table = _input_table(data, config), None
    if is_history:
        table, subject_table = _history_tables(table, None, config)
    train_rows = table.iloc[split_rows(table, config, subject_table)[0]]
    history = None
    if is_history:
        own = subject_table[subject_table[subject].isin(training_keys(table, config, subject_table))] \
            if subject_table is not None else None
        history = TrainingHistories.of(train_rows, own, subject, config.data.order_by)
        units, train_rows = len(history.units) + config.audit.canaries, history.frame
    elif subject:
        units = train_rows[subject].nunique() + config.audit.canaries
        train_rows = train_rows.drop(columns=[subject])
    else:
        units = len(train_rows) + config.audit.canaries * config.audit.canary_repeats
    if isinstance(schema, str) or (schema is None and config.data.schema):
        schema = Schema.from_yaml(schema or config.data.schema)
    unit_rows = history.plan_rows(p.enabled) if history else None
    if not p.enabled:
        schema = history.infer_schema(schema, None) if history else infer_schema(train_rows, schema)
        chosen = make_plan(config, units, schema, unit_rows=unit_rows)
        return {"units": units, "unit": "subjects" if subject else "rows", "plan": chosen.to_dict(),
                "plan_lines": chosen.lines()}
    schema = require_kinds(train_rows, schema)
    metadata = dp_metadata_spend(schema, p.metadata_epsilon, p.delta * METADATA_DELTA_SHARE)
    if history and config.data.max_history is None:  # the history cap's DP estimate
        metadata["epsilon"] += p.metadata_epsilon
        metadata["estimated"]["(rows per subject)"] = ["max_history"]
    speed = machine_speed(config, schema, models.default_device(), unit_rows)
    chosen = make_plan(config, units, schema, metadata["epsilon"], metadata["delta"], unit_rows=unit_rows, speed=speed)
    t = resolved(config, chosen).train
    sample_rate = t.batch_size / units
    steps_per_epoch = math.ceil(units / t.batch_size)
    total_steps, stop_reason = planned_steps(units, t)
    prior = statistics_history(chosen, _statistics_schema(schema, history))
    delta = p.delta - metadata["delta"]

    def total(steps: int) -> float:
        return metadata["epsilon"] + epsilon_of_history(prior + ([(chosen.noise_multiplier, sample_rate, steps)]
                                                                  if steps else []), delta, p.accountant)

    steps = total_steps
    if p.max_epsilon is not None and total(steps) > p.max_epsilon:  # the cap stops it: find where
        lo, hi = 0, steps
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if total(mid) <= p.max_epsilon else (lo, mid)
        steps, stop_reason = lo, "max_epsilon"
    epochs = [(k, total(k)) for k in range(steps_per_epoch, steps + 1, steps_per_epoch)]
    budget = PrivacyBudget(p.accountant, chosen.noise_multiplier, sample_rate, delta, p.max_epsilon,
                           metadata["epsilon"], metadata["delta"], prior)
    budget.restore(prior + ([(chosen.noise_multiplier, sample_rate, steps)] if steps else []))
    return {"units": units, "unit": "subjects" if subject else "rows", "sample_rate": sample_rate,
            "steps_per_epoch": steps_per_epoch, "planned_steps": total_steps, "stop_reason": stop_reason,
            "epochs": epochs, "metadata_estimated": metadata["estimated"], "plan": chosen.to_dict(),
            "plan_lines": chosen.lines(), **budget.record()}


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


def split_rows(table: pd.DataFrame, config: RunConfig, subject_table: pd.DataFrame | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Training and holdout row indexes (by subject when `data.subject` is set: over the subject
    table's subjects when there is one, `subject_table` or the file `data.subjects`)."""
    subject = config.data.subject
    if subject is not None and subject not in table.columns:
        raise DplmError(f"data.subject '{subject}' is not a column of the table; choose one of {list(table.columns)}")
    if subject_table is None and subject and config.data.subjects and config.data.mode == "histories":
        subject_table = load_table(config.data.subjects)
    if subject_table is not None:
        keys = training_keys(table, config, subject_table)
        in_train = table[subject].isin(keys).to_numpy()
        train_idx, holdout_idx = np.flatnonzero(in_train), np.flatnonzero(~in_train)
    else:
        train_idx, holdout_idx = split_indexes(len(table), config.data.holdout_fraction, config.train.seed,
                                               table[subject] if subject else None)
    if config.data.max_rows:
        train_idx = train_idx[: config.data.max_rows]
    if len(train_idx) == 0:
        raise DplmError("no training rows left after the holdout split; lower data.holdout_fraction")
    return train_idx, holdout_idx


def training_keys(table: pd.DataFrame, config: RunConfig, subject_table: pd.DataFrame | None) -> set:
    """The training subjects' keys: of the subject table when there is one, else of the events."""
    keys = subject_table[config.data.subject] if subject_table is not None else table[config.data.subject]
    return subject_split(keys, config.data.holdout_fraction, config.train.seed)


def _history_tables(events: pd.DataFrame, subjects, config: RunConfig) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The event table and the subject table: `subjects` (or the file `data.subjects`), checked
    against the events, or the events' `data.subject_columns` (constant within a subject), or none."""
    key, own = config.data.subject, config.data.subject_columns
    if own:
        missing = [c for c in own if c not in events.columns]
        if missing:
            raise DplmError(f"data.subject_columns names '{missing[0]}', which is not a column of the table")
        check_subject_columns_constant(events, key, own)
        return events.drop(columns=own), events[[key, *own]].drop_duplicates(key).reset_index(drop=True)
    source = subjects if subjects is not None and not isinstance(subjects, (str, Path)) else config.data.subjects
    if source is None:
        return events, None
    table = load_table(source)
    check_subject_table(events, table, key)
    return events, table


def _statistics_schema(given: Schema, history) -> Schema:
    """The columns the table's statistics cover (a history's event columns), as the user gave them."""
    return Schema([given[n] for n in given.names if n in history.event_columns]) if history else given


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


def row_orders(codec: RowCodec, num_rows: int, config: RunConfig) -> list[list[int]]:
    """`model.column_order: random`: each training row's own random column order (drawn from
    `train.seed`, not from the data), so the model learns every column given any others; rows
    are sampled in the schema's order."""
    if not codec.any_order():
        names = [f.col.name for f in codec.fields if not f.self_delimiting]
        raise DplmError(f"model.column_order: random needs every column in value tokens (model.value_tokens: true, "
                        f"no text columns); column '{names[0]}' is not: use column_order auto or schema")
    rng = np.random.default_rng([config.train.seed, num_rows])
    return [rng.permutation(len(codec.fields)).tolist() for _ in range(num_rows)]


def ordered(schema: Schema, order: list[str]) -> Schema:
    """`schema` with its columns in `order` (the non-text columns, as `marginals.column_order`
    gives them; text columns follow, in the schema's order, so they are written knowing the
    rest); the synthetic rows keep the schema's output order."""
    names = list(order) + [n for n in schema.names if n not in order]
    out = Schema([schema[n] for n in names])
    out.set_output_order(schema.output_order or schema.names)
    return out


PRETRAINING = {"batch_size": 64, "learning_rate": 0.002, "warmup_steps": 10}  # the non-DP census settings


def pretraining_config(train_config: TrainConfig) -> TrainConfig:
    """The first stage of a DP run: one epoch over the rows drawn from the DP statistics, as
    non-DP training goes (no privacy cost: the rows are post-processing)."""
    return dataclasses.replace(train_config, **PRETRAINING, max_epochs=1.0, max_steps=None, max_training_time=None,
                               early_stopping=False, micro_batch_size=min(PRETRAINING["batch_size"],
                                                                          train_config.micro_batch_size))


def fit(data=None, config: RunConfig | None = None, **kwargs) -> Synthesizer:
    """Shorthand for `Synthesizer.fit`."""
    return Synthesizer.fit(data, config, **kwargs)


def load(run_dir) -> Synthesizer:
    """Shorthand for `Synthesizer.load`."""
    return Synthesizer.load(run_dir)

