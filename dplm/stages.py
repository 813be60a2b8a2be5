"""The stages of a run, in the order `Synthesizer.fit` calls them; each says what it reads and writes.

    inputs.load_inputs   the table, the split, the training units
    analyze              the completed schema, its DP spend, the history bounds, the canaries,
                         the text columns with their own models
    type_rows            the training units' typed rows, with the canaries
    plan_training        the settings the recipe leaves out (planner.make_plan)
    plan_texts           the text models' settings (text_model.plan_text)
    measure_statistics   the table's statistics and the column order they choose
    encode               the codec and the token sequences
    build_model          the base model with a fresh LoRA adapter
    first_stage          DP runs: training on rows drawn from the statistics (free)
    train_model          DP-SGD or plain training of the table model
    train_text_models    a text model per text column, after the table model in the accountant
    privacy_record       what privacy.json says

The table model's stages read the table model's columns (`RunState.table_schema`); a text column
with its own model is one more stage (`train_text_models`), not a branch through them.

Every stage reads the units through `units.TrainingUnits`, whatever their kind (rows, rows of
subjects, whole histories): a new kind of unit is one more implementation of it, not a branch
here. Each draw from the private data happens once, on rank 0 under a multi-process launcher
(`from_rank0`), and is saved in the run state (`state.RunState`), which a resumed run reads
back instead of drawing it again.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dplm import model as models
from dplm.config import RunConfig, TrainConfig
from dplm.errors import DplmError
from dplm.marginals import Rules, measure
from dplm.histories import HISTORY_PLAN_ROWS
from dplm.inputs import is_history, unit_hashes
from dplm.planner import MachineSpeed, TrainingPlan, machine_speed, make_plan, resumed, statistics_history
from dplm.privacy import METADATA_DELTA_SHARE, NEIGHBOURS, PUBLIC_QUANTITIES, dp_count, secret_rng, steps_within_cap
from dplm.rules import broken, broken_within, kept_all, learn_mappings
from dplm.sample import grammar_masks, output_token_ids
from dplm.schema import (
    MetadataSpend, Schema, coerce_table, dp_metadata_spend, estimate_schema_dp, random_records, require_kinds,
)
from dplm.serialize import RowCodec
from dplm.state import RunState
from dplm.text_model import (
    TextModel, context_of, measure_text_speed, plan_text, table_history, text_codec, text_columns, text_model_config,
    text_starts, text_train_config,
)
from dplm.tracking import Trackers
from dplm.train import Checkpoints, TrainResult, planned_steps, process_rank, train
from dplm.units import TrainingUnits
from dplm.workspace import PRIVATE_DIAGNOSTICS, PRIVATE_NOTE, RELEASE

PRETRAINING = {"batch_size": 64, "learning_rate": 0.002, "warmup_steps": 10}  # the non-DP census settings


def prepare_config(config: RunConfig | None, data, subjects) -> RunConfig:
    """A checked copy of `config` that records where its rows came from (for `dplm report`):
    a path given as `data` or `subjects`, or None for a table given in memory."""
    config = copy.deepcopy(config or RunConfig())
    config.validate()
    if data is not None:
        config.data.source = str(data) if isinstance(data, (str, Path)) else None
    if subjects is not None:
        config.data.subjects = str(subjects) if isinstance(subjects, (str, Path)) else None
    return config


def user_schema_of(schema: Schema | str | None, config: RunConfig) -> Schema | None:
    """The user's schema: `schema`, or the file it names, or the file `data.schema` names."""
    if isinstance(schema, str) or (schema is None and config.data.schema):
        return Schema.from_yaml(schema or config.data.schema)
    return schema


