"""The training loop: LoRA fine-tuning on token sequences, with or without DP-SGD.

One loop serves both. Without DP, batches are shuffled epochs. With DP, every step draws a
Poisson batch (each row independently with probability q = batch_size / N), the privacy
budget is checked before the step, per-row gradients are clipped and noised by Opacus,
and the accountant records the step. A logical batch is split into micro-batches that only
bound memory: clipping is per row and the noise is added once per logical step.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dplm.config import PrivacyConfig, TrainConfig
from dplm.errors import DplmError
from dplm.privacy import (
    PrivacyBudget, assert_weights_changed, make_private, poisson_sample, prepare_empty_step, sum_grad_samples_by_group,
    trainable_snapshot, unseeded_generator,
)


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


def row_losses(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of each row over its real tokens (padding excluded)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    targets = input_ids[:, 1:]
    mask = attention_mask[:, 1:].to(torch.float32)
    token_loss = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    return (token_loss * mask).sum(1) / mask.sum(1).clamp(min=1)


def planned_steps(num_units: int, cfg: TrainConfig) -> tuple[int, str]:
    """Steps a run plans over `num_units` sampling units, and which limit sets them."""
    epoch_steps = math.ceil(cfg.max_epochs * num_units / cfg.batch_size)
    if cfg.max_steps and cfg.max_steps < epoch_steps:
        return cfg.max_steps, "max_steps"
    return epoch_steps, "max_epochs"


def train(model, sequences: list[list[int]], pad_id: int, cfg: TrainConfig, privacy: PrivacyConfig,
          device: torch.device, progress: bool = True, subjects: list[list[int]] | None = None) -> TrainResult:
    """Train the trainable (LoRA) parameters of `model` in place; returns what was done.

    `subjects` lists the row indexes of each privacy unit (default: every row is its own).
    Under DP the units are Poisson-sampled, each sampled unit contributes a random subset of
    at most `privacy.max_records_per_subject` rows, and the gradients of its rows are summed
    before clipping, so a unit's whole contribution to a step is bounded by `max_grad_norm`.
    (Summing per-row gradients, rather than packing a subject's rows into one sequence,
    keeps training and sampling on single rows.)
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    num_rows = len(sequences)
    units = subjects if subjects is not None else [[i] for i in range(num_rows)]
    records_cap = privacy.max_records_per_subject if subjects is not None else 1
    # An epoch is one pass over the sampling units: subjects under DP, else rows.
    total_steps, stop_reason = planned_steps(len(units) if privacy.enabled else num_rows, cfg)
    generator = torch.Generator().manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    before = trainable_snapshot(model)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    budget = None
    forward_model = model
    if privacy.enabled:
        sample_rate = cfg.batch_size / len(units)
        if sample_rate > 1:
            raise DplmError(
                f"train.batch_size {cfg.batch_size} is larger than the {len(units)} training "
                f"{'subjects' if subjects is not None else 'rows'}; lower it"
            )
        if cfg.micro_batch_size < records_cap:
            raise DplmError(
                f"train.micro_batch_size {cfg.micro_batch_size} must be at least privacy.max_records_per_subject "
                f"{records_cap}: a subject's rows are clipped together, so they share a micro-batch"
            )
        budget = PrivacyBudget(privacy.accountant, privacy.noise_multiplier, sample_rate, privacy.delta,
                               privacy.max_epsilon)
        dp_generator = unseeded_generator()  # secret batches: not reproducible from train.seed
        forward_model, optimizer = make_private(model, optimizer, privacy.noise_multiplier,
                                                privacy.max_grad_norm, cfg.batch_size, privacy.secure_mode)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer.original_optimizer if privacy.enabled else optimizer,
        lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)) * max(0.1, 1 - s / max(1, total_steps)),
    )
    batches = _epoch_batches(num_rows, cfg.batch_size, generator)
    model.train()
    log = []
    bar = tqdm(total=total_steps, disable=not progress, unit="step", dynamic_ncols=True)
    start = time.perf_counter()
    rows_seen = tokens_seen = step = 0
    loss = None
    try:
        while step < total_steps:
            if cfg.max_training_time and time.perf_counter() - start >= cfg.max_training_time:
                stop_reason = "max_training_time"
                break
            if budget and not budget.allows_next_step():
                stop_reason = "max_epsilon"
                break
            if budget:
                sampled = poisson_sample(len(units), budget.sample_rate, None if privacy.secure_mode else dp_generator)
                groups = [_cap_rows(units[u], records_cap, dp_generator) for u in sampled.tolist()]
            else:
                groups = [[i] for i in next(batches).tolist()]
            batch = [sequences[i] for group in groups for i in group]
            loss = _logical_step(forward_model, optimizer, groups, sequences, pad_id, cfg.micro_batch_size,
                                 device, privacy.enabled, params)
            scheduler.step()
            if budget:
                budget.step()
            step += 1
            rows_seen += len(batch)
            tokens_seen += sum(len(s) for s in batch)
            elapsed = time.perf_counter() - start
            entry = {"step": step, "epoch": rows_seen / num_rows, "loss": loss, "batch_rows": len(batch),
                     "rows_per_s": rows_seen / elapsed, "elapsed_s": elapsed, "lr": scheduler.get_last_lr()[0]}
            if budget:
                entry["epsilon"] = budget.epsilon()
            log.append(entry)
            bar.set_postfix({k: f"{entry[k]:.3g}" for k in ("loss", "epsilon", "rows_per_s") if entry.get(k) is not None})
            bar.update(1)
    finally:
        bar.close()
    if privacy.enabled:
        forward_model._close()  # remove Opacus hooks and per-sample buffers
    if step == 0:
        if stop_reason == "max_epsilon":
            raise DplmError(
                f"privacy.max_epsilon {privacy.max_epsilon} is too small for even one step "
                f"(one step costs {budget.epsilon_after_next_step():.4g}); raise it or the noise_multiplier"
            )
        raise DplmError("training took no step; raise train.max_training_time or train.max_steps")
    assert_weights_changed(model, before)
    model.eval()
    return TrainResult(steps=step, epochs=rows_seen / num_rows, rows_seen=rows_seen, tokens_seen=tokens_seen,
                       seconds=time.perf_counter() - start, stop_reason=stop_reason, final_loss=loss,
                       privacy=budget.record() if budget else None, log=log)


