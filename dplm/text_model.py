"""Text columns' own models. The table model writes a row's other columns; each text column gets
a text model (the pretrained LM, all its layers by default, with its own LoRA adapter) that
writes the text after a prompt of the row's other values: the table model's columns, then the
earlier text columns. A text model trains on the same privacy units as the table model (under
DP each unit clipped as one), with its loss on the text's tokens alone (the prompt is given when
it samples), and its DP-SGD steps go into the same accountant after the table model's, the cap
checked before every step of either (`stages.train_text_models`).

    text_columns    which columns get text models (the recipe and the user's schema: public)
    table_config    the table model's share of the cap (`privacy.max_epsilon`) and of the time
    plan_text       the text models' batch, steps, noise, learning rate and adapter, from public
                    quantities: the DP unit count, epsilon, delta, the text's token cap, the time
    measure_text_speed  the text model's speed on dummy rows, before any data is read
    text_codec      the prompt and the text as one row (`serialize.RowCodec`, plain tokens)
    write_texts     a text model's texts for rows of its prompt's columns

Sampling draws the table rows first, then each text column's texts for them (`sample.sample_rows`
with the row's other values given).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from dplm import model as models
from dplm.config import ALL_LINEAR, ModelConfig, RunConfig, TrainConfig
from dplm.planner import (
    DP_MAX_STEPS,
    DP_MIN_STEPS,
    DP_TARGET_STEPS,
    MAX_SAMPLE_RATE,
    MIN_SAMPLE_RATE,
    MachineSpeed,
    epsilon_of_rho,
    machine_speed,
    micro_batch_size,
    rho_of,
)
from dplm.privacy import calibrate_noise
from dplm.sample import sample_rows
from dplm.schema import Column, Schema
from dplm.serialize import RowCodec
from dplm.train import TrainResult

# The split and the settings, measured on London's titles (docs/benchmarks.md, issue 38).
TEXT_RHO_SHARE = 0.6  # the text models' share of the training budget (zCDP rho); the table model's the rest
DP_TEXT_SECONDS = 1100.0  # DP-SGD seconds of all text models together (text.time_budget)
# A text's tokens are taken as this share of its cap where its mean is not known yet: the speed
# probe's dummy rows, measured before the data is read (London's titles average ~10 tokens of a
# 32-token cap); the plan then scales the speed to the texts' mean (`Column.mean_tokens`, DP under DP).
TEXT_SHARE_OF_CAP = 0.5
# Without DP: London's 20 minutes hold the table model's 300 s, the text model's 690 s and ~3 minutes
# of sampling 2,000 rows (its title AUC moved little between 350 and 520 text steps: 0.607-0.623).
NODP_TEXT_SECONDS = 690.0
TABLE_DP_SECONDS = 800.0  # the table model's train.dp_time_budget beside text models, at most
TABLE_NODP_SECONDS = 300.0  # ... and its train.max_training_time without DP
# Under DP 0.02: London's titles after 60 DP-SGD steps (held-out loss, 0.01 -> 4.23, 0.02 -> 4.13, 0.04 -> 4.42);
# without DP 0.006: after 300 s on every layer (0.001 -> 3.37, 0.003 -> 3.24, 0.006 -> 3.22).
DP_TEXT_LEARNING_RATE, NODP_TEXT_LEARNING_RATE = 0.02, 0.006
DP_TEXT_TARGETS = ["q_proj", "v_proj"]  # fewer weights: the noise, growing with their number, drowns less
NODP_TEXT_TARGETS = [m for m in ALL_LINEAR if m != "lm_head"]  # every layer's linears
# Under DP LoRA on the last half of the layers: backpropagation stops at the first adapted one
# (London's titles: 1.4x the rows a second; held-out loss after 160 s 4.13 against 4.17 on all
# 30). Without DP on every layer: in 300 s fewer steps (148 against 206) but a lower loss (3.37
# against 3.43 at learning rate 0.001).
DP_TEXT_LORA_SHARE = 0.5
NODP_TEXT_BATCH = 32
NODP_TEXT_EPOCHS = 2.0  # without DP at most this many passes (London: 0.3 in its time; small tables: not 10)
DEFAULT_TEXT_BUDGET_ROWS = 40_000  # DP rows of a text model when no speed sizes them (the noise is given)


def text_columns(schema: Schema | None, config: RunConfig, histories: bool) -> list[str]:
    """The text columns that get their own text models: all of them with `text.models: auto`
    when the table also has other columns (flat rows only: a history's texts stay in its model)."""
    if schema is None or config.text.models != "auto" or histories:
        return []
    texts = schema.names_of("text")
    return texts if texts and len(texts) < len(schema.columns) else []


def table_config(config: RunConfig, texts: list[str], metadata_epsilon: float) -> RunConfig:
    """The recipe as the table model runs it beside text models: under DP with a cap, its share of
    the training budget (1 - `text.epsilon_share` of zCDP rho, as an epsilon cap with the metadata
    spend on top: the text models take the rest of the real cap, by the accountant), and at most
    `TABLE_DP_SECONDS` of DP-SGD (`TABLE_NODP_SECONDS` of training without DP): a larger
    `train.dp_time_budget` or `train.max_training_time` is capped, a smaller one kept."""
    if not texts:
        return config
    t, p = config.train, config.privacy
    train = dataclasses.replace(t, dp_time_budget=t.dp_time_budget and min(t.dp_time_budget, TABLE_DP_SECONDS))
    if not p.enabled and t.max_steps is None and t.max_epochs is None:
        train.max_training_time = min(t.max_training_time or TABLE_NODP_SECONDS, TABLE_NODP_SECONDS)
    privacy = p
    if p.enabled and p.max_epsilon is not None and p.max_epsilon > metadata_epsilon:
        share = 1 - (config.text.epsilon_share or TEXT_RHO_SHARE)
        table_epsilon = epsilon_of_rho(share * rho_of(p.max_epsilon - metadata_epsilon, p.delta), p.delta)
        privacy = dataclasses.replace(p, max_epsilon=metadata_epsilon + table_epsilon)
    return dataclasses.replace(config, train=train, privacy=privacy)


@dataclass
class TextPlan:
    """What the text models will do (one plan for all: each trains `max_steps` at this noise);
    `chosen` names the settings the plan chose (the others were given)."""

    dp: bool
    units: int
    batch_size: int
    micro_batch_size: int
    learning_rate: float
    warmup_steps: int
    max_steps: int | None
    max_epochs: float | None
    max_training_time: float | None
    noise_multiplier: float | None
    layers: int | None
    target_modules: list[str]
    lora_layers: int | None = None  # LoRA on the last this many layers (None: all; runs before it was planned)
    budget_rows: int | None = None
    chosen: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TextPlan:
        return cls(**values)

    def lines(self) -> list[str]:
        """The plan as `dplm plan` prints it."""
        def mark(name, text):
            return f"{text} ({'auto' if name in self.chosen else 'given'})"
        out = [mark("batch_size", f"text batch {self.batch_size}"),
               mark("learning_rate", f"text learning rate {self.learning_rate:g}"),
               mark("target_modules", f"text LoRA on {', '.join(self.target_modules)}"),
               mark("lora_layers", f"text LoRA on the last {self.lora_layers} layers" if self.lora_layers
                    else "text LoRA on every layer"),
               f"text model layers {'all' if self.layers is None else self.layers}"]
        if self.max_steps is not None:
            out.append(mark("max_steps", f"text steps {self.max_steps} each"))
        if self.max_training_time is not None:
            out.append(mark("time_budget", f"text training {self.max_training_time:g} s each"))
        if self.dp:
            out.append(mark("noise_multiplier", f"text noise multiplier {self.noise_multiplier:.4g}"))
        return out + self.notes


def resolved_text(config: RunConfig, plan: TextPlan | None) -> RunConfig:
    """`config` with the text plan's settings filled in (what config.yaml records)."""
    if plan is None:
        return config
    text = dataclasses.replace(config.text, batch_size=plan.batch_size, learning_rate=plan.learning_rate,
                               max_steps=plan.max_steps, target_modules=list(plan.target_modules),
                               lora_layers=plan.lora_layers,
                               noise_multiplier=plan.noise_multiplier)
    return dataclasses.replace(config, text=text)


def context_of(schema: Schema, texts: list[str], column: str) -> list[str]:
    """The prompt's columns of a text column: the table model's columns in its order, then the
    text columns before it."""
    return [n for n in schema.names if n not in texts] + texts[: texts.index(column)]


def text_codec(schema: Schema, column: str, context: list[str], tokenizer) -> RowCodec:
    """The prompt (the `context` columns' values in plain tokens, as the base model read text in
    pretraining) and then the text, as one row of a `RowCodec`."""
    return RowCodec(Schema([schema[n] for n in [*context, column]]), tokenizer, value_tokens=False)


def plain_tokens(col: Column, typical: bool) -> int:
    """About the tokens a value of `col` takes in plain tokens, from the schema alone: a category
    its names' mean length at ~4 characters a token, a number a token a digit (SmolLM2 splits
    digits), a text its cap, or `typical`: its mean (`mean_tokens`), where not known
    `TEXT_SHARE_OF_CAP` of its cap."""
    if col.kind == "text":
        cap = col.max_tokens or 32
        return max(1, round(cap if not typical else col.mean_tokens or cap * TEXT_SHARE_OF_CAP))
    if col.kind == "categorical" and col.categories:
        return max(1, round(sum(len(str(c)) for c in col.categories) / len(col.categories) / 4))
    if col.kind in ("integer", "float") and col.max is not None:
        return len(str(col.max)) + (col.precision or 0) + 1
    return 4


def text_row_tokens(schema: Schema, texts: list[str], typical: bool = False) -> int:
    """Tokens of the text models' longest row: a prompt of every other column (each value then a
    separator) and the longest text at its cap (the longest rows, whose logits size the
    micro-batches), or `typical`: at its mean (`plain_tokens`), for the time."""
    longest = max(texts, key=lambda n: schema[n].max_tokens or 0)
    return 1 + text_start(schema, texts) + plain_tokens(schema[longest], typical)


def text_start(schema: Schema, texts: list[str]) -> int:
    """Where the longest text column's text starts in its row, about: after a start token and its
    prompt (each value then a separator)."""
    longest = max(texts, key=lambda n: schema[n].max_tokens or 0)
    return 1 + sum(plain_tokens(schema[n], True) + 1 for n in context_of(schema, texts, longest))


def text_micro_batch(schema: Schema, texts: list[str]) -> int:
    """Rows a text model's forward pass takes: its longest rows' logits within memory."""
    return micro_batch_size(text_row_tokens(schema, texts), text=True)


def text_model_config(config: RunConfig, layers: int | None, targets: list[str], lora_layers: int | None) -> ModelConfig:
    """The text models' base model: the recipe's, at `layers` and LoRA on `targets` of the last
    `lora_layers` layers, the values in plain tokens."""
    return dataclasses.replace(config.model, layers=layers, target_modules=list(targets), lora_layers=lora_layers,
                               value_tokens=False)


def text_adapter(config: RunConfig) -> tuple[list[str], int | None]:
    """The text models' LoRA targets and how many last layers get them (None: all), the recipe's or
    by default q and v of the last `DP_TEXT_LORA_SHARE` of the layers under DP, every layer's
    linears without (all layers too where the targets name the output layer, which is in none)."""
    t = config.text
    targets = t.target_modules or (DP_TEXT_TARGETS if config.privacy.enabled else NODP_TEXT_TARGETS)
    if t.lora_layers is not None or "lm_head" in targets or not config.privacy.enabled:
        return list(targets), t.lora_layers
    return list(targets), math.ceil(models.layer_count(config.model.base, t.layers) * DP_TEXT_LORA_SHARE)


def measure_text_speed(config: RunConfig, schema: Schema, texts: list[str], device) -> MachineSpeed | None:
    """The text model's DP-SGD speed on this machine, measured on dummy rows as long as the
    user's `schema` makes them (before any private data is read), as `planner.machine_speed`
    measures the table model's."""
    t = config.text
    if not texts or t.max_steps is not None and t.batch_size is not None:
        return None
    probe = dataclasses.replace(config, model=text_model_config(config, t.layers, *text_adapter(config)),
                                train=dataclasses.replace(config.train, batch_size=None, budget_rows=None))
    return machine_speed(probe, schema, device, micro=text_micro_batch(schema, texts),
                         tokens=text_row_tokens(schema, texts, typical=True), text_from=text_start(schema, texts))


def plan_text(config: RunConfig, units: int, schema: Schema, texts: list[str], prior: list,
              metadata_epsilon: float, metadata_delta: float, speed: MachineSpeed | None) -> TextPlan:
    """The text models' plan from public quantities: `units` (under DP their DP count), the user's
    `schema` (the text caps), the cap and delta, the time (`text.time_budget`) at this machine's
    `speed`, and the accountant's `prior` entries (the statistics' rounds and the table model's
    planned steps): under DP the noise is the smallest that keeps the prior and every text
    model's steps within `privacy.max_epsilon`."""
    t, p = config.text, config.privacy
    chosen: list[str] = []

    def pick(given, auto, name):
        if given is not None:
            return given
        chosen.append(name)
        return auto

    auto_targets, auto_layers = text_adapter(config)
    targets = pick(t.target_modules, auto_targets, "target_modules")
    lora_layers = pick(t.lora_layers, auto_layers, "lora_layers")
    micro = text_micro_batch(schema, texts)
    seconds = pick(t.time_budget, DP_TEXT_SECONDS if p.enabled else NODP_TEXT_SECONDS, "time_budget") / len(texts)
    if not p.enabled:
        batch = pick(t.batch_size, NODP_TEXT_BATCH, "batch_size")
        return TextPlan(False, units, batch, min(batch, micro), pick(t.learning_rate, NODP_TEXT_LEARNING_RATE,
                        "learning_rate"), 10, t.max_steps, NODP_TEXT_EPOCHS if t.max_steps is None else None,
                        None if t.max_steps is not None else seconds, None, t.layers, targets, lora_layers,
                        chosen=chosen)
    rows_per_second = speed and text_rows_per_second(speed, schema, texts)
    budget_rows = max(1, int(seconds * rows_per_second)) if speed else DEFAULT_TEXT_BUDGET_ROWS
    rate = min(MAX_SAMPLE_RATE, max(MIN_SAMPLE_RATE, budget_rows / (DP_TARGET_STEPS * units)))
    auto_batch = max(1, min(units, round(rate * units)))
    steps = pick(t.max_steps, int(min(DP_MAX_STEPS, max(DP_MIN_STEPS, budget_rows // (t.batch_size or auto_batch)))),
                 "max_steps")
    # At least DP_MIN_STEPS steps, within the time: a smaller batch where the time holds fewer.
    batch = pick(t.batch_size, max(1, min(auto_batch, budget_rows // steps)), "batch_size")
    plan = TextPlan(True, units, batch, min(batch, micro), pick(t.learning_rate, DP_TEXT_LEARNING_RATE,
                    "learning_rate"), max(1, min(10, steps // 10)), steps, None, None, t.noise_multiplier,
                    t.layers, targets, lora_layers, budget_rows, chosen)
    if speed:
        plan.notes.append(f"text compute budget {budget_rows:,} rows each: {seconds:g} s at {rows_per_second:.1f} "
                          f"rows/s of ~{text_row_tokens(schema, texts, typical=True)} tokens ({speed.dp_rows_per_second:.1f} "
                          f"measured on dummy rows of {speed.tokens or '?'} tokens on this machine)")
    if t.noise_multiplier is None and p.max_epsilon is None:  # no cap to calibrate to: the recipe's noise
        plan.noise_multiplier = p.noise_multiplier
        chosen.append("noise_multiplier")
    elif t.noise_multiplier is None:
        # Every text model trains `steps` at this noise and rate: as one run of len(texts) x steps.
        plan.noise_multiplier = calibrate_noise(p.max_epsilon - metadata_epsilon, p.delta - metadata_delta,
                                                batch / units, steps * len(texts), p.accountant, prior)
        chosen.append("noise_multiplier")
    return plan


def text_rows_per_second(speed: MachineSpeed, schema: Schema, texts: list[str]) -> float:
    """The text models' DP-SGD rows a second on their typical row: the `speed` measured on dummy
    rows before the data was read (their texts at `TEXT_SHARE_OF_CAP` of the cap), slowed by
    tokens where the completed `schema`'s rows are longer (the texts' mean lengths, DP under DP):
    a step's work grows about as its rows' tokens (micro-batches are bucketed by length, little
    padding). Shorter rows are not taken as faster: London's titles, 31 tokens a row against the
    probe's 37, trained at 27.6 rows/s where the probe measured 27.8 (per-row costs stay)."""
    if not speed.tokens:
        return speed.dp_rows_per_second
    return speed.dp_rows_per_second * min(1.0, speed.tokens / text_row_tokens(schema, texts, typical=True))


def text_train_config(train: TrainConfig, plan: TextPlan) -> TrainConfig:
    """`train` as a text model trains: the plan's batch, rate and stopping, no early stopping."""
    return dataclasses.replace(train, batch_size=plan.batch_size, micro_batch_size=plan.micro_batch_size,
                               learning_rate=plan.learning_rate, warmup_steps=plan.warmup_steps,
                               max_steps=plan.max_steps, max_epochs=plan.max_epochs,
                               max_training_time=plan.max_training_time, early_stopping=False)


def text_starts(codec: RowCodec, rows) -> tuple[list[list[int]], list[int]]:
    """Each row's tokens (prompt then text) and where its text starts: the loss is on the text alone."""
    text = len(codec.fields) - 1
    encoded = [codec.encode_with_spans(row) for row in rows.to_dict("records")]
    return [ids for ids, _ in encoded], [spans[text][0] for _, spans in encoded]


def table_history(prior: list, noise: float | None, sample_rate: float, steps: int) -> list:
    """The accountant's entries of the table model's plan: its statistics' rounds, then its steps."""
    return list(prior) + ([(noise, sample_rate, steps)] if steps else [])


@dataclass
class TextModel:
    """One text column's model: its prompt's columns (`context`), the codec of prompt and text,
    the adapted base model, and (after training) what training did and the texts cut at the cap."""

    column: str
    context: list[str]
    codec: RowCodec
    model: object
    training: TrainResult | None = None
    values_cut: dict = field(default_factory=dict)

    def layout(self) -> dict:
        """What a run directory records of it (text_models.json)."""
        return {"column": self.column, "prompt": self.context}


def write_texts(text_model: TextModel, rows, batch_size: int, temperature: float, seed: int, device,
                progress: bool, top_p: float):
    """The text model's texts for `rows` (a DataFrame holding its prompt's columns), one each, in
    their order: the prompt given, the text drawn under the grammar (ordinary tokens only), with
    nucleus sampling at `top_p`."""
    out, _ = sample_rows(text_model.model, text_model.codec, len(rows), batch_size, temperature, seed, device,
                         progress, rows[text_model.context].reset_index(drop=True), 1, top_p=top_p)
    return out[text_model.column].to_numpy()


def load_text_model(config: RunConfig, schema: Schema, plan: TextPlan, column: str, context: list[str], adapter,
                    device) -> TextModel:
    """A saved text model: the base model of the plan with the adapter in folder `adapter`."""
    codec = text_codec(schema, column, context, models.load_tokenizer(config.model.base))
    base = models.base_model(text_model_config(config, plan.layers, plan.target_modules, plan.lora_layers), codec,
                             device)
    model = models.load_adapter(base, adapter)
    model.eval()
    return TextModel(column, context, codec, model)