def speed_before_data(config: RunConfig, schema: Schema | str | None, device
                      ) -> tuple[MachineSpeed | None, MachineSpeed | None]:
    """Under DP with a compute budget to size: this machine's training speed of the table model
    and of the text models (none without text models), measured on dummy rows shaped by the
    user's schema (`planner.machine_speed`) before any private data is read, so their timing owes
    nothing to the private rows (they size the batch, steps and noise the plans release). None
    where no budget is sized (or the schema is missing: `analyze` says so)."""
    user_schema = user_schema_of(schema, config)
    if user_schema is None:
        return None, None
    texts = text_columns(user_schema, config, is_history(config))
    speed = machine_speed(config, user_schema.modelled().without(texts), device,
                          HISTORY_PLAN_ROWS if is_history(config) else None)
    return speed, measure_text_speed(config, user_schema, texts, device)


def analyze(units: TrainingUnits, schema: Schema | str | None, config: RunConfig, tokenizer,
            speed: MachineSpeed | None = None, text_speed: MachineSpeed | None = None) -> RunState:
    """Complete the user's `schema` from the units' rows (`units.frame`): under DP the metadata it
    leaves out is estimated with DP mechanisms (one random row per unit), the history cap drawn
    as a noisy quantile and the units counted with noise, all counted in epsilon (`planned_spend`);
    without DP all are read off the data. Draw the audit's canaries from the completed schema's
    domain, each to train or not by a secret coin (`audit.canary_inclusion`). Name the text
    columns that get their own models (`text_model.text_columns`). Reads the units; returns the
    run state (with the machine's `speed` and `text_speed`; nothing is written)."""
    p = config.privacy
    user_schema = user_schema_of(schema, config)
    if user_schema:
        units.check_rules(user_schema.rules)

    def text_lengths(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False).input_ids]

    count = None
    if p.enabled:
        user_schema = require_kinds(units.frame, user_schema)
        # Rank 0 draws (secret noise differs per process); every rank gets its result.
        schema, _ = from_rank0(lambda: estimate_schema_dp(
            units.frame, user_schema, units.groups, p.metadata_epsilon, p.delta * METADATA_DELTA_SHARE, text_lengths,
            secret_rng(p.secure_mode), text_columns(user_schema, config, is_history(config))))
        _, bounds = from_rank0(lambda: units.bound(config, MetadataSpend(), schema, secret_rng(p.secure_mode)))
        count = from_rank0(lambda: dp_count(units.count(), p.count_epsilon, secret_rng(p.secure_mode)))
        spend = planned_spend(units, user_schema, config)  # what those draws spent
        schema.check_dp_safe()
    else:
        schema = user_schema = units.complete_schema(user_schema, text_lengths)
        spend, bounds = units.bound(config, MetadataSpend(), schema)
    learn_mappings(schema.rules, None if p.enabled else units.frame)
    if schema.output_order is None and set(units.frame.columns) == set(schema.names):
        schema.set_output_order(list(units.frame.columns))  # the rows come out in the table's column order
    canaries, included = None, None
    if config.audit.canaries:  # random records whose membership and exposure `dplm audit` measures
        canaries, included = from_rank0(lambda: canary_records(schema, config))
    return RunState(schema, user_schema, spend, bounds, canaries, speed=speed, count=count, canary_included=included,
                    text_columns=text_columns(schema, config, is_history(config)), text_speed=text_speed)


def planned_spend(units: TrainingUnits, user_schema: Schema, config: RunConfig) -> MetadataSpend:
    """What a DP run spends before training, from public quantities alone (so `dplm plan` knows
    it): the schema's metadata estimates (`schema.dp_metadata_spend`, with the mean lengths of
    the texts that get text models), the history cap's (`TrainingUnits.planned_spend`) and the DP
    count of units (`privacy.count_epsilon`)."""
    p = config.privacy
    spend = dp_metadata_spend(user_schema, p.metadata_epsilon, p.delta * METADATA_DELTA_SHARE,
                              text_columns(user_schema, config, is_history(config)))
    return units.planned_spend(config, spend).plus(p.count_epsilon, {"(training units)": ["count"]})


def canary_records(schema: Schema, config: RunConfig) -> tuple:
    """`audit.canaries` random records of the schema's domain, and for each a secret coin:
    whether it trains (probability `audit.canary_inclusion`)."""
    rng = secret_rng()
    records = random_records(schema, config.audit.canaries, rng)
    return records, (rng.random(len(records)) < config.audit.canary_inclusion).tolist()


