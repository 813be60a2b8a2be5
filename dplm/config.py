"""Typed run configuration, loaded from YAML recipes with `key=value` overrides."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dplm.data import check_output_file
from dplm.errors import DplmError


@dataclass
class DataConfig:
    source: str | None = "census"  # a file path, "census" (bundled), or None: a table given in memory
    schema: str | None = None  # YAML schema file; missing metadata is learned (refused under DP)
    columns: list[str] | None = None  # model only these columns of the table (default: all)
    holdout_fraction: float = 0.2
    subject: str | None = None  # column naming the person a row belongs to: the holdout split keeps subjects whole
    # With a subject: "histories" (each subject's rows are one sequence, generated whole:
    # dplm.histories) or "rows" (independent rows, DP per subject)
    mode: str = "histories"
    order_by: str | None = None  # histories: the column that orders a subject's rows (default: the table's order)
    subjects: str | None = None  # histories: a subject table (one row per subject, keyed by the subject column)
    # histories: columns of the table that are the subject's (constant within a subject), written once a history
    subject_columns: list[str] | None = None
    # histories: rows of one subject's history kept (longer ones are cut, and counted); default:
    # the longest without DP, a DP estimate (a noisy 99th percentile, its epsilon counted) under DP
    max_history: int | None = None
    # Train on a subset of the training units (after the holdout split): each kept with this
    # probability, by a keyed draw of the unit alone (valid under DP)
    sample_fraction: float = 1.0
    max_rows: int | None = None  # without DP: whole training units in a seeded random order, up to this many rows


TRACKERS = ("tensorboard", "mlflow")

# LoRA on every linear layer of a Llama block, and on the (schema-restricted) output layer,
# whose rows for new value tokens start from their text's embeddings and must learn the rest.
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


@dataclass
class ModelConfig:
    """Defaults are the table recipe that measured best per CPU-minute (docs/benchmarks.md):
    SmolLM2's first 2 layers, value tokens, LoRA on all linear layers. For free text or on a
    GPU set `layers: null` (all 30 layers)."""

    base: str = "smollm2-135m"  # "smollm2-135m", "tiny-random", a local HF folder or hub id
    layers: int | None = 2  # keep only the base model's first N transformer layers (None: all)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR))
    lora_layers: int | None = None  # LoRA on the last N transformer layers only (None: on all of them)
    precision: str = "auto"  # auto | bf16 | fp32: dtype of the frozen base weights (LoRA stays fp32)
    prune_vocab: bool = True  # output layer scores only the tokens the schema can produce
    value_tokens: bool = True  # one new token per category / small-range integer (see serialize)
    # Histories: integer columns may write "same" or a small change from the row before in later
    # rows (histories.SameValue). Off by default: Males' experience coherence 0.43 -> 0.95, but
    # LaborSupply's overall 0.787 -> 0.756 (docs/benchmarks.md); declared step rules are sure.
    change_tokens: bool = False
    # The order the model writes the columns in: "auto" (dplm's, from the table's statistics:
    # dependent columns close together; see marginals.column_order), "schema" (the schema's), or
    # "random" (flat rows: each training row in its own random order, sampled in the schema's)
    column_order: str = "auto"


@dataclass
class TrainConfig:
    """A setting left unset (None) is chosen by the plan (`planner.make_plan`) from public
    quantities; a setting given here always wins."""

    batch_size: int | None = None  # logical batch (under DP: expected rows, or subjects with data.subject)
    micro_batch_size: int | None = None  # rows per forward/backward pass; memory and speed only, no effect on results
    learning_rate: float | None = None
    warmup_steps: int | None = None
    max_epochs: float | None = None
    max_steps: int | None = None
    max_training_time: float | None = None  # seconds; without DP only (under DP the steps are fixed in advance)
    # Without DP: stop when the loss on held-back training rows stops falling (default: on when
    # neither max_epochs nor max_steps is given); refused under DP (it would read the private rows)
    early_stopping: bool | None = None
    budget_rows: int | None = None  # DP: rows DP-SGD may process, its compute budget (default: from dp_time_budget)
    # DP: seconds of training (first stage and DP-SGD) the plan sizes budget_rows to, at this
    # machine's speed measured on dummy rows (train.measure_speed); None: a fixed 9.3M tokens
    dp_time_budget: float | None = 1500.0
    pretrain_rows: int | None = None  # DP: rows drawn from the DP statistics to train on first (free: post-processing)
    seed: int = 0
    threads: int | None = None  # torch CPU threads; None keeps torch's default
    grammar_loss: bool = True  # each token's loss over the tokens the schema allows there, as the sampler draws
    checkpoint_every: int | None = 50  # `dplm train` saves a resumable checkpoint every N steps (None: never)
    # accelerate's experiment trackers ("tensorboard", "mlflow"; extras dplm[tensorboard], dplm[mlflow]):
    # loss, epsilon, rows/s per step and the report's scores, under tracking_dir (default: beside the run)
    report_to: list[str] = field(default_factory=list)
    tracking_dir: str | None = None


@dataclass
class PrivacyConfig:
    enabled: bool = False
    noise_multiplier: float | None = None  # default: the smallest that keeps the run within max_epsilon
    # Share of the budget (as zCDP rho) spent on the table's statistics (column order, rules,
    # the rows training starts from; marginals.py); default by the unit count (planner.statistics_share)
    statistics_share: float | None = None
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    max_epsilon: float | None = None  # training stops before a step would pass it
    accountant: str = "prv"  # PRV (tight) or RDP; both are the truth the cap is checked against
    max_records_per_subject: int = 8  # with data.subject: rows one subject contributes to a step
    secure_mode: bool = False  # DP noise, Poisson sampling and subjects' row subsets from the OS CSPRNG (slower)
    # Spent only when the schema leaves metadata out: DP estimates of categories, bounds and
    # text lengths share this epsilon (and a tenth of delta when categories are estimated).
    metadata_epsilon: float = 0.2
    # The training units' count is released only with DP noise (discrete Laplace) at this epsilon:
    # it sizes the sampling rate and the plan (std 28 units at 0.05)
    count_epsilon: float = 0.05


@dataclass
class SampleConfig:
    num_rows: int = 100
    batch_size: int = 512  # rows decoded together (SmolLM2, 2 cores: 21 rows/s at 256, 25-29 at 512)
    temperature: float = 1.0
    seed: int = 0
    given_candidates: int = 16  # particles per row when given columns follow free ones (sample.GivenValues)
    # Draw this many times the rows asked for and keep those that bring each column nearest the
    # statistics' one-way counts (marginals.calibrated; under DP the noisy ones: post-processing,
    # no epsilon); 1: off. Default (None): 2 for rows, 4 for histories (their rows, spans and sums
    # are kept together: baseball's totals 0.814 -> 0.880, cdnow's rows 0.986 -> 0.993 at 4).
    calibration: float | None = None

    def draws_per_unit(self, histories: bool) -> float:
        """How many units calibrated sampling draws per unit asked for (`calibration` or its default)."""
        return self.calibration if self.calibration is not None else 4.0 if histories else 2.0


@dataclass
class AuditConfig:
    canaries: int = 0  # random records added to the training rows, for `dplm audit`'s exposure test
    canary_repeats: int = 1  # copies of each canary (rows; one subject with data.subject)
    # each canary trains with this probability (a secret coin): the others are the audit's non-members,
    # against which the trained ones are told apart (`dplm audit`'s empirical epsilon)
    canary_inclusion: float = 0.5
    # categorical column the attribute-inference attack guesses (default: the report's target, else the last one)
    sensitive_column: str | None = None


@dataclass
class TextConfig:
    """Text columns' own models (`dplm.text_model`): beside the table model, which writes the other
    columns, each text column gets a text model (the pretrained LM with a LoRA adapter) that
    writes the text after a prompt of the row's other values. Unset settings are planned
    (`text_model.plan_text`) from public quantities."""

    models: str = "auto"  # auto: a text model per text column when the table has other columns; joint: one model
    layers: int | None = None  # the text model's base layers (None: all)
    target_modules: list[str] | None = None  # LoRA targets (default: q_proj, v_proj under DP, every layer's linears without)
    lora_layers: int | None = None  # LoRA on the text model's last N layers (default: under DP the last half, else all)
    batch_size: int | None = None
    learning_rate: float | None = None
    max_steps: int | None = None
    time_budget: float | None = None  # seconds of training for all text models (default: 1,100 DP, 690 without)
    epsilon_share: float | None = None  # the text models' share of the training budget (zCDP rho; default 0.6)
    noise_multiplier: float | None = None  # DP: default the smallest that keeps the run within privacy.max_epsilon
    # Sampling: each text token from the smallest set of tokens holding this share of the probability
    # (London DP: title AUC 0.749 -> 0.721, words in a public word list 0.865 -> 0.886, real 0.874)
    top_p: float = 0.9


SEED_NOISE_MULTIPLIERS = [0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0, 8.0, 16.0, 32.0]
SEED_MAX_GRAD_NORMS = [0.5, 1.0, 2.0]


@dataclass
class SweepConfig:
    """`dplm sweep`: a DP run per noise_multiplier x max_grad_norm, plus non-DP baselines."""

    noise_multipliers: list[float] = field(default_factory=lambda: list(SEED_NOISE_MULTIPLIERS))
    max_grad_norms: list[float] = field(default_factory=lambda: list(SEED_MAX_GRAD_NORMS))
    baseline_epochs: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0])  # non-DP runs
    baseline_overrides: list[str] = field(default_factory=list)  # section.key=value for the non-DP runs only
    num_rows: int = 2000  # synthetic rows each point samples and scores
    target: str | None = None  # TSTR column of the report (and the audit's sensitive column by default)
    audit_records: int = 1000  # training and holdout rows each attack of the audit uses


@dataclass
class RunConfig:
    output_dir: str = "runs/census"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    text: TextConfig = field(default_factory=TextConfig)
    output_csv: str | None = None  # write num_rows synthetic rows here after training (.csv, .parquet or .jsonl)

    def validate(self) -> None:
        """Check settings before anything runs; each error names the setting and the fix."""
        p, t = self.privacy, self.train
        checks = [
            (p.noise_multiplier is None or p.noise_multiplier > 0, "privacy.noise_multiplier must be > 0 (e.g. 1.0)"),
            (p.statistics_share is None or 0 <= p.statistics_share <= 1, "privacy.statistics_share must be in [0, 1]"),
            (self.model.column_order in ("auto", "schema", "random"),
             "model.column_order must be 'auto', 'schema' or 'random'"),
            (self.model.column_order != "random" or not self.data.subject or self.data.mode != "histories",
             "model.column_order: random is for flat rows (a history writes its columns in one order); "
             "use auto or schema"),
            (not (p.enabled and t.early_stopping), "train.early_stopping cannot be used with DP: it would read the "
             "private rows' loss; set train.max_steps or train.max_epochs (or leave them to the plan)"),
            (t.budget_rows is None or t.budget_rows >= 1, "train.budget_rows must be >= 1 (or unset)"),
            (t.dp_time_budget is None or t.dp_time_budget > 0, "train.dp_time_budget must be > 0 seconds (or null)"),
            (t.pretrain_rows is None or t.pretrain_rows >= 0, "train.pretrain_rows must be >= 0 (or unset)"),
            (p.max_grad_norm > 0, "privacy.max_grad_norm must be > 0 (e.g. 1.0)"),
            (0 < p.delta < 1, "privacy.delta must be in (0, 1) (e.g. 1e-5)"),
            (p.max_epsilon is None or p.max_epsilon > 0, "privacy.max_epsilon must be > 0 (or unset for no cap)"),
            (p.accountant in ("rdp", "prv"), "privacy.accountant must be 'rdp' or 'prv'"),
            (p.max_records_per_subject >= 1, "privacy.max_records_per_subject must be >= 1"),
            (p.metadata_epsilon > 0, "privacy.metadata_epsilon must be > 0 (e.g. 0.2)"),
            (p.count_epsilon > 0, "privacy.count_epsilon must be > 0 (e.g. 0.05)"),
            (self.text.models in ("auto", "joint"), "text.models must be 'auto' (a text model per text column) or "
             "'joint' (one model writes every column)"),
            (self.text.epsilon_share is None or 0 < self.text.epsilon_share < 1, "text.epsilon_share must be in (0, 1)"),
            (self.text.time_budget is None or self.text.time_budget > 0, "text.time_budget must be > 0 seconds"),
            (self.text.noise_multiplier is None or self.text.noise_multiplier > 0, "text.noise_multiplier must be > 0"),
            (0 < self.text.top_p <= 1, "text.top_p must be in (0, 1] (1: plain sampling)"),
            (0 < self.audit.canary_inclusion <= 1, "audit.canary_inclusion must be in (0, 1] (e.g. 0.5)"),
            ((t.batch_size is None or t.batch_size >= 1) and (t.micro_batch_size is None or t.micro_batch_size >= 1),
             "train.batch_size and train.micro_batch_size must be >= 1"),
            (t.learning_rate is None or t.learning_rate > 0, "train.learning_rate must be > 0"),
            (t.warmup_steps is None or t.warmup_steps >= 0, "train.warmup_steps must be >= 0"),
            (t.max_epochs is None or t.max_epochs > 0, "train.max_epochs must be > 0"),
            (t.max_steps is None or t.max_steps >= 1, "train.max_steps must be >= 1 (or unset)"),
            (t.max_training_time is None or t.max_training_time > 0, "train.max_training_time must be > 0 seconds"),
            (t.max_training_time is None or not p.enabled,
             "train.max_training_time cannot be used with DP: the number of steps would depend on timing, and timing "
             "on the private rows; set train.max_steps or train.max_epochs instead (`dplm plan` prints their epsilon)"),
            (t.checkpoint_every is None or t.checkpoint_every >= 1, "train.checkpoint_every must be >= 1 (or unset)"),
            (0 <= self.data.holdout_fraction < 1, "data.holdout_fraction must be in [0, 1)"),
            (0 < self.data.sample_fraction <= 1, "data.sample_fraction must be in (0, 1]"),
            (self.data.max_rows is None or not p.enabled,
             "data.max_rows cuts the table at a row count, which depends on every unit's rows: not DP; under DP keep "
             "a share of the units with data.sample_fraction (e.g. 0.1), or give dplm the rows to train on"),
            (self.data.mode in ("histories", "rows"), "data.mode must be 'histories' or 'rows'"),
            (self.data.max_history is None or self.data.max_history >= 1, "data.max_history must be >= 1 (or unset)"),
            (self.data.subject is not None or (self.data.order_by is None and self.data.subjects is None
                                                and not self.data.subject_columns),
             "data.order_by, data.subjects and data.subject_columns need data.subject (the column naming whose rows "
             "are whose)"),
            (not (self.data.subjects and self.data.subject_columns),
             "give the subject's columns either as a table (data.subjects) or as columns of the rows "
             "(data.subject_columns), not both"),
            (self.model.precision in ("auto", "bf16", "fp32"), "model.precision must be auto, bf16 or fp32"),
            (self.model.layers is None or self.model.layers >= 1, "model.layers must be >= 1 (or unset for all)"),
            (self.model.lora_layers is None or self.model.lora_layers >= 1, "model.lora_layers must be >= 1 (or unset for all)"),
            (not self.model.lora_layers or "lm_head" not in self.model.target_modules,
             "model.lora_layers puts LoRA on transformer layers, and the output layer is none: take lm_head out of "
             "model.target_modules"),
            (self.text.lora_layers is None or self.text.lora_layers >= 1, "text.lora_layers must be >= 1 (or unset)"),
            (not self.text.lora_layers or "lm_head" not in (self.text.target_modules or []),
             "text.lora_layers puts LoRA on transformer layers, and the output layer is none: take lm_head out of "
             "text.target_modules"),
            (self.sample.num_rows >= 1 and self.sample.batch_size >= 1, "sample.num_rows and sample.batch_size must be >= 1"),
            (self.sample.temperature > 0, "sample.temperature must be > 0"),
            (self.sample.given_candidates >= 1, "sample.given_candidates must be >= 1"),
            (self.sample.calibration is None or self.sample.calibration >= 1, "sample.calibration must be >= 1 (1: off)"),
            (self.audit.canaries >= 0 and self.audit.canary_repeats >= 1,
             "audit.canaries must be >= 0 and audit.canary_repeats >= 1"),
            (all(r in TRACKERS for r in t.report_to),
             f"train.report_to: {t.report_to} names an unknown tracker; use {' and/or '.join(TRACKERS)}"),
            (all(v > 0 for v in [*self.sweep.noise_multipliers, *self.sweep.max_grad_norms, *self.sweep.baseline_epochs]),
             "sweep.noise_multipliers, sweep.max_grad_norms and sweep.baseline_epochs must hold numbers > 0"),
            (self.sweep.num_rows >= 1 and self.sweep.audit_records >= 1,
             "sweep.num_rows and sweep.audit_records must be >= 1"),
        ]
        if self.output_csv:
            check_output_file(self.output_csv)
        for ok, message in checks:
            if not ok:
                raise DplmError(message)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def from_dict(cls, values: dict, where: str = ""):
    """Build dataclass `cls` from a nested dict, refusing unknown keys and wrong types."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise DplmError(f"config '{where or 'root'}': expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise DplmError(f"unknown config key '{path}'; known keys here: {', '.join(sorted(names))}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, value, path)
        else:
            kwargs[key] = _convert(value, hint, path)
    return cls(**kwargs)


def _convert(value, hint, path: str):
    """Check/convert one leaf value against its annotation (str, int, float, bool, list, Optional)."""
    args = typing.get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        raise DplmError(f"config '{path}' cannot be empty")
    if type(None) in args:
        hint = next(a for a in args if a is not type(None))
    origin = typing.get_origin(hint)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise DplmError(f"config '{path}' must be a list")
        return [_convert(v, typing.get_args(hint)[0], f"{path}[{i}]") for i, v in enumerate(value)]
    try:
        if hint is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) else int(value)
        if hint is float:
            number = float(value)
            if math.isnan(number):
                raise ValueError
            return number
        return str(value)
    except (TypeError, ValueError):
        raise DplmError(f"config '{path}': {value!r} is not a valid {hint.__name__}") from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """A RunConfig from a YAML recipe plus `section.key=value` overrides."""
    path = Path(path)
    if not path.exists():
        raise DplmError(f"recipe '{path}' not found; check the path (recipes live in recipes/)")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise DplmError(f"recipe '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
    config = from_dict(RunConfig, apply_overrides(values, overrides))
    config.validate()
    return config


def apply_overrides(values: dict, overrides: list[str] | None) -> dict:
    """`values` (nested settings) with each `section.key=value` (YAML value) set, in place."""
    for item in overrides or []:
        if "=" not in item:
            raise DplmError(f"override '{item}' must look like section.key=value (e.g. train.max_steps=10)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise DplmError(f"override '{item}': '{raw}' is not a valid YAML value") from None
        set_setting(values, key.strip(), value)
    return values


def set_setting(values: dict, key: str, value) -> None:
    """Set `section.key` (or a top-level `key`) of the nested settings `values` to `value`."""
    node, parts = values, key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise DplmError(f"setting '{key}': '{part}' is not a section")
    node[parts[-1]] = value


def configured(config: RunConfig | str | Path | None = None, epsilon: float | None = None,
               settings: dict | None = None) -> RunConfig:
    """A checked run configuration: `config` (a RunConfig or a recipe file; default dplm's
    defaults) with `settings` set (`{"train.max_steps": 100}`, as a recipe's overrides) and,
    with `epsilon`, DP switched on and capped there (`privacy.enabled`, `privacy.max_epsilon`)."""
    base = load_recipe(config) if isinstance(config, (str, Path)) else config or RunConfig()
    values = base.to_dict()
    for key, value in (settings or {}).items():
        set_setting(values, key, value)
    if epsilon is not None:
        values["privacy"].update(enabled=True, max_epsilon=epsilon)
    config = from_dict(RunConfig, values)
    config.validate()
    return config
