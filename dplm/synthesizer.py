"""The Python API: fit a table, sample rows, save and load a run directory (`workspace`).

`Synthesizer.fit` runs the stages of `dplm.stages` in order; `dplm.plan` runs the first of
them (load and split, the plan) to say what a run will do without training.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from dplm import model as models
from dplm import stages
from dplm.config import RunConfig, configured
from dplm.histories import HistoryBounds, HistoryCodec, Histories, sample_subjects
from dplm.inputs import Inputs, is_history, load_inputs
from dplm.marginals import Marginals, Rules
from dplm.planner import TrainingPlan, resolved
from dplm.privacy import PrivacyBudget, epsilon_of_history, steps_within_cap
from dplm.rules import owners_of, suggested, suggested_within
from dplm.sample import SampleStats, sample_rows
from dplm.schema import MetadataSpend, Schema, check_given, require_kinds
from dplm.serialize import RowCodec, row_codec
from dplm.state import RunState
from dplm.text_model import (
    TextModel, TextPlan, load_text_model, resolved_text, table_config, table_history, text_columns, write_texts,
)
from dplm.train import Checkpoints, TrainResult, planned_steps
from dplm.workspace import RunDirectory, export_run


class Synthesizer:
    """A fine-tuned model plus everything needed to sample valid rows from it."""

    def __init__(self, config: RunConfig, codec: RowCodec | HistoryCodec, model, device=None,
                 schema: Schema | None = None):
        self.config = config
        self.codec = codec
        self.schema = schema or codec.schema  # every column: the codec's and those its rules determine
        self.tokenizer = codec.tokenizer
        self.model = model
        self.device = device or models.default_device()
        self.training: TrainResult | None = None
        self.pretraining: TrainResult | None = None  # the first stage on rows drawn from the statistics
        self.privacy_record: dict = {"dp": False}
        self.spend = MetadataSpend()  # epsilon and delta spent on metadata before training
        self.canaries: pd.DataFrame | None = None
        self.split: dict | None = None
        self.last_sample_stats: SampleStats | None = None
        self.values_cut: dict[str, int] = {}  # training texts and histories cut at their caps (private)
        self.tracking_ids: dict = {}  # experiment tracker runs (train.report_to)
        self.training_plan: TrainingPlan | None = None  # what the run chose (planner.make_plan)
        self.marginals: Marginals | None = None  # the table's statistics (DP under DP)
        self.rules: Rules | None = None  # pairs sampling keeps tied (marginals.Rules)
        self.bounds: HistoryBounds | None = None  # histories: the cap and the counts calibrated sampling follows
        self.text_models: list[TextModel] = []  # a model per text column, beside this table model (`text_model`)
        self.text_plan: TextPlan | None = None

    # ---- fit --------------------------------------------------------------------------

    @classmethod
    def fit(cls, data=None, config: RunConfig | None = None, schema: Schema | str | None = None,
            progress: bool = True, checkpoints: Checkpoints | None = None, subjects=None) -> Synthesizer:
        """Fine-tune on `data` (DataFrame, path, Dataset; default `config.data.source`) with the
        user's `schema` (default `config.data.schema`), saving resumable `checkpoints` if given
        (see `train.Checkpoints`). With `data.subject` (histories, the default mode) `subjects`
        is the subject table (or `data.subjects`)."""
        config = stages.prepare_config(config, data, subjects)
        device = models.default_device()  # first: under a multi-process launcher this joins the group
        saved = checkpoints.load() if checkpoints else None
        # The order is the data flow: the machine's speed is measured before any private data is
        # read; the schema and its DP spend come next, as the plan keeps room for that spend
        # below the cap; the table model's plan (its share of the cap beside text models) sets
        # the statistics' noise and what the text models' plan finds spent; the statistics choose
        # the column order the encoding writes; the model is built for the codec's tokens; the
        # text models train last, their steps composed after the table model's. A resumed run
        # reads back what its checkpoint drew: nothing is drawn, or charged, twice.
        speed, text_speed = (None, None) if saved else stages.speed_before_data(config, schema, device)
        inputs = load_inputs(data, config, subjects)
        tokenizer = models.load_tokenizer(config.model.base)
        state = RunState.from_dict(saved["run_state"]) if saved else stages.analyze(inputs.units, schema, config,
                                                                                   tokenizer, speed, text_speed)
        stages.check_spend(state, config)
        table = table_config(config, state.text_columns, state.spend.epsilon)
        state.plan = stages.plan_training(table, inputs.units, state)
        stages.plan_texts(config, table, inputs.units, state)
        table, config = resolved(table, state.plan), resolved_text(resolved(config, state.plan), state.text_plan)
        stages.type_rows(inputs.units, state, table)
        if not saved:
            stages.measure_statistics(inputs.units, state, table)
        rules = state.marginals.rules() if state.marginals else None
        encoded = stages.encode(inputs.units, state, tokenizer, table)
        model = stages.build_model(table, encoded.codec, device)
        pretraining = None if saved else stages.first_stage(model, encoded.codec, state, rules, table, device,
                                                            progress)
        training, tracking_ids = stages.train_model(model, encoded, inputs.units, state, table, device, progress,
                                                    checkpoints)
        text_models = stages.train_text_models(inputs.units, state, training, config, device, progress, checkpoints) \
            if state.text_columns else []
        stages.finish_checkpoints(checkpoints)
        return cls.assemble(config, inputs, encoded.codec, model, device, state, rules, training, pretraining,
                            tracking_ids, text_models)

    @classmethod
    def assemble(cls, config: RunConfig, inputs: Inputs, codec, model, device, state: RunState, rules: Rules | None,
                 training: TrainResult, pretraining: TrainResult | None, tracking_ids: dict,
                 text_models: list[TextModel] | None = None) -> Synthesizer:
        """The trained synthesizer: the table model and codec, the text models, and what the run
        state, the inputs and training leave for sampling, saving and the privacy record (the
        accountant's after the last model)."""
        synth = cls(config, codec, model, device, state.schema)
        synth.training_plan, synth.marginals, synth.rules = state.plan, state.marginals, rules
        synth.spend, synth.bounds = state.spend, state.bounds
        synth.canaries = state.canaries if state.canaries is None else state.canaries.assign(
            **{"(included)": state.canary_included})
        synth.split = inputs.split_record(config, sum(state.canary_included or []))
        synth.training, synth.pretraining, synth.tracking_ids = training, pretraining, tracking_ids
        synth.text_models, synth.text_plan = text_models or [], state.text_plan
        synth.values_cut = inputs.units.values_cut(codec)
        for text_model in synth.text_models:
            synth.values_cut.update(text_model.values_cut)
        synth.privacy_record = stages.privacy_record(config, state, stages.accounting(training, synth.text_models),
                                                     inputs.units.privacy_unit(config, codec),
                                                     stages.models_trained(state, training, synth.text_models))
        return synth

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
        break the rules found in the statistics (`marginals.Rules`) are drawn again; the rules
        the schema declares (`dplm.rules`) are kept by the grammar, the columns they determine
        derived, and given values that break them refused. With text models the table rows come
        first (conditioned on the given table columns only), then each text column's texts for
        them (a given text is kept, checked against its column).

        A run of histories (`data.subject`) returns `num_rows` whole subjects instead: a
        `histories.Histories` (the subject table and the event table, fresh keys 1..n); `given`
        then holds subject columns, one subject per given row."""
        s = self.config.sample
        num_rows, seed, temperature = num_rows or s.num_rows, s.seed if seed is None else seed, temperature or s.temperature
        if not self.text_models:
            return self.sample_table(num_rows, seed, temperature, progress, given)
        texts = [t.column for t in self.text_models]
        given_texts = [] if given is None else [c for c in texts if c in given.columns]
        if given_texts:  # exactly as given, or a one-line error
            given = given.reset_index(drop=True)
            given = given.drop(columns=given_texts).join(check_given(given[given_texts], self.schema))
        table_given = None if given is None else given.drop(columns=given_texts)
        if table_given is not None and table_given.shape[1] == 0:  # texts alone given: free table rows
            num_rows, table_given = len(given), None
        rows = self.sample_table(num_rows, seed, temperature, progress, table_given).reset_index(drop=True)
        for k, text_model in enumerate(self.text_models):
            if text_model.column in given_texts:
                rows[text_model.column] = given[text_model.column].to_numpy()
            else:  # each model its own seed: its draws independent of the table's and the other texts'
                rows[text_model.column] = write_texts(text_model, rows, s.batch_size, temperature, seed + 1 + k,
                                                      self.device, progress, self.config.text.top_p)
        return rows[self.schema.output_order or self.schema.names]

    @property
    def table_schema(self) -> Schema:
        """The columns the table model writes (with those its rules determine)."""
        return self.schema.without([t.column for t in self.text_models])

    def sample_table(self, num_rows: int, seed: int, temperature: float, progress: bool,
                     given: pd.DataFrame | None) -> pd.DataFrame | Histories:
        """The table model's rows (or histories): `sample` without the text models' columns."""
        s = self.config.sample
        schema = self.table_schema
        # The table's rules, except those between given columns (their values are the user's).
        rules = self.rules.without(list(given.columns) if given is not None else []) if self.rules else None
        keep = (lambda rows: rules.kept(rows, self.codec.schema)) if rules else None
        if self.is_history:
            out, self.last_sample_stats = sample_subjects(
                self.model, self.codec, num_rows, self.config.data.subject, s, self.bounds, seed, temperature,
                self.device, progress, given, keep, self.schema.output_order or self.schema.names)
            return out
        draws = s.draws_per_unit(False)
        calibrate = given is None and self.marginals is not None and draws > 1
        codec = self.codec
        if given is not None:
            given = schema.given_for_model(given)
        if given is not None and self.config.model.column_order == "random":
            # The model has seen every order: it writes the given columns first, then draws the others.
            codec = row_codec(schema.in_order([n for n in schema.names if n in given.columns]),
                              self.codec.tokenizer, self.codec.value_tokens)
        df, self.last_sample_stats = sample_rows(
            self.model, codec, math.ceil(num_rows * draws) if calibrate else num_rows, s.batch_size,
            temperature, seed, self.device, progress, given, s.given_candidates, keep)
        if calibrate:
            df = self.marginals.calibrated(df, self.codec.schema, num_rows, np.random.default_rng(seed))
            self.last_sample_stats = dataclasses.replace(self.last_sample_stats, rows_kept=len(df))
        return schema.derive(df)

    # ---- save / load ------------------------------------------------------------------

    def save(self, run_dir: str | Path, synthetic: pd.DataFrame | Histories | None = None) -> Path:
        """Write the run directory atomically (see `workspace`), with `synthetic` rows if given."""
        return RunDirectory(run_dir).write(self, synthetic)

    def export(self, out_dir: str | Path, synthetic: pd.DataFrame | None = None) -> Path:
        """Write only what may be shared (see `workspace.export_run`) into the new folder `out_dir`."""
        with tempfile.TemporaryDirectory() as tmp:
            return export_run(self.save(Path(tmp) / "run", synthetic), out_dir)

    @classmethod
    def load(cls, run_dir: str | Path, device=None) -> Synthesizer:
        """The synthesizer a run directory holds (`dplm train`'s or `save`'s output)."""
        from transformers import AutoTokenizer  # heavy: imported when a run is loaded

        run = RunDirectory(run_dir).check()
        config, schema = run.config(), run.schema()
        tokenizer = AutoTokenizer.from_pretrained(run.path / "tokenizer")
        device = device or models.default_device()
        layout, texts = run.json("history.json"), run.json("text_models.json")
        if layout:
            codec = HistoryCodec.from_layout(layout, schema, tokenizer, config.model.value_tokens)
        else:
            table = schema.without([m["column"] for m in texts["models"]] if texts else [])
            codec = row_codec(table, tokenizer, config.model.value_tokens)
        model = models.load_adapter(models.base_model(config.model, codec, device), run.path / "adapter")
        model.eval()
        synth = cls(config, codec, model, device, schema)
        if texts:
            synth.text_plan = TextPlan.from_dict(texts["plan"])
            synth.text_models = [load_text_model(config, schema, synth.text_plan, m["column"], m["prompt"],
                                                 run.path / "text_models" / str(k) / "adapter", device)
                                 for k, m in enumerate(texts["models"])]
        synth.privacy_record = run.json("privacy.json")
        if layout:
            synth.bounds = HistoryBounds(layout["max_rows"], layout.get("subject_counts"), layout.get("subject_sums"))
        synth.training_plan, synth.marginals = run.plan(), run.marginals()
        synth.rules = synth.marginals.rules() if synth.marginals else None
        synth.split = run.json("split.json")
        return synth


def fit(data=None, config: RunConfig | str | None = None, epsilon: float | None = None,
        settings: dict | None = None, **kwargs) -> Synthesizer:
    """`Synthesizer.fit` with the settings in keywords: `config` a RunConfig or a recipe file,
    `epsilon` switches DP on with that cap, `settings` sets any others (`{"train.max_steps": 100}`);
    `schema`, `subjects`, `progress` and `checkpoints` as `Synthesizer.fit` takes them."""
    return Synthesizer.fit(data, configured(config, epsilon, settings), **kwargs)


def load(run_dir) -> Synthesizer:
    """Shorthand for `Synthesizer.load`."""
    return Synthesizer.load(run_dir)


def plan(config: RunConfig, data=None, schema: Schema | str | None = None) -> dict:
    """What a recipe's run will do, without training: the plan (`planner.make_plan`: every
    setting the recipe leaves out, chosen from public quantities), and under DP the sampling
    units and rate, the DP-SGD steps (fewer where the epsilon cap stops them), and epsilon after
    each epoch and at the end, schema metadata and the table's statistics included, at the
    run's deltas: the figure privacy.json will show. Without DP also the rules the table's exact
    statistics show that the schema does not declare (`rules.suggested`; under DP they come from
    the noisy statistics, in training). `data` and `schema` as in `fit` (defaults:
    `config.data.source`, `config.data.schema`)."""
    config = copy.deepcopy(config)
    config.validate()
    p = config.privacy
    speed, text_speed = stages.speed_before_data(config, schema, models.default_device())
    units = load_inputs(data, config).units
    unit = "subjects" if config.data.subject else "rows"
    user_schema = stages.user_schema_of(schema, config)
    # The canaries that will train: the expected number (the run's secret coins decide it).
    canaries = [True] * round(config.audit.canaries * config.audit.canary_inclusion)
    if not p.enabled:
        user_schema = units.complete_schema(user_schema, None)
        state = RunState(user_schema, user_schema, MetadataSpend(), canary_included=canaries,
                         text_columns=text_columns(user_schema, config, is_history(config)))
        table = table_config(config, state.text_columns, 0.0)
        state.plan = chosen = stages.plan_training(table, units, state)
        stages.plan_texts(config, table, units, state)
        units.type(user_schema)
        stages.measure_statistics(units, state, table)
        suggestions = suggested(state.marginals.rules().to_dict(), user_schema.rules)
        if is_history(config):  # and within histories, from their exact rows
            rows, groups = units.statistics_rows()
            suggestions += suggested_within(rows, owners_of(groups, len(rows)), {c.name: c.kind for c in user_schema.columns},
                                            config.data.order_by, user_schema.rules)
        return {"units": chosen.units, "unit": unit, "plan": chosen.to_dict(), "plan_lines": chosen.lines(),
                "suggested_rules": suggestions, **text_part(state)}
    user_schema = require_kinds(units.frame, user_schema)
    spend = stages.planned_spend(units, user_schema, config)
    stages.check_spend(RunState(user_schema, user_schema, spend), config)
    # The run plans from its DP count of the units (privacy.count_epsilon) and its DP estimates of
    # the schema's gaps (a text's mean length sizes the text models' time), this preview from the
    # exact count and the user's schema: their batch, sampling rate and epsilon can differ a little.
    state = RunState(user_schema, user_schema, spend, speed=speed, count=units.count(), canary_included=canaries,
                     text_columns=text_columns(user_schema, config, is_history(config)), text_speed=text_speed)
    table = table_config(config, state.text_columns, spend.epsilon)
    state.plan = chosen = stages.plan_training(table, units, state)
    stages.plan_texts(config, table, units, state)
    count = chosen.units
    t = resolved(table, chosen).train
    sample_rate = t.batch_size / count
    steps_per_epoch = math.ceil(count / t.batch_size)
    total_steps, stop_reason = planned_steps(count, t)
    prior = stages.statistics_prior(chosen, units, state.table_user_schema)
    delta = p.delta - spend.delta
    cap = table.privacy.max_epsilon  # the table model's share beside text models

    def total(steps: int) -> float:
        return spend.epsilon + epsilon_of_history(prior + ([(chosen.noise_multiplier, sample_rate, steps)]
                                                           if steps else []), delta, p.accountant)

    steps = steps_within_cap(prior, chosen.noise_multiplier, sample_rate, total_steps, delta, p.accountant, cap,
                             spend.epsilon)
    stop_reason = "max_epsilon" if steps < total_steps else stop_reason
    epochs = [(k, total(k)) for k in range(steps_per_epoch, steps + 1, steps_per_epoch)]
    budget = PrivacyBudget(p.accountant, chosen.noise_multiplier, sample_rate, delta, p.max_epsilon,
                           spend.epsilon, spend.delta, prior)
    text = state.text_plan
    budget.restore(table_history(prior, chosen.noise_multiplier, sample_rate, steps) + (
        [(text.noise_multiplier, text.batch_size / count, text.max_steps * len(state.text_columns))] if text else []))
    return {"units": count, "unit": unit, "sample_rate": sample_rate,
            "count_note": "planned from the exact count of units and the user's schema; the run plans from their DP "
                          f"count (privacy.count_epsilon {p.count_epsilon}) and the schema's DP estimates (a text's mean "
                          "length sizes its model's time), so its figures can differ a little",
            "steps_per_epoch": steps_per_epoch, "planned_steps": total_steps, "stop_reason": stop_reason,
            "epochs": epochs, "metadata_estimated": spend.estimated, "plan": chosen.to_dict(),
            "plan_lines": chosen.lines(), **budget.record(), **text_part(state)}


def text_part(state: RunState) -> dict:
    """`dplm plan`'s text models: which columns and their plan (nothing without text models)."""
    if not state.text_plan:
        return {}
    return {"text_columns": state.text_columns, "text_plan": state.text_plan.to_dict(),
            "text_plan_lines": state.text_plan.lines()}