def check_spend(state: RunState, config: RunConfig) -> None:
    """The spend before training must leave room under `privacy.max_epsilon` (checked on resume too)."""
    p = config.privacy
    if p.enabled and p.max_epsilon is not None and state.spend.epsilon >= p.max_epsilon:
        raise DplmError(f"the epsilon spent before training, {state.spend.epsilon:.4g} (privacy.metadata_epsilon "
                        f"{p.metadata_epsilon} where metadata is estimated, privacy.count_epsilon {p.count_epsilon}), "
                        f"leaves nothing of privacy.max_epsilon {p.max_epsilon} for training; lower them or give the "
                        "schema's metadata")


def type_rows(units: TrainingUnits, state: RunState, config: RunConfig) -> None:
    """Type the units' rows by the state's schema and add the canaries that train to them, each
    one more unit with `audit.canary_repeats` copies of its record. Writes the units."""
    units.type(state.schema)
    rows, groups = units.statistics_rows()
    found = broken(state.schema.rules, rows)
    if found:
        rule, row = found
        raise DplmError(f"training row {row} breaks the schema rule '{rule.describe()}'; fix the data or the rule")
    found = broken_within(state.schema.rules, rows, groups)
    if found:
        rule, group = found
        values = rows.iloc[group[:6]][rule.columns].to_dict("list")
        raise DplmError(f"a training subject's rows break the schema rule '{rule.describe()}' ({values}); fix the "
                        "data or the rule")
    if state.canaries is not None:
        units.add_canaries(state.training_canaries(), config.audit.canary_repeats)


def plan_training(config: RunConfig, units: TrainingUnits, state: RunState) -> TrainingPlan:
    """The settings the recipe leaves out (`planner.make_plan`), from public quantities: the
    unit count (under DP the DP count) with the canaries that train, the user's schema, the
    state's spend and machine speed. A resumed run keeps its checkpoint's plan (its noise, batch
    and statistics), with the stopping limits the recipe gives now."""
    if state.plan is not None:
        return resumed(state.plan, config)
    count = (units.count() if state.count is None else state.count) + units.canary_units(
        sum(state.canary_included or []), config.audit.canary_repeats)
    return make_plan(config, count, state.table_user_schema.modelled(), state.spend.epsilon, state.spend.delta,
                     unit_rows=units.plan_rows(config.privacy.enabled), speed=state.speed)


def measure_statistics(units: TrainingUnits, state: RunState, config: RunConfig) -> None:
    """The table's statistics (`marginals.measure`) of the units' typed rows: without DP exact
    counts, under DP Gaussian-noised counts at the plan's noise (one random row per unit; none
    when the plan leaves them out), their tables chosen from the user's schema alone; with
    `model.column_order: auto` the column order they choose. Writes the state's marginals and
    schema."""
    p, plan = config.privacy, state.plan
    rows, groups = units.statistics_rows()
    schema = units.statistics_schema(state.table_schema.modelled())  # a column a rule determines is not counted
    if not p.enabled:
        state.marginals = measure(rows, schema, groups, None)
    elif plan.statistics_noise:
        z = plan.statistics_noise
        state.marginals = from_rank0(lambda: measure(
            rows, schema, groups, {"one_way": z, "two_way": z, "both_nonzero": z}, secret_rng(p.secure_mode),
            units.statistics_schema(state.table_user_schema.modelled()), count=plan.units))
    if state.marginals and config.model.column_order == "auto":
        state.schema = state.schema.in_order(state.marginals.column_order(config.train.seed))


def statistics_prior(plan: TrainingPlan, units: TrainingUnits, user_schema: Schema) -> list:
    """The accountant's entries of the plan's statistics rounds, spent before DP-SGD's steps
    (their tables depend on the user's schema alone)."""
    return statistics_history(plan, units.statistics_schema(user_schema.modelled()))


@dataclass
class Encoded:
    """The units as the model reads them: the codec, each sequence's tokens, and with
    `model.column_order: random` each row's column order."""

    codec: object
    sequences: list[list[int]]
    orders: list[list[int]] | None = None