def _epoch_batches(num_rows: int, batch_size: int, generator: torch.Generator):
    """Endless fixed-size batches from reshuffled epochs (the non-DP sampler)."""
    while True:
        order = torch.randperm(num_rows, generator=generator)
        for i in range(0, num_rows - batch_size + 1 if num_rows >= batch_size else 1, batch_size):
            yield order[i: i + batch_size]


def _cap_rows(rows: list[int], cap: int, generator: torch.Generator) -> list[int]:
    """A random subset of at most `cap` of a subject's rows."""
    if len(rows) <= cap:
        return rows
    return [rows[i] for i in torch.randperm(len(rows), generator=generator)[:cap].tolist()]


def _pack(groups: list[list[int]], size: int) -> list[list[list[int]]]:
    """Consecutive groups into micro-batches of at most `size` rows; a group is never split."""
    chunks, current, rows = [], [], 0
    for group in groups:
        if current and rows + len(group) > size:
            chunks.append(current)
            current, rows = [], 0
        current.append(group)
        rows += len(group)
    if current:
        chunks.append(current)
    return chunks


def _logical_step(model, optimizer, groups, sequences, pad_id, micro_batch_size, device, dp: bool,
                  params) -> float | None:
    """One optimizer step over the rows of `groups` (one group per privacy unit), in
    micro-batches; returns the mean row loss."""
    if not groups:  # only under DP: an empty Poisson batch still takes its noise-only step
        prepare_empty_step(params)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return None
    chunks = _pack(groups, micro_batch_size)
    num_rows = sum(len(g) for g in groups)
    total = 0.0
    for i, chunk in enumerate(chunks):
        ids, mask = pad_batch([sequences[r] for group in chunk for r in group], pad_id, device)
        losses = row_losses(model, ids, mask)
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
            (losses.sum() / num_rows).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / num_rows
