"""The training plan: every setting a recipe leaves out, chosen from public quantities only.

A recipe may leave out the batch, the steps or epochs, the learning rate, the warm-up, and
under DP the noise multiplier and the privacy budget's share for the table's statistics
(`marginals`); `make_plan` fills them in and says which it chose, and every setting the user
gives wins. The quantities it reads are public: the number of training units N (also behind
the sampling rate), the target epsilon and delta, the schema's kinds and sizes (tokens a row),
and a compute budget in rows (`train.budget_rows`). The rules were measured on tables of
different sizes (docs/benchmarks.md, issue 19):

* DP: the sampling rate q = B / N is as large as the compute budget allows for
  `DP_TARGET_STEPS` steps (within [`MIN_SAMPLE_RATE`, `MAX_SAMPLE_RATE`]): at a fixed epsilon
  the total noise of T steps of batch B is about the same for any B (sigma / (B sqrt(T))
  ~ 2 / N), so the budget buys large batches, whose steps are less noisy; the steps fill the
  budget within [`DP_MIN_STEPS`, `DP_MAX_STEPS`]. The table's statistics get a share of the
  budget that grows as N shrinks (`statistics_share`): below `SGD_MIN_UNITS` units DP-SGD's
  steps would be mostly noise, so all of it goes to the statistics and the model learns from
  rows drawn from them alone (post-processing); so too when the compute budget is under
  `SGD_MIN_EPOCHS` epochs (the census demo: 1.2 epochs of DP-SGD added nothing). The noise multiplier is then the smallest
  that keeps the whole run, statistics and schema metadata included, within the cap.
  The compute budget is the rows DP-SGD can process in `train.dp_time_budget` seconds (less the
  first stage's) at this machine's speed, measured once on dummy rows (`machine_speed`: public,
  no data; cached per machine and setting, so `dplm plan` and the run agree), or, with
  `dp_time_budget: null` or under several processes, `DEFAULT_BUDGET_TOKENS` tokens.
* Without DP: batch 64 at rate 0.002 (measured on census), fewer units for long ones (a step
  holds at most `NODP_BATCH_TOKENS` tokens: a table of few long histories, such as baseball's
  careers, gets steps rather than epochs), as many epochs as the time budget allows, stopped
  early when the loss on held-back training rows stops falling.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field

import torch

from dplm import model as models
from dplm.config import RunConfig
from dplm.errors import DplmError
from dplm.marginals import noise_history, statistics_rounds
from dplm.privacy import calibrate_noise, epsilon_of_history, smallest_noise, statistics_noise_for
from dplm.serialize import place_layout, token_values
from dplm.train import measure_speed, planned_steps, process_rank

DEFAULT_BUDGET_TOKENS = 9_300_000  # DP-SGD: census 300,000 rows, 150 steps of 2,000 (26 min on 2 cores)
SPEED_VALID_SECONDS = 86_400  # a machine's measured speed is reused for a day
PROBE_OUTPUT_TOKENS = 1024  # the speed probe's output layer, for a schema without text (census: ~800 tokens)
TEXT_VOCABULARY = 49_152  # SmolLM2's tokenizer: a text column's output layer scores all of it
TEXT_LOGITS = 64 * 2**20  # logits in one forward pass with text (256 MB in float32)
DP_TARGET_STEPS = 150
DP_MIN_STEPS, DP_MAX_STEPS = 50, 300
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 0.001, 0.25
DP_LEARNING_RATE = 0.01
NODP_BATCH, NODP_LEARNING_RATE = 64, 0.002
NODP_BATCH_TOKENS, NODP_MIN_BATCH = 8_192, 4  # baseball (442 tokens a player): batch 18
NODP_TIME_BUDGET = 900.0  # seconds
NODP_MAX_EPOCHS = 100.0
SGD_MIN_UNITS = 2_000  # below: no DP-SGD steps, the statistics get the whole budget
SGD_MIN_EPOCHS = 2.0  # a compute budget of fewer epochs: no DP-SGD steps either (census demo: they added nothing)
STATISTICS_SHARE_LARGE = 0.1  # the statistics' share of rho at >= STATISTICS_LARGE_UNITS units
STATISTICS_LARGE_UNITS = 20_000
PRETRAIN_ROWS = 40_000  # rows drawn from the statistics for the first (free) stage of a DP run (census: 2.3 min)
PRETRAIN_ROWS_PER_UNIT = 20  # ... and at most this many per training unit
GIVEN_STEPS_STATISTICS_SHARE = 0.5  # the statistics' share at most, when the recipe asks for DP-SGD steps
DEFAULT_STATISTICS_NOISE = 10.0  # the statistics' noise when the recipe gives DP-SGD's (census: ~0.1 of epsilon 2.5)


@dataclass
class MachineSpeed:
    """Training rows a second on this machine, measured on dummy rows of the run's length."""

    dp_rows_per_second: float  # DP-SGD, in the plan's micro-batches
    rows_per_second: float  # without DP (the first stage)
    key: str  # the machine and settings it was measured for
    tokens: int | None = None  # a dummy row's tokens (None: runs before it was recorded)


