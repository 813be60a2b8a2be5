#!/usr/bin/env python
"""A text model's DP-SGD settings at a fixed budget: held-out loss after a few noisy steps.

    .venv/bin/python scripts/bench_text_dp.py [--table london_titles] [--steps 60] [--batch 64]
        [--noise 0.2] [--lr 0.02] [--rank 16] [--lora-layers 15] [--targets q_proj,v_proj] [--no-dp]
        [--seconds S]

Trains one text column's model alone (`text_model.text_codec`: the prompt of the row's other
values, then the text; `train.train` with the loss on the text) on a development table's rows
(scripts/dev_tables.py; its first text column), Poisson-sampled, clipped and noised as a run's
text model is, for `--steps` steps of `--batch` expected rows at `--noise`, then prints the mean
per-token loss on 600 held-out rows as one JSON line (docs/benchmarks.md, issue 38: the learning
rate, rank and layers were chosen by it). Pick the noise so that noise / batch matches the plan
being imitated (`dplm plan` prints both). `--steps 0`: the untrained base model's loss. `--seconds` (without DP): as many steps as S seconds
hold, the learning rate decaying by the clock as a timed run's does (settings compared at equal time).
Run one at a time: two CPU-heavy jobs on 2 cores skew both.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from dev_tables import TABLES

HELD_OUT = 600


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", default="london_titles")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--noise", type=float, default=0.2)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lora-layers", type=int, default=15)
    parser.add_argument("--targets", default="q_proj,v_proj")
    parser.add_argument("--no-dp", action="store_true")
    parser.add_argument("--seconds", type=float, default=None)
    args = parser.parse_args()
    if args.seconds and not args.no_dp:
        parser.error("--seconds is for --no-dp runs (under DP the steps are fixed in advance)")

    import torch

    from dplm import model as models
    from dplm.config import PrivacyConfig, RunConfig
    from dplm.schema import Schema, coerce_table, infer_schema
    from dplm.stages import build_model
    from dplm.text_model import context_of, text_codec, text_model_config, text_starts
    from dplm.train import pad_batch, row_losses, scored_mask, train

    torch.manual_seed(0)
    table = TABLES[args.table]
    given = Schema.from_yaml(str(table.schema_path))
    column = given.names_of("text")[0]
    df = table.load()[given.names].dropna(subset=[column]).sample(frac=1.0, random_state=0).reset_index(drop=True)
    schema = infer_schema(df, given)
    df = coerce_table(df, schema)
    held, rows = df.iloc[:HELD_OUT].reset_index(drop=True), df.iloc[HELD_OUT:].reset_index(drop=True)

    config = RunConfig()
    config.model.lora_r, config.model.lora_alpha = args.rank, 2 * args.rank
    tokenizer = models.load_tokenizer(config.model.base)
    codec = text_codec(schema, column, context_of(schema, [column], column), tokenizer)
    sequences, starts = text_starts(codec, rows)
    held_sequences, held_starts = text_starts(codec, held)
    device = torch.device("cpu")
    model = build_model(dataclasses.replace(config, model=text_model_config(
        config, None, args.targets.split(","), args.lora_layers)), codec, device)
    train_config = dataclasses.replace(
        config.train, batch_size=args.batch, micro_batch_size=min(args.batch, 32), learning_rate=args.lr,
        warmup_steps=10 if args.seconds else max(1, args.steps // 10), max_steps=10**9 if args.seconds else args.steps,
        max_epochs=None, max_training_time=args.seconds,
        early_stopping=False, checkpoint_every=None)
    privacy = PrivacyConfig(enabled=not args.no_dp, noise_multiplier=args.noise, max_epsilon=None)
    started = time.perf_counter()
    result = train(model, sequences, tokenizer.pad_token_id, train_config, privacy, device, progress=False,
                   score_from=starts, num_units=len(sequences)) if args.steps or args.seconds else None
    seconds = time.perf_counter() - started

    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(held_sequences), 50):
            ids, mask = pad_batch(held_sequences[i:i + 50], tokenizer.pad_token_id, device)
            scored = scored_mask(mask, held_starts[i:i + 50])
            counts = scored[:, 1:].sum(1)  # the text's tokens each row's mean loss is over
            total += float((row_losses(model, ids, mask, models.target_index(model), scored=scored) * counts).sum())
            tokens += int(counts.sum())
    print(json.dumps({**vars(args), "column": column, "units": len(sequences),
                      "steps_run": result.steps if result else 0, "held_out_loss": round(total / tokens, 4),
                      "train_seconds": round(seconds, 1),
                      "epsilon": result.privacy["epsilon"] if result and result.privacy else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
