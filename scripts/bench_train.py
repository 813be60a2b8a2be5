"""Training speed: rows/s and tokens/s without and with DP on the same census rows and
logical batch, their step-time ratio and peak memory (sampling: scripts/bench_sample.py).

    .venv/bin/python scripts/bench_train.py --model smollm2-135m --steps 6
    .venv/bin/python scripts/bench_train.py --model tiny-random --steps 10

Each mode runs in its own process so that peak memory is its own (max RSS on CPU, peak
allocated on CUDA). The first step is a warm-up and is not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(args) -> dict:
    import torch

    import dplm
    from dplm.config import RunConfig, from_dict

    if args.threads:
        torch.set_num_threads(args.threads)
    dp = args.child == "dp"
    config = from_dict(RunConfig, {
        "data": {"schema": str(ROOT / "recipes/census_schema.yaml"), "max_rows": args.rows},
        "model": {"base": args.model, "precision": args.precision, "prune_vocab": not args.full_vocab},
        "train": {"batch_size": args.batch_size, "micro_batch_size": args.micro_batch_size,
                  "max_steps": args.steps + 1},
        "privacy": {"enabled": dp, "noise_multiplier": 1.0},
    })
    synth = dplm.fit(dplm.load_census(), config, progress=False)
    log = synth.training.log[1:]  # the first step warms up
    step_times = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(synth.training.log, log)]
    rows = sum(e["batch_rows"] for e in log)
    seconds = sum(step_times)
    tokens_per_row = synth.training.tokens_seen / synth.training.rows_seen
    result = {"mode": args.child, "steps": len(log), "rows": rows, "seconds": seconds,
              "mean_step_s": statistics.mean(step_times), "rows_per_s": rows / seconds,
              "tokens_per_s": rows * tokens_per_row / seconds, "tokens_per_row": tokens_per_row}
    if args.profile and args.child == args.order.split(",")[0]:
        print_profile(synth, args.micro_batch_size)
    if torch.cuda.is_available():
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
        result["device"] = torch.cuda.get_device_name()
    else:
        result["peak_memory_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        result["device"] = f"CPU, {torch.get_num_threads()} threads"
    return result


def print_profile(synth, rows: int) -> None:
    """Where one forward + backward pass over `rows` census rows spends its time (to stderr)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from dplm import model as models
    from dplm.schema import coerce_table
    from dplm.train import pad_batch, row_losses

    table = coerce_table(dplm_census().head(rows), synth.schema)
    ids, mask = pad_batch(synth.codec.encode_table(table), synth.tokenizer.pad_token_id, synth.device)
    target_index = models.target_index(synth.model)
    synth.model.train()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    for _ in range(2):  # the first pass warms up
        with profile(activities=activities) as prof:
            with models.training_attention(synth.device, ids.shape[1]):  # the attention kernel training uses
                losses = row_losses(synth.model, ids, mask, target_index)
            losses.mean().backward()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=18), file=sys.stderr)


def dplm_census():
    import dplm

    return dplm.load_census()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--rows", type=int, default=4000, help="census training rows to draw batches from")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6, help="timed steps (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--full-vocab", action="store_true", help="score the whole vocabulary (lever off)")
    parser.add_argument("--order", default="no_dp,dp", help="order of the two runs, e.g. dp,no_dp")
    parser.add_argument("--profile", action="store_true", help="print an operator profile of one micro-batch")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    parser.add_argument("--child", choices=["no_dp", "dp"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)))
        return
    results = {}
    for mode in args.order.split(","):
        cmd = [sys.executable, __file__, "--child", mode] + sys.argv[1:]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode or not line:
            sys.exit(f"bench child {mode} failed:\n{out.stderr[-3000:]}")
        if args.profile and "Self CPU" in out.stderr:
            print(out.stderr[out.stderr.index("---"):])
        results[mode] = json.loads(line[0][len("RESULT "):])
    summary = {"model": args.model, "prune_vocab": not args.full_vocab, "machine": f"{platform.machine()} {os.cpu_count()} cores",
               "batch_size": args.batch_size, "micro_batch_size": args.micro_batch_size, **results}
    first = next(iter(results.values()))
    print(f"model {args.model}, logical batch {args.batch_size}, micro-batch {args.micro_batch_size}, "
          f"{first['device']}, {first['tokens_per_row']:.1f} tokens/row")
    print(f"{'mode':6} {'rows/s':>9} {'tokens/s':>10} {'step s':>8} {'peak GB':>8}")
    for mode, r in results.items():
        print(f"{mode:6} {r['rows_per_s']:9.1f} {r['tokens_per_s']:10.0f} {r['mean_step_s']:8.3f} {r['peak_memory_gb']:8.2f}")
    if len(results) == 2:
        summary["dp_over_no_dp_step_time"] = results["dp"]["mean_step_s"] / results["no_dp"]["mean_step_s"]
        summary["dp_over_no_dp_time_per_row"] = results["no_dp"]["rows_per_s"] / results["dp"]["rows_per_s"]
        print(f"DP / no-DP step time: {summary['dp_over_no_dp_step_time']:.2f}x "
              f"(per row: {summary['dp_over_no_dp_time_per_row']:.2f}x)")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