@dataclass
class TrainingPlan:
    """What a run will do; `chosen` names the settings the plan chose (the others were given)."""

    dp: bool
    units: int
    batch_size: int
    micro_batch_size: int
    learning_rate: float
    warmup_steps: int
    max_epochs: float | None
    max_steps: int | None
    max_training_time: float | None = None
    early_stopping: bool = False
    noise_multiplier: float | None = None
    statistics_share: float = 0.0
    statistics_noise: float | None = None  # Gaussian noise multiplier of each statistics round
    pretrain_rows: int = 0
    budget_rows: int | None = None
    speed: MachineSpeed | None = None  # what sized budget_rows (None: given, or the fixed token budget)
    chosen: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainingPlan:
        speed = values.get("speed")
        return cls(**{**values, "speed": MachineSpeed(**speed) if speed else None})

    def lines(self) -> list[str]:
        """The plan as the CLI prints it."""
        def mark(name, text):
            return f"{text} ({'auto' if name in self.chosen else 'given'})"

        parts = [mark("batch_size", f"batch {self.batch_size}"),
                 mark("learning_rate", f"learning rate {self.learning_rate:g}")]
        if self.max_steps is not None:
            parts.append(mark("max_steps", f"{self.max_steps} steps"))
        if self.max_epochs is not None:
            parts.append(mark("max_epochs", f"at most {self.max_epochs:g} epochs"))
        if self.max_training_time:
            parts.append(mark("max_training_time", f"at most {self.max_training_time:g} s"))
        if self.early_stopping:
            parts.append(mark("early_stopping", "early stopping on held-back training rows"))
        out = ["plan: " + ", ".join(parts)]
        if self.dp:
            stats = mark("statistics_share", f"table statistics {self.statistics_share:.0%} of the budget"
                         + (f" (noise {self.statistics_noise:.3g} a round)" if self.statistics_noise else ""))
            out.append("plan (DP): " + ", ".join([mark("noise_multiplier", f"noise {self.noise_multiplier:.4g}"), stats,
                                                  mark("pretrain_rows", f"{self.pretrain_rows:,} rows drawn from the "
                                                                        "statistics to start from")]))
        out += [f"plan: {note}" for note in self.notes]
        return out