def encode(units: TrainingUnits, state: RunState, tokenizer, config: RunConfig) -> Encoded:
    """The codec of the state's schema and the units' token sequences (`model.column_order:
    random`: each row in its own column order). Reads the typed units."""
    codec = units.codec(state.table_schema, tokenizer, config.model.value_tokens, state.bounds)
    orders = row_orders(codec, units.statistics_rows()[0], config) if config.model.column_order == "random" else None
    return Encoded(codec, units.encode(codec, orders), orders)


def build_model(config: RunConfig, codec, device):
    """The frozen base model for the codec's tokens, on `device`, with a fresh LoRA adapter
    (seeded by `train.seed`)."""
    # On its device before LoRA: peft/Opacus need the adapter created where it will train.
    model = models.base_model(config.model, codec, device)
    torch.manual_seed(config.train.seed)  # LoRA's random init
    m = config.model
    return models.add_lora(model, m.lora_r, m.lora_alpha, m.lora_dropout, m.target_modules, m.lora_layers)


def first_stage(model, codec, state: RunState, rules: Rules | None, config: RunConfig, device,
                progress: bool) -> TrainResult | None:
    """A DP run's first stage (`plan.pretrain_rows`): one epoch, as non-DP training goes, on
    rows drawn from a tree model over the DP statistics. Post-processing: no privacy cost.
    Trains `model` in place; None when the plan draws no rows."""
    plan = state.plan
    if not plan.pretrain_rows:
        return None
    rows = coerce_table(state.marginals.tree_rows(plan.pretrain_rows, codec.schema,
                                                  np.random.default_rng(config.train.seed), rules), codec.schema)
    rows = rows[kept_all(codec.schema.rules, rows)]  # the codec writes only rows that keep the declared rules
    orders = row_orders(codec, rows, config) if config.model.column_order == "random" else None
    sequences = codec.encode_table(rows, orders)
    masks = grammar_masks(codec, output_token_ids(model), sequences, device, orders) \
        if config.train.grammar_loss else None
    return train(model, sequences, codec.tokenizer.pad_token_id, pretraining_config(config.train),
                 dataclasses.replace(config.privacy, enabled=False), device, progress=progress, masks=masks)


def pretraining_config(train_config: TrainConfig) -> TrainConfig:
    """The first stage of a DP run: one epoch over the rows drawn from the DP statistics, as
    non-DP training goes (no privacy cost: the rows are post-processing)."""
    return dataclasses.replace(train_config, **PRETRAINING, max_epochs=1.0, max_steps=None, max_training_time=None,
                               early_stopping=False, micro_batch_size=min(PRETRAINING["batch_size"],
                                                                          train_config.micro_batch_size))


def train_model(model, encoded: Encoded, units: TrainingUnits, state: RunState, config: RunConfig, device,
                progress: bool, checkpoints: Checkpoints | None) -> tuple[TrainResult, dict]:
    """DP-SGD (each unit clipped as one, the statistics' rounds and the metadata spend composed
    in the accountant, the cap checked before every step) or plain training, of `model` in place
    on the encoded units; resumes from `checkpoints` when they hold one, and saves the run state
    with each. Returns the result and the experiment trackers' run ids."""
    if checkpoints:
        checkpoints.run_state = state.to_dict()
    masks = grammar_masks(encoded.codec, output_token_ids(model), encoded.sequences, device, encoded.orders) \
        if config.train.grammar_loss else None
    trackers = Trackers(config) if config.train.report_to and process_rank()[0] == 0 else None
    tracking_ids = {}
    try:
        result = train(model, encoded.sequences, encoded.codec.tokenizer.pad_token_id, config.train, config.privacy,
                       device, progress=progress, subjects=units.clip_groups(), checkpoints=checkpoints,
                       metadata_epsilon=state.spend.epsilon, metadata_delta=state.spend.delta, masks=masks,
                       log_step=None if trackers is None else lambda entry: trackers.log(entry, entry["step"]),
                       prior=statistics_prior(state.plan, units, state.table_user_schema),
                       unit_tokens=units.loss_tokens(state.table_schema), num_units=state.plan.units)
    finally:
        if trackers:
            tracking_ids = trackers.run_ids
            trackers.finish()
    return result, tracking_ids


