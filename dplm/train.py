"""The training loop: LoRA fine-tuning on token sequences, with or without DP-SGD.

One loop serves both. Without DP, batches are shuffled epochs. With DP, every step draws a
Poisson batch (each row independently with probability q = batch_size / N), the privacy
budget is checked before the step, per-row gradients are clipped and noised by Opacus,
and the accountant records the step. A logical batch is split into micro-batches that only
bound memory: clipping is per row and the noise is added once per logical step.

Several processes (`accelerate launch`, `torchrun`) split each logical batch: rank 0 draws
the batch and decides whether to stop, every rank computes its share of the rows, the
summed (under DP: clipped) gradients are all-reduced, and under DP only rank 0 adds noise
(Opacus' DistributedDPOptimizer), so the noise, the batch distribution and the accountant
are those of one process. Checkpoints (`Checkpoints`) make a killed run resumable.
"""

from __future__ import annotations

import functools
import math
import os
import secrets
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dplm import model as models
from dplm.config import PrivacyConfig, TrainConfig
from dplm.errors import DplmError
from dplm.progress import progress as progress_display
from dplm.privacy import (
    PrivacyBudget, assert_weights_changed, make_private, poisson_sample, prepare_empty_step, sum_grad_samples_by_group,
    restore_trainable, secure_uniform, trainable_snapshot, unseeded_generator,
)


MAX_VALIDATION_ROWS = 5000  # early stopping: rows held back to measure the loss on
MAX_MICRO_TOKENS = 16384  # padded tokens of one micro-batch at most (long histories: memory of attention)
MAX_PADDING, MIN_PADDED_TOKENS = 1.5, 1024  # padded / real tokens of a micro-batch past 1,024 padded tokens
# Timed steps of a speed measurement, after one warm-up step; their median counts, so a moment of
# other work on the cores moves it little (a mean of 3 cached a 25 % low figure for a day).
SPEED_STEPS = 9
EVAL_EVERY_STEPS = 250  # early stopping: at most this many steps between measurements
PATIENCE = 3  # early stopping: measurements without improvement before stopping
# ... and at least this many steps: on a small table half an epoch is a few steps, and a loss
# that stalls for 9 steps often falls again (LaborSupply's 426 men stopped at step 66 of a
# plateau the loss left at step 90, its flat accuracy 0.827 against 0.880 for a run that went on)
PATIENCE_STEPS = 60
# ... counting only measurements this far (relative) above the best: a loss that wanders within it
# is a plateau still falling slowly, not overfitting. London's table model, held-back loss 1.7242
# then 1.7258, 1.7271, 1.7245 stopped at 200 s (table part 0.958 at the holdout's size); run on
# to its 360 s it fell to 1.7067 as the learning rate decayed (0.970; the holdout 0.969).
PATIENCE_RISE = 0.005


@dataclass
class TrainResult:
    steps: int
    epochs: float
    rows_seen: int
    tokens_seen: int
    seconds: float
    stop_reason: str
    final_loss: float | None
    privacy: dict | None
    log: list[dict]
    resumed_from_step: int = 0
    processes: int = 1

    @property
    def rows_per_second(self) -> float:
        return self.rows_seen / self.seconds if self.seconds else 0.0