def nodp_batch_size(tokens: int) -> int:
    """Without DP, the units a step takes for units of `tokens` tokens: `NODP_BATCH`, fewer where
    that would pass `NODP_BATCH_TOKENS` tokens (at least `NODP_MIN_BATCH`)."""
    return max(NODP_MIN_BATCH, min(NODP_BATCH, NODP_BATCH_TOKENS // tokens))


def micro_batch_size(tokens: int, text: bool = False) -> int:
    """Rows a forward pass takes at once: about 8,192 tokens, within [16, 256] rows; with `text`
    (an output layer over the whole vocabulary) at most `TEXT_LOGITS` logits, at least 8 rows:
    the logits and their float copies dominate the memory (London's 45-token rows at 256 rows
    took ~7 GB more than at 32)."""
    rows = min(256, max(16, 8192 // tokens))
    return max(8, min(rows, TEXT_LOGITS // (tokens * TEXT_VOCABULARY))) if text else rows


def machine_speed(config: RunConfig, schema, device, unit_rows: float | None = None,
                  micro: int | None = None, tokens: int | None = None, text_from: int | None = None) -> MachineSpeed | None:
    """This machine's training speed for `config`'s model on rows as long as `schema`'s (a
    unit of `unit_rows` rows for histories), DP-SGD and without, for the DP compute budget:
    None where it does not apply (no DP, `train.budget_rows` given, or the batch and the steps,
    `train.dp_time_budget` null, several processes). Measured once (~10 s) with the base model, LoRA and an output
    layer of `PROBE_OUTPUT_TOKENS` tokens (all of them for text), then read from
    `cache_dir()/speed.json` for `SPEED_VALID_SECONDS`, so a plan and its run see the same
    figure (delete the file to measure again, e.g. after measuring on busy cores). `micro`: the
    rows a forward pass takes (default `micro_batch_size`), `tokens` a row's (default: the schema's),
    `text_from` where a text model's loss starts (`train.measure_speed`)."""
    t, m = config.train, config.model
    sized = t.batch_size is not None and (t.max_steps is not None or t.max_epochs is not None)  # no budget needed
    if not config.privacy.enabled or sized or t.budget_rows is not None or t.dp_time_budget is None \
            or process_rank()[1] > 1:
        return None
    tokens = tokens or unit_tokens(schema, unit_rows)
    texts = any(c.kind == "text" for c in schema.columns)
    micro = micro or micro_batch_size(tokens, texts)
    # No host name: plan.json, which holds the key, is released (the cache lives on this machine anyway).
    key = json.dumps([platform.machine(), platform.processor(), str(device), torch.get_num_threads(), m.base, m.layers,
                      m.precision, m.lora_r, sorted(m.target_modules), m.lora_layers, m.prune_vocab and not texts, tokens,
                      micro, text_from])
    path = models.cache_dir() / "speed.json"
    cached = json.loads(path.read_text()) if path.exists() else {}
    cached = {k: v for k, v in cached.items() if time.time() - v[2] < SPEED_VALID_SECONDS}
    if key not in cached:
        vocab_size = len(models.load_tokenizer(m.base))
        model = models.load_base_model(m.base, vocab_size, models.weight_dtype(m.precision, device), m.layers)
        if m.prune_vocab and not texts:
            models.restrict_output_vocab(model, list(range(min(PROBE_OUTPUT_TOKENS, vocab_size))))
        model = models.add_lora(model.to(device), m.lora_r, m.lora_alpha, m.lora_dropout, m.target_modules,
                                m.lora_layers)
        cached[key] = [measure_speed(model, tokens, micro, device, dp=True, text_from=text_from),
                       measure_speed(model, tokens, min(64, micro), device, dp=False, text_from=text_from), time.time()]
        path.parent.mkdir(parents=True, exist_ok=True)
        fresh = path.with_suffix(f".{os.getpid()}.tmp")
        fresh.write_text(json.dumps(cached, indent=1))
        fresh.replace(path)  # atomic: a reader never sees half a file
    return MachineSpeed(*cached[key][:2], key, tokens)


def row_tokens(schema) -> int:
    """Tokens of one row, about (value tokens: one per category or small-range number, the
    place tokens of a wider one (`serialize.place_layout`), a text's cap; 7 for a number whose
    bounds are still to estimate)."""
    total = 2
    for col in schema.columns:
        if col.kind == "text":
            total += (col.max_tokens or 32) + 1
        elif col.kind == "categorical":
            total += 1
        elif col.missing_metadata():
            total += 7
        else:
            total += 1 if token_values(col) is not None else place_layout(col)[0]
    return total


def unit_tokens(schema, unit_rows: float | None) -> int:
    """Tokens of one training unit: a row, or a history of `unit_rows` rows."""
    return max(1, round(row_tokens(schema) * (unit_rows or 1)))


def statistics_share(units: int) -> float:
    """The share of the privacy budget (as zCDP rho) for the table's statistics: all of it
    below `SGD_MIN_UNITS` units, `STATISTICS_SHARE_LARGE` from `STATISTICS_LARGE_UNITS`,
    between them falling linearly in log(units)."""
    if units < SGD_MIN_UNITS:
        return 1.0
    if units >= STATISTICS_LARGE_UNITS:
        return STATISTICS_SHARE_LARGE
    t = math.log(units / SGD_MIN_UNITS) / math.log(STATISTICS_LARGE_UNITS / SGD_MIN_UNITS)
    return 1.0 + t * (STATISTICS_SHARE_LARGE - 1.0)


def rho_of(epsilon: float, delta: float) -> float:
    """The zCDP rho whose (epsilon, delta) conversion gives `epsilon` (for budget shares only;
    the accountant computes every reported epsilon)."""
    log = math.log(1 / delta)
    return (math.sqrt(epsilon + log) - math.sqrt(log)) ** 2


def epsilon_of_rho(rho: float, delta: float) -> float:
    """The epsilon of `rho`-zCDP at `delta` (the inverse of `rho_of`)."""
    return rho + 2 * math.sqrt(rho * math.log(1 / delta))


def make_plan(config: RunConfig, units: int, schema, metadata_epsilon: float = 0.0,
              metadata_delta: float = 0.0, unit_rows: float | None = None, speed: MachineSpeed | None = None) -> TrainingPlan:
    """The plan for `units` training units (rows, or subjects) under `schema` (complete, or
    with metadata still to estimate): every setting `config` leaves unset (None) is chosen,
    the others are kept. Under DP the noise is calibrated with the accountant so that the whole
    run (schema metadata, statistics, DP-SGD) stays within `privacy.max_epsilon`. A unit that
    is a subject's history counts as `unit_rows` rows (`TrainingHistories.plan_rows`). With the
    machine's `speed` the DP compute budget fills `train.dp_time_budget`."""
    t, p = config.train, config.privacy
    chosen: list[str] = []

    def pick(given, auto, name):
        if given is not None:
            return given
        chosen.append(name)
        return auto

    tokens = unit_tokens(schema, unit_rows)
    micro = micro_batch_size(tokens, any(c.kind == "text" for c in schema.columns))
    if not p.enabled:
        batch = pick(t.batch_size, nodp_batch_size(tokens), "batch_size")
        stop_early = t.early_stopping if t.early_stopping is not None else (t.max_epochs is None and t.max_steps is None)
        if t.early_stopping is None:
            chosen.append("early_stopping")
        plan = TrainingPlan(False, units, batch, min(batch, pick(t.micro_batch_size, micro, "micro_batch_size")),
                    pick(t.learning_rate, NODP_LEARNING_RATE, "learning_rate"), pick(t.warmup_steps, 10, "warmup_steps"),
                    pick(t.max_epochs, NODP_MAX_EPOCHS, "max_epochs"), t.max_steps, t.max_training_time,
                    early_stopping=stop_early, chosen=chosen)
        if t.max_epochs is None and t.max_steps is None:
            plan.max_training_time = pick(t.max_training_time, NODP_TIME_BUDGET, "max_training_time")
        return plan
    if p.max_epsilon is None and p.noise_multiplier is None:
        raise DplmError("DP training needs privacy.max_epsilon (the target: dplm then chooses the noise) or "
                        "privacy.noise_multiplier; set one, e.g. privacy.max_epsilon: 2.5")
    texts = any(c.kind == "text" for c in schema.columns)
    if speed is not None and t.budget_rows is None:
        # The first stage (rows drawn from the statistics, without DP) comes out of the same time.
        first = t.pretrain_rows if t.pretrain_rows is not None else \
            0 if texts or unit_rows else min(PRETRAIN_ROWS, PRETRAIN_ROWS_PER_UNIT * units)
        seconds = max(0.1 * t.dp_time_budget, t.dp_time_budget - first / speed.rows_per_second)
        auto_budget = max(1, int(seconds * speed.dp_rows_per_second))
    else:
        speed, auto_budget = None, max(1, DEFAULT_BUDGET_TOKENS // tokens)
    budget_rows = pick(t.budget_rows, auto_budget, "budget_rows")
    target = None if p.max_epsilon is None else p.max_epsilon - metadata_epsilon
    delta = p.delta - metadata_delta
    # Histories: the statistics would only order the event columns (no first stage on their
    # rows), so by default the whole budget goes to DP-SGD.
    auto_share = statistics_share(units) if target is not None and not unit_rows else 0.0
    few_epochs = auto_share > 0 and not texts and budget_rows < SGD_MIN_EPOCHS * units
    if few_epochs:  # a short DP-SGD run adds nothing to what the statistics' rows teach: all for them
        auto_share = 1.0
    if t.max_steps is not None or t.max_epochs is not None:  # steps are asked for: DP-SGD keeps part of the budget
        auto_share = min(auto_share, GIVEN_STEPS_STATISTICS_SHARE)
    share = pick(p.statistics_share, auto_share, "statistics_share")
    rate = min(MAX_SAMPLE_RATE, max(MIN_SAMPLE_RATE, budget_rows / (DP_TARGET_STEPS * units)))
    batch = pick(t.batch_size, max(1, min(units, round(rate * units))), "batch_size")
    max_steps = t.max_steps
    if t.max_steps is None and t.max_epochs is None:
        auto_steps = int(min(DP_MAX_STEPS, max(DP_MIN_STEPS, budget_rows // batch))) if share < 1 else 0
        max_steps = pick(None, auto_steps, "max_steps")
    plan = TrainingPlan(True, units, batch, min(batch, pick(t.micro_batch_size, micro, "micro_batch_size")),
                pick(t.learning_rate, DP_LEARNING_RATE, "learning_rate"), 0, t.max_epochs, max_steps,
                budget_rows=budget_rows, speed=speed, chosen=chosen)
    if speed:
        plan.notes.append(f"compute budget {budget_rows:,} rows: DP-SGD's share of train.dp_time_budget "
                          f"{t.dp_time_budget:g} s at {speed.dp_rows_per_second:.0f} rows/s (first stage "
                          f"{speed.rows_per_second:.0f} rows/s), measured on dummy rows on this machine")
    steps = planned_steps(plan.units, plan)[0] or 0
    plan.warmup_steps = pick(t.warmup_steps, max(1, min(10, steps // 10)), "warmup_steps")
    rounds = sum(1 for v in statistics_rounds(schema).values() if v)
    if share > 0 and rounds and target is not None:
        if p.noise_multiplier is None and share >= 1 and steps == 0:
            # The statistics are the whole run: their noise fills the cap by the accountant's own figure.
            plan.statistics_noise = smallest_noise(lambda z: epsilon_of_history(
                noise_history({k: z for k in ("one_way", "two_way", "both_nonzero")}, schema), delta, p.accountant),
                target, "for the table's statistics")
        elif p.noise_multiplier is None:
            plan.statistics_noise = statistics_noise_for(rho_of(target, delta) * share, rounds)
        else:  # the noise is given: the statistics at a light default noise, if it fits below the cap
            sgd = [(p.noise_multiplier, batch / units, steps)] if steps else []
            history = noise_history({k: DEFAULT_STATISTICS_NOISE for k in ("one_way", "two_way", "both_nonzero")},
                                    schema)
            if epsilon_of_history(history + sgd, delta, p.accountant) <= target:
                plan.statistics_noise = DEFAULT_STATISTICS_NOISE
                if p.statistics_share is None:
                    share = min(1.0, rounds / (2 * DEFAULT_STATISTICS_NOISE ** 2) / rho_of(target, delta))
    if plan.statistics_noise is None:
        if target is None:
            plan.notes.append("no table statistics (no privacy.max_epsilon to take a share of): the schema's "
                              "column order, no rules, no start from the statistics")
        elif unit_rows and p.statistics_share is None:
            plan.notes.append("histories: no table statistics (they would only order the event columns); the "
                              "schema's column order, the whole budget for DP-SGD")
        elif rounds and share > 0:
            plan.notes.append("no table statistics: the given noise leaves no room for them below "
                              "privacy.max_epsilon; the schema's column order, no rules, no start from them")
        share = 0.0
    plan.statistics_share = share
    # Rows drawn from the statistics are single rows without text (the statistics leave text out):
    # none for text schemas or histories.
    plan.pretrain_rows = pick(t.pretrain_rows, min(PRETRAIN_ROWS, PRETRAIN_ROWS_PER_UNIT * units)
                              if plan.statistics_noise and not texts and not unit_rows else 0, "pretrain_rows")
    if p.noise_multiplier is not None:
        plan.noise_multiplier = p.noise_multiplier
    elif steps == 0:
        plan.noise_multiplier = 1.0  # unused: no DP-SGD step
        chosen.append("noise_multiplier")
        why = (f"a compute budget of {budget_rows:,} rows, under {SGD_MIN_EPOCHS:g} epochs," if few_epochs and
               units >= SGD_MIN_UNITS else f"{units} training units:")
        plan.notes.append(f"{why} too few for DP-SGD's steps to add to the DP statistics; the model learns from rows "
                          "drawn from the statistics alone (post-processing)")
    else:
        plan.noise_multiplier = calibrate_noise(target, delta, batch / units, steps, p.accountant,
                                                statistics_history(plan, schema))
        chosen.append("noise_multiplier")
    return plan


def statistics_history(plan: TrainingPlan, schema) -> list:
    """The accountant's entries of the plan's statistics rounds (none without statistics)."""
    if not plan.statistics_noise:
        return []
    z = plan.statistics_noise
    return noise_history({"one_way": z, "two_way": z, "both_nonzero": z}, schema)


def resumed(plan: TrainingPlan, config: RunConfig) -> TrainingPlan:
    """A checkpoint's plan for its resumed run: the same noise, batch, rate and statistics, with
    the stopping limits (and micro-batch) the recipe gives now (`workspace.RESUMABLE_CHANGES`)."""
    t = config.train
    changes = {name: getattr(t, name) for name in ("max_steps", "max_epochs", "max_training_time", "micro_batch_size")
               if getattr(t, name) is not None}
    chosen = [name for name in plan.chosen if name not in changes]
    return dataclasses.replace(plan, **changes, chosen=chosen)


def resolved(config: RunConfig, plan: TrainingPlan) -> RunConfig:
    """`config` with the plan's settings filled in (what config.yaml records)."""
    config = dataclasses.replace(config, train=dataclasses.replace(config.train),
                                 privacy=dataclasses.replace(config.privacy))
    t, p = config.train, config.privacy
    t.batch_size, t.micro_batch_size = plan.batch_size, plan.micro_batch_size
    t.learning_rate, t.warmup_steps = plan.learning_rate, plan.warmup_steps
    t.max_epochs, t.max_steps, t.max_training_time = plan.max_epochs, plan.max_steps, plan.max_training_time
    t.early_stopping = plan.early_stopping
    if plan.dp:
        p.noise_multiplier, p.statistics_share = plan.noise_multiplier, plan.statistics_share
        t.budget_rows, t.pretrain_rows = plan.budget_rows, plan.pretrain_rows
    return config