def plan_texts(config: RunConfig, table: RunConfig, units: TrainingUnits, state: RunState) -> None:
    """The text models' plan (`text_model.plan_text`) for the recipe `config`, after the table
    model's (`table`: the recipe as the table model runs it): the accountant's prior is the table
    model's planned spend (its statistics' rounds and the DP-SGD steps its cap lets it take). The
    schema is the completed one (public: user-given or DP-estimated), whose texts' mean lengths
    scale the speed measured on the user's. A resumed run keeps its checkpoint's. Writes the
    state's text plan."""
    if not state.text_columns or state.text_plan is not None:
        return
    plan, p = state.plan, config.privacy
    statistics = statistics_prior(plan, units, state.table_user_schema)
    steps = steps_within_cap(statistics, plan.noise_multiplier, plan.batch_size / plan.units,
                             planned_steps(plan.units, plan)[0] or 0, p.delta - state.spend.delta, p.accountant,
                             table.privacy.max_epsilon, state.spend.epsilon) if plan.dp else 0
    prior = table_history(statistics, plan.noise_multiplier, plan.batch_size / plan.units, steps)
    state.text_plan = plan_text(config, plan.units, state.schema, state.text_columns, prior,
                                state.spend.epsilon, state.spend.delta, state.text_speed)


def train_text_models(units: TrainingUnits, state: RunState, table: TrainResult, config: RunConfig, device,
                      progress: bool, checkpoints: Checkpoints | None) -> list[TextModel]:
    """A text model per text column (`text_model`), in the schema's order: the base model with a
    fresh adapter, trained by the text plan on the units' typed rows (the canaries' included), its
    loss on the text after the prompt, its DP-SGD steps composed after the table model's and the
    earlier text models' in one accountant, the cap (`privacy.max_epsilon`) checked before each.
    Each resumes from its own checkpoint folder (`text-<k>` in the run's)."""
    plan, rows = state.text_plan, units.statistics_rows()[0]
    tokenizer = models.load_tokenizer(config.model.base)  # plain: the table's value tokens are not the text's
    privacy = dataclasses.replace(config.privacy, noise_multiplier=plan.noise_multiplier)
    model_config = dataclasses.replace(config, model=text_model_config(config, plan.layers, plan.target_modules,
                                                                         plan.lora_layers))
    prior = table.privacy["history"] if table.privacy else []
    out = []
    for k, column in enumerate(state.text_columns):
        context = context_of(state.schema, state.text_columns, column)
        codec = text_codec(state.schema, column, context, tokenizer)
        sequences, starts = text_starts(codec, rows)
        model = build_model(model_config, codec, device)
        folder = checkpoints and checkpoints.child(f"text-{k}")
        result = train(model, sequences, tokenizer.pad_token_id, text_train_config(config.train, plan), privacy,
                       device, progress=progress, subjects=units.clip_groups(), checkpoints=folder,
                       metadata_epsilon=state.spend.epsilon, metadata_delta=state.spend.delta, prior=prior,
                       num_units=state.plan.units, score_from=starts)
        prior = result.privacy["history"] if result.privacy else prior
        out.append(TextModel(column, context, codec, model, result, codec.values_cut()))
    return out


def finish_checkpoints(checkpoints: Checkpoints | None) -> None:
    """Every model is out: a checkpoint of one would resume without the steps taken since."""
    if checkpoints and process_rank()[0] == 0:
        shutil.rmtree(checkpoints.folder, ignore_errors=True)