def pad_batch(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence; the attention mask marks the real tokens."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


@dataclass
class GrammarMasks:
    """The sampler's grammar, for the loss: `allowed[s]` marks the logits the sampler may draw
    in grammar state s, `states[r][i]` is row r's state before its token i + 1, and `done`
    the state after a row's end (padding). With them the loss is normalised over the tokens
    the sampler chooses from, as the sampler is, and forced tokens (separators) cost nothing.
    Built by `sample.grammar_masks`."""

    allowed: torch.Tensor
    states: list[list[int]]
    done: int

    def of(self, rows: list[int], width: int, device) -> torch.Tensor:
        """The allowed-logit masks of these rows' first `width` - 1 positions, padded."""
        states = torch.full((len(rows), width), self.done, dtype=torch.long)
        for i, r in enumerate(rows):
            states[i, : len(self.states[r])] = torch.tensor(self.states[r])
        return self.allowed[states[:, :-1].to(self.allowed.device)].to(device)


def row_losses(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               target_index: torch.Tensor | None = None, allowed: torch.Tensor | None = None,
               scored: torch.Tensor | None = None, unit_tokens: float | None = None) -> torch.Tensor:
    """Mean next-token loss of each row over its real tokens (padding excluded), or over the
    tokens `scored` marks (a 0/1 mask like `input_ids`); with `unit_tokens` the sum of its
    token losses over that constant instead, so every token weighs the same in every row.

    `target_index` maps token ids to logit positions when the model's output layer scores
    only some tokens (see `model.RestrictedHead`). `allowed` (see `GrammarMasks.of`) limits
    each position's softmax to the tokens the grammar allows there."""
    # With `scored`, logits only from the first position that predicts a scored token: a text
    # model's prompt needs none, and logits over the whole vocabulary are a large share of a step.
    first = 0 if scored is None else max(0, int(scored.argmax(1).min()) - 1)
    keep = {"logits_to_keep": torch.arange(first, input_ids.shape[1] - 1, device=input_ids.device)} if first else {}
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **keep).logits[:, : input_ids.shape[1] - 1 - first]
    if allowed is not None:
        logits = logits.masked_fill(~allowed[:, first:], float("-inf"))
    targets = input_ids[:, first + 1:] if target_index is None else target_index[input_ids[:, first + 1:]]
    mask = (attention_mask if scored is None else scored)[:, first + 1:].to(torch.float32)
    token_loss = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    return (token_loss * mask).sum(1) / (mask.sum(1).clamp(min=1) if unit_tokens is None else unit_tokens)


def scored_mask(attention_mask: torch.Tensor, starts: list[int]) -> torch.Tensor:
    """The real tokens of each row from its start position on (a 0/1 mask like `attention_mask`)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    starts = torch.tensor(starts, device=attention_mask.device)[:, None]
    return attention_mask * (positions[None, :] >= starts).to(attention_mask.dtype)


def planned_steps(num_units: int, cfg) -> tuple[int | None, str]:
    """Steps a run plans over `num_units` sampling units, and which limit sets them; `cfg` holds
    `batch_size`, `max_epochs` and `max_steps` (a `TrainConfig`, or a `planner.TrainingPlan`)."""
    if cfg.max_epochs is None:
        return cfg.max_steps, "max_steps"
    epoch_steps = math.ceil(cfg.max_epochs * num_units / cfg.batch_size)
    if cfg.max_steps is not None and cfg.max_steps < epoch_steps:
        return cfg.max_steps, "max_steps"
    return epoch_steps, "max_epochs"


def process_rank() -> tuple[int, int]:
    """(rank, number of processes): (0, 1) unless started by a multi-process launcher."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@dataclass
class Checkpoints:
    """Where and how often training saves a resumable checkpoint.

    A checkpoint holds, in one atomically replaced file: the LoRA weights, the optimizer
    and scheduler states, the step, rows and seconds so far, the step log, the torch RNG
    state, and the accountant's history. The data order without DP is a function of
    (seed, step), so it needs no state. The DP noise and Poisson generators are never
    stored (they must stay secret; a resumed run draws fresh OS-seeded ones).

    The accountant is saved with the weights it produced: steps taken after the last
    checkpoint by a killed process left no output anyone can see, and the resumed run
    continues from (and is charged for) exactly the steps in the weights it continues.
    """

    folder: Path
    every: int = 50  # steps between checkpoints
    resume: bool = False  # continue from the checkpoint in `folder` (an error if there is none)
    key: dict = field(default_factory=dict)  # settings a resumed run must share with its checkpoint
    # What the run derived from the data before training (the schema, DP metadata spent,
    # canaries): saved with every checkpoint and reused on resume, so nothing is estimated
    # (and charged) twice.
    run_state: dict = field(default_factory=dict)
    _loaded: dict | None = field(default=None, repr=False)

    @property
    def path(self) -> Path:
        return Path(self.folder) / "checkpoint.pt"

    def child(self, name: str) -> Checkpoints:
        """The checkpoints of a model trained after this one (a text model), in the folder `name`
        inside this one: resumed when it holds one (a run stopped before that model's first
        checkpoint starts it again: its steps left no output)."""
        folder = Path(self.folder) / name
        return Checkpoints(folder, self.every, self.resume and (folder / "checkpoint.pt").exists(), self.key,
                           self.run_state)

    def load(self) -> dict | None:
        """The checkpoint to resume from (None for a fresh run); refuses to silently restart."""
        if self._loaded is not None:
            return self._loaded
        exists = self.path.exists()
        if not exists and self.resume:
            raise DplmError(f"resume: no checkpoint in '{self.folder}'; run without --resume to start a new run")
        if not exists:
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        if not self.resume:
            spent = f", epsilon {state['epsilon']:.4g} spent" if state.get("epsilon") is not None else ""
            raise DplmError(
                f"'{self.folder}' holds a checkpoint of an unfinished run (step {state['step']}{spent}); "
                "pass --resume to continue it, or delete that folder to start over"
            )
        changed = sorted(k for k in set(self.key) | set(state["key"]) if self.key.get(k) != state["key"].get(k))
        if changed:
            raise DplmError(f"resume: the settings {changed} differ from the checkpoint's; resume with the same "
                            "recipe (only stopping limits may change)")
        self._loaded = state
        return state

    def save(self, state: dict) -> None:
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save({**state, "key": self.key, "run_state": self.run_state}, tmp)
        os.replace(tmp, self.path)  # atomic: a kill mid-save keeps the previous checkpoint


def train(model, sequences: list[list[int]], pad_id: int, cfg: TrainConfig, privacy: PrivacyConfig,
          device: torch.device, progress: bool = True, subjects: list[list[int]] | None = None,
          checkpoints: Checkpoints | None = None, metadata_epsilon: float = 0.0,
          metadata_delta: float = 0.0, masks: GrammarMasks | None = None,
          log_step: Callable[[dict], None] | None = None, prior: list | None = None,
          unit_tokens: float | None = None, num_units: int | None = None,
          score_from: list[int] | None = None) -> TrainResult:
    """Train the trainable (LoRA) parameters of `model` in place; returns what was done.

    `subjects` lists the row indexes of each privacy unit (default: every row is its own).
    Under DP the units are Poisson-sampled, each sampled unit contributes a random subset of
    at most `privacy.max_records_per_subject` rows, and the gradients of its rows are summed
    before clipping, so a unit's whole contribution to a step is bounded by `max_grad_norm`.
    (Summing per-row gradients, rather than packing a subject's rows into one sequence,
    keeps training and sampling on single rows.) `metadata_epsilon`/`metadata_delta` were
    spent on the schema: the epsilon counts against `privacy.max_epsilon`, and training
    accounts at `privacy.delta - metadata_delta`, so the total stays at `privacy.delta`.
    With `masks` each token's loss is over the tokens the grammar allows there. `log_step`
    receives each step's log entry (experiment trackers). `prior` are the accountant's entries
    of the table's statistics rounds, spent before training (`PrivacyBudget`). With `unit_tokens`
    (histories) a sequence's loss is its token losses' sum over that public constant, not their
    mean: a mean would weigh the end of a 1-row history as much as the whole of a 20-row one, and
    the model would learn to end histories early. Under DP `num_units` is the public count of
    units (their DP count) that the sampling rate and an epoch's steps are sized by; the exact
    count is never used (default: the count of `subjects`). With `score_from` (a text model: its
    prompt is given when it samples) a sequence's loss is over its tokens from that position on.

    With `cfg.early_stopping` (without DP only) a tenth of the rows (at most
    `MAX_VALIDATION_ROWS`) is held back: their mean loss is measured every half epoch (and at
    least every `EVAL_EVERY_STEPS`), training stops once `PATIENCE` measurements since the best
    one were more than `PATIENCE_RISE` above it and `PATIENCE_STEPS` steps have passed, and the
    adapter of the best one is kept.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, world = process_rank()
    if cfg.early_stopping and privacy.enabled:
        raise DplmError("train.early_stopping cannot be used with DP (it reads the private rows' loss)")
    validation, rows_index = [], None
    if cfg.early_stopping:  # held back from training: the loss that decides when to stop
        order = np.random.default_rng(cfg.seed).permutation(len(sequences))
        held = min(MAX_VALIDATION_ROWS, max(1, len(sequences) // 10)) if len(sequences) > 1 else 0
        validation, rows_index = order[:held].tolist(), order[held:].tolist()
    num_rows = len(rows_index) if rows_index is not None else len(sequences)
    units = subjects if subjects is not None else [[i] for i in range(num_rows)]
    records_cap = privacy.max_records_per_subject if subjects is not None else 1
    # An epoch is one pass over the sampling units: subjects under DP (their public count), else rows.
    public_units = num_units or len(units)
    total_steps, stop_reason = planned_steps(public_units if privacy.enabled else num_rows, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    before = trainable_snapshot(model)
    target_index = models.target_index(model)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    budget = None
    forward_model = model
    if privacy.enabled:
        sample_rate = cfg.batch_size / public_units
        if sample_rate > 1:
            raise DplmError(
                f"train.batch_size {cfg.batch_size} is larger than the {public_units} training "
                f"{'subjects' if subjects is not None else 'rows'} (under DP their DP count); lower it"
            )
        # LoRA dropout draws its masks from torch's global generator: under DP from a secret seed,
        # not from train.seed, which the run directory records.
        torch.manual_seed(secrets.randbits(63))
        if cfg.micro_batch_size < records_cap:
            raise DplmError(
                f"train.micro_batch_size {cfg.micro_batch_size} must be at least privacy.max_records_per_subject "
                f"{records_cap}: a subject's rows are clipped together, so they share a micro-batch"
            )
        budget = PrivacyBudget(privacy.accountant, privacy.noise_multiplier, sample_rate,
                               privacy.delta - metadata_delta, privacy.max_epsilon, metadata_epsilon, metadata_delta,
                               prior)
        # Secret batches, not reproducible from train.seed; secure_mode draws from the OS CSPRNG (None).
        dp_generator = None if privacy.secure_mode else unseeded_generator()
        if total_steps:
            forward_model, optimizer = make_private(model, optimizer, privacy.noise_multiplier,
                                                    privacy.max_grad_norm, cfg.batch_size, privacy.secure_mode)
    private = privacy.enabled and bool(total_steps)  # wrapped by Opacus
    base_optimizer = optimizer.original_optimizer if private else optimizer
    clock = {"elapsed": 0.0}  # rank 0's training seconds at the last step, shared with every rank

    def lr_factor(s: int) -> float:
        # Linear warm-up, then linear decay to 10 % over the planned steps, or over the time
        # budget where that ends first (without DP only): a timed run ends at a low rate.
        done = s / max(1, total_steps)
        if cfg.max_training_time:
            done = max(done, clock["elapsed"] / cfg.max_training_time)
        return min(1.0, (s + 1) / max(1, cfg.warmup_steps)) * max(0.1, 1 - done)

    scheduler = torch.optim.lr_scheduler.LambdaLR(base_optimizer, lr_factor)
    rows_seen = tokens_seen = step = 0
    seconds_before = 0.0
    log = []
    saved = checkpoints.load() if checkpoints else None
    if saved:
        restore_trainable(model, saved["trainable"])
        base_optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["torch_rng"])
        if budget:
            budget.restore(saved["accountant_history"])
            check_resumed_budget(budget)
        step, rows_seen, tokens_seen = saved["step"], saved["rows_seen"], saved["tokens_seen"]
        seconds_before, log = saved["seconds"], saved["log"]
    early = {"best": math.inf, "weights": None, "since": 0, "best_step": 0, **((saved or {}).get("early") or {})}

    def save_checkpoint() -> None:
        checkpoints.save({
            "step": step, "rows_seen": rows_seen, "tokens_seen": tokens_seen, "seconds": time.perf_counter() - start,
            "log": log, "trainable": trainable_snapshot(model), "optimizer": base_optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
            "accountant_history": list(budget.accountant.history) if budget else None,
            "epsilon": budget.epsilon() if budget else None, "early": early if validation else None,
        })

    eval_every = min(EVAL_EVERY_STEPS, max(1, num_rows // max(1, 2 * cfg.batch_size)))
    resumed_from = step
    model.train()
    bar = progress_display(total_steps, "training", "steps", progress and rank == 0, initial=step)
    start = time.perf_counter() - seconds_before
    loss = None
    try:
        while True:
            # Rank 0 decides whether to go on and which units form the batch; all ranks follow.
            groups, stop = None, None
            if rank == 0:
                clock["elapsed"] = time.perf_counter() - start
                if step >= total_steps:
                    stop = stop_reason
                elif cfg.max_training_time and clock["elapsed"] >= cfg.max_training_time:
                    stop = "max_training_time"
                elif validation and early["since"] >= PATIENCE and step - early["best_step"] >= PATIENCE_STEPS:
                    stop = "early_stopping"
                elif budget and not budget.allows_next_step():
                    stop = "max_epsilon"
                elif budget:
                    sampled = poisson_sample(len(units), budget.sample_rate, dp_generator)
                    groups = [_cap_rows(units[u], records_cap, dp_generator) for u in sampled.tolist()]
                else:
                    batch = _shuffled_batch(step, num_rows, cfg.batch_size, cfg.seed)
                    groups = [[rows_index[i] if rows_index is not None else i] for i in batch]
            if world > 1:
                message = [groups, stop, clock["elapsed"]]
                torch.distributed.broadcast_object_list(message, src=0)
                groups, stop, clock["elapsed"] = message
            if stop:
                stop_reason = stop
                break
            batch_rows = sum(len(g) for g in groups)
            loss = _logical_step(forward_model, optimizer, groups[rank::world], batch_rows, sequences, pad_id,
                                 cfg.micro_batch_size, device, private, params, target_index, world, masks,
                                 unit_tokens, score_from)
            scheduler.step()
            if budget:
                budget.step()
            step += 1
            rows_seen += batch_rows
            tokens_seen += sum(len(sequences[i]) for g in groups for i in g)
            elapsed = time.perf_counter() - start
            entry = {"step": step, "epoch": rows_seen / num_rows, "loss": loss, "batch_rows": batch_rows,
                     "rows_per_s": rows_seen / elapsed, "elapsed_s": elapsed, "lr": scheduler.get_last_lr()[0]}
            if budget:
                entry["epsilon"] = budget.epsilon()
            if validation and step % eval_every == 0:
                entry["validation_loss"] = mean_loss(model, validation, sequences, pad_id, cfg.micro_batch_size,
                                                     device, target_index, masks, unit_tokens)
                if entry["validation_loss"] < early["best"]:
                    early.update(best=entry["validation_loss"], weights=trainable_snapshot(model), since=0,
                                 best_step=step)
                elif entry["validation_loss"] > early["best"] * (1 + PATIENCE_RISE):
                    early["since"] += 1
            log.append(entry)
            if log_step:
                log_step(entry)
            bar.set_postfix({k: f"{entry[k]:.3g}" for k in ("loss", "epsilon", "rows_per_s") if entry.get(k) is not None})
            bar.update(1)
            if checkpoints and rank == 0 and step % checkpoints.every == 0:
                save_checkpoint()
        # The last steps too: a model trained after this one (a text model) resumes from here.
        if checkpoints and rank == 0 and (step % checkpoints.every or step == 0):
            save_checkpoint()
    finally:
        bar.close()
    if private:
        forward_model._close()  # remove Opacus hooks and per-sample buffers
    if early["weights"] is not None:  # the adapter of the best held-back loss
        final = mean_loss(model, validation, sequences, pad_id, cfg.micro_batch_size, device, target_index, masks,
                          unit_tokens)
        if final > early["best"]:
            restore_trainable(model, early["weights"])
    if step == 0 and total_steps == 0 and privacy.enabled:  # the statistics alone (planner: too few units)
        model.eval()
        return TrainResult(steps=0, epochs=0.0, rows_seen=0, tokens_seen=0, seconds=time.perf_counter() - start,
                           stop_reason=stop_reason, final_loss=None, privacy=budget.record(), log=log)
    if step == 0:
        if stop_reason == "max_epsilon":
            raise DplmError(
                f"privacy.max_epsilon {privacy.max_epsilon} is too small for even one step "
                f"(the schema's epsilon {metadata_epsilon:.4g} plus one step is {budget.epsilon_after_next_step():.4g}); "
                "raise it or the noise_multiplier"
            )
        raise DplmError("training took no step; raise train.max_training_time or train.max_steps")
    if step > resumed_from:
        assert_weights_changed(model, before)
    if world > 1:
        _assert_same_weights_on_all_ranks(params)
    model.eval()
    return TrainResult(steps=step, epochs=rows_seen / num_rows, rows_seen=rows_seen, tokens_seen=tokens_seen,
                       seconds=time.perf_counter() - start, stop_reason=stop_reason, final_loss=loss,
                       privacy=budget.record() if budget else None, log=log, resumed_from_step=resumed_from,
                       processes=world)


def check_resumed_budget(budget: PrivacyBudget) -> None:
    """A resumed run goes on as its checkpoint's steps went (the same statistics rounds, noise
    and sampling rate), below its cap: else a one-line error, never a record of settings the
    run did not use or an epsilon past the cap."""
    history, prior = [tuple(h) for h in budget.accountant.history], budget.prior
    before, steps = history[: len(prior)], history[len(prior):]
    # The accountant adds a step to the last entry when it shares its noise and rate: a text model
    # at the noise and rate of the model before it (their prior's last entry) grows that entry.
    grown = bool(prior) and before[:-1] == prior[:-1] and before[-1][:2] == prior[-1][:2] \
        and before[-1][2] >= prior[-1][2]
    if (before != prior and not grown) or any(
            (noise, rate) != (budget.noise_multiplier, budget.sample_rate) for noise, rate, _ in steps):
        ran = sorted({(noise, rate) for noise, rate, _ in steps})
        raise DplmError(f"resume: the checkpoint's steps ran at (noise, sampling rate) {ran} and the resumed run would "
                        f"take ({budget.noise_multiplier}, {budget.sample_rate}); resume with the recipe it was "
                        "trained with (only stopping limits may change)")
    if budget.max_epsilon is not None and budget.epsilon() > budget.max_epsilon:
        raise DplmError(f"resume: privacy.max_epsilon {budget.max_epsilon} is below the epsilon {budget.epsilon():.4g} "
                        "the checkpoint already spent; resume with a cap at or above it")


def measure_speed(model, tokens: int, micro_batch_size: int, device, dp: bool, text_from: int | None = None) -> float:
    """Rows a second this machine trains `model` at, on dummy rows of `tokens` random tokens
    (public: no data), `micro_batch_size` rows a step, with DP-SGD's per-row gradients and
    noise or without, and a grammar-masked loss (with `text_from`, a text model's: no grammar, the
    loss on the tokens from that position on); the median of `SPEED_STEPS` steps after a warm-up
    step. The trainable weights are left as they were."""
    before = trainable_snapshot(model)
    params = [p for p in model.parameters() if p.requires_grad]
    head = models.output_head(model)
    vocab = head.token_ids if head is not None else torch.arange(model.get_output_embeddings().weight.shape[0])
    generator = torch.Generator().manual_seed(0)
    sequences = vocab[torch.randint(len(vocab), (micro_batch_size, tokens), generator=generator)].tolist()
    groups = [[i] for i in range(micro_batch_size)]
    # A grammar that allows every token: its masked loss costs what the run's does.
    masks = GrammarMasks(torch.ones(tokens, len(vocab), dtype=torch.bool), [list(range(tokens))] * micro_batch_size,
                         tokens - 1) if text_from is None else None
    optimizer = torch.optim.AdamW(params, lr=0.0)
    forward = model
    if dp:
        forward, optimizer = make_private(model, optimizer, 1.0, 1.0, micro_batch_size)
    model.train()
    seconds = []
    try:
        for _ in range(SPEED_STEPS + 1):
            start = time.perf_counter()
            _logical_step(forward, optimizer, groups, micro_batch_size, sequences, 0, micro_batch_size, device, dp,
                          params, models.target_index(model), 1, masks,
                          score_from=None if text_from is None else [text_from] * micro_batch_size)
            seconds.append(time.perf_counter() - start)
    finally:
        if dp:
            forward._close()
        restore_trainable(model, before)
        model.eval()
    return micro_batch_size / statistics.median(seconds[1:])


@torch.no_grad()
def mean_loss(model, rows: list[int], sequences, pad_id: int, micro_batch_size: int, device, target_index=None,
              masks: GrammarMasks | None = None, unit_tokens: float | None = None) -> float:
    """The mean row loss of these rows (the held-back rows of early stopping)."""
    total = 0.0
    for groups in _pack([[r] for r in sorted(rows, key=lambda r: len(sequences[r]))], micro_batch_size, sequences):
        chunk = [g[0] for g in groups]
        ids, mask = pad_batch([sequences[r] for r in chunk], pad_id, device)
        allowed = masks.of(chunk, ids.shape[1], device) if masks else None
        with models.training_attention(device, ids.shape[1]):
            total += float(row_losses(model, ids, mask, target_index, allowed, unit_tokens=unit_tokens).sum())
    return total / max(1, len(rows))


def _shuffled_batch(step: int, num_rows: int, batch_size: int, seed: int) -> list[int]:
    """Batch number `step` of reshuffled epochs (the non-DP sampler). A function of the step
    alone, so a resumed run continues the same sequence of batches."""
    per_epoch = max(1, num_rows // batch_size)
    epoch, i = divmod(step, per_epoch)
    return _epoch_order(num_rows, seed, epoch)[i * batch_size: (i + 1) * batch_size]


@functools.lru_cache(maxsize=1)
def _epoch_order(num_rows: int, seed: int, epoch: int) -> list[int]:
    """The row order of one epoch (cached: every step of the epoch slices the same one)."""
    return torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def _cap_rows(rows: list[int], cap: int, generator: torch.Generator | None) -> list[int]:
    """A random subset of at most `cap` of a subject's rows (`generator=None`: the OS CSPRNG)."""
    if len(rows) <= cap:
        return rows
    order = np.argsort(secure_uniform(len(rows))) if generator is None else torch.randperm(len(rows), generator=generator)
    return [rows[i] for i in order[:cap].tolist()]