def row_orders(codec: RowCodec, rows: pd.DataFrame, config: RunConfig) -> list[list[int]]:
    """`model.column_order: random`: each training row's own random column order, drawn from a
    keyed hash of the row alone (`inputs.unit_hashes` under `train.seed`), so no row's order
    depends on any other row; the model learns every column given any others, and rows are
    sampled in the schema's order."""
    if not codec.any_order():
        names = [f.col.name for f in codec.fields if not f.self_delimiting]
        raise DplmError(f"model.column_order: random needs every column in value tokens (model.value_tokens: true, "
                        f"no text columns); column '{names[0]}' is not: use column_order auto or schema")
    return [np.random.default_rng(int(h)).permutation(len(codec.fields)).tolist()
            for h in unit_hashes(rows, config.train.seed, "column order")]


def privacy_record(config: RunConfig, state: RunState, spent: dict | None, unit: dict,
                   models: list[dict] | None = None) -> dict:
    """privacy.json: under DP the accountant's record (`spent`: `accounting`, every model's steps
    composed) and, with text models, what each model trained (`models`), the settings and where
    each column's metadata came from, the privacy unit (`unit`: what the training units say of it) and its DP
    count, the quantities treated as public, and which files of the run are released and which
    are private diagnostics; without DP the metadata sources and the files."""
    metadata = {c.name: c.source for c in state.schema.columns}
    release = {"release": dict(RELEASE), "private_diagnostics": {"note": PRIVATE_NOTE, **PRIVATE_DIAGNOSTICS}}
    p = config.privacy
    models_part = {"models": models} if models else {}
    if not p.enabled:
        return {"dp": False, "metadata_sources": metadata, **models_part, **release}
    unit = dict(unit)
    record = {"dp": True, **spent, "max_grad_norm": p.max_grad_norm,
              "metadata_estimated_under_dp": state.spend.estimated,
              "metadata_user_given": [c.name for c in state.schema.columns if c.source == "user"],
              "privacy_unit": unit.pop("privacy_unit"), "neighbouring": NEIGHBOURS,
              "num_training_units": state.count,
              "num_training_units_source": f"DP count: discrete Laplace at privacy.count_epsilon {p.count_epsilon}, "
                                           "counted in epsilon (the exact count is never released)",
              "secure_mode": p.secure_mode, "metadata_sources": metadata, "public_quantities": dict(PUBLIC_QUANTITIES),
              **release}
    if state.canaries is not None:  # random records, also sampling units: q counts those that train
        record["audit_canaries"] = {"drawn": len(state.canaries), "training": int(sum(state.canary_included)),
                                    "rows_each": config.audit.canary_repeats}
    return {**record, **models_part, **unit}


def accounting(table: TrainResult, text_models: list[TextModel]) -> dict | None:
    """The accountant's record a run reports: the last model's (its history holds every model's
    steps: the total epsilon and delta), with the table model's noise, rate and statistics rounds
    and every model's DP-SGD steps counted (`models_trained` says each one's)."""
    if not text_models or not table.privacy:
        return table.privacy
    last = text_models[-1].training.privacy
    totals = ("epsilon", "training_epsilon", "delta", "training_delta", "metadata_epsilon", "metadata_delta",
              "max_epsilon", "history")
    return {**table.privacy, **{k: last[k] for k in totals},
            "steps": table.privacy["steps"] + sum(t.training.privacy["steps"] for t in text_models)}


def models_trained(state: RunState, table: TrainResult, text_models: list[TextModel]) -> list[dict] | None:
    """What each model of a run with text models wrote and trained (privacy.json's `models`):
    under DP its steps, noise and sampling rate and the total epsilon after it; None without text
    models."""
    if not text_models:
        return None

    def trained(result: TrainResult) -> dict:
        a = result.privacy
        return {"steps": result.steps} if not a else {
            "steps": a["steps"], "noise_multiplier": a["noise_multiplier"], "sample_rate": a["sample_rate"],
            "epsilon_after": a["epsilon"], "max_epsilon": a["max_epsilon"]}
    return [{"model": "table", "columns": state.table_schema.names, **trained(table)},
            *({"model": "text", "column": t.column, "prompt": t.context, "folder": f"text_models/{k}",
               **trained(t.training)} for k, t in enumerate(text_models))]


def from_rank0(compute):
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