def _pack(groups: list[list[int]], size: int, sequences=None) -> list[list[list[int]]]:
    """Consecutive groups into micro-batches of at most `size` rows and (given the `sequences`;
    groups come sorted by length) at most `MAX_MICRO_TOKENS` padded tokens, and no more than
    `MAX_PADDING` times their real tokens once past `MIN_PADDED_TOKENS`: histories of 1 to 200
    rows in one batch would otherwise pad the short ones to the longest. A group is never split."""
    chunks, current, rows, longest, real = [], [], 0, 0, 0
    for group in groups:
        lengths = [len(sequences[r]) for r in group] if sequences is not None else [0]
        padded = max(longest, max(lengths)) * (rows + len(group))
        wasteful = padded > MIN_PADDED_TOKENS and padded > MAX_PADDING * (real + sum(lengths))
        if current and (rows + len(group) > size or (sequences is not None and (padded > MAX_MICRO_TOKENS or wasteful))):
            chunks.append(current)
            current, rows, longest, real = [], 0, 0, 0
        current.append(group)
        rows += len(group)
        longest, real = max(longest, max(lengths)), real + sum(lengths)
    if current:
        chunks.append(current)
    return chunks


def _logical_step(model, optimizer, groups, batch_rows, sequences, pad_id, micro_batch_size, device, dp: bool,
                  params, target_index, world: int, masks: GrammarMasks | None = None,
                  unit_tokens: float | None = None, score_from: list[int] | None = None) -> float | None:
    """One optimizer step. This process computes the rows of `groups` (its share of a
    logical batch of `batch_rows` rows; one group per privacy unit) in micro-batches.
    Returns the mean row loss over the whole logical batch."""
    total = 0.0
    if dp and not groups:  # an empty (share of a) Poisson batch still takes its noise-only step
        prepare_empty_step(params)
    # Length bucketing: micro-batches of similar lengths pad less. The step's gradient is a
    # sum over rows (under DP: over clipped units), so the order changes nothing else.
    groups = sorted(groups, key=lambda g: max(len(sequences[r]) for r in g))
    chunks = _pack(groups, micro_batch_size, sequences)
    for i, chunk in enumerate(chunks):
        rows = [r for group in chunk for r in group]
        ids, mask = pad_batch([sequences[r] for r in rows], pad_id, device)
        allowed = masks.of(rows, ids.shape[1], device) if masks else None
        with models.training_attention(device, ids.shape[1]):
            scored = None if score_from is None else scored_mask(mask, [score_from[r] for r in rows])
            losses = row_losses(model, ids, mask, target_index, allowed, scored, unit_tokens)
        total += float(losses.detach().sum())
        if dp:
            # Opacus wants the micro-batch mean; it rescales per-row gradients by the batch size.
            losses.mean().backward()
            if any(len(group) > 1 for group in chunk):
                sum_grad_samples_by_group(params, [len(group) for group in chunk])
            if i < len(chunks) - 1:
                optimizer.signal_skip_step(do_skip=True)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        else:
            (losses.sum() / batch_rows).backward()
    if world > 1:
        summed = torch.tensor([total], dtype=torch.float64, device=params[0].device)
        torch.distributed.all_reduce(summed)
        total = float(summed)
        if not dp:  # DP: DistributedDPOptimizer all-reduces the clipped, noised gradients
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / batch_rows if batch_rows else None


def _assert_same_weights_on_all_ranks(params) -> None:
    """Every process must end with the same adapter (else the all-reduce went wrong)."""
    digest = torch.stack([p.detach().double().sum() for p in params])
    gathered = [torch.zeros_like(digest) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, digest)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError("the LoRA weights differ between processes after training")
