"""Sampling speed: valid census rows per second at several batch sizes.

    .venv/bin/python scripts/bench_sample.py --model smollm2-135m --rows 256 --batch-sizes 64,256
    .venv/bin/python scripts/bench_sample.py --run-dir runs/census_dp --rows 8192 --batch-sizes 1024,4096

With --run-dir the run's fine-tuned model samples (realistic value lengths); otherwise the
base model with a fresh LoRA adapter does, under the census schema. Each batch size first
samples one warm-up batch. --full-vocab scores the whole vocabulary (the pruning lever off).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(args):
    import dplm
    from dplm.config import RunConfig, from_dict
    from dplm.schema import Schema
    from dplm.serialize import RowCodec
    from dplm.synthesizer import Synthesizer

    if args.run_dir:
        return dplm.load(args.run_dir)
    from dplm import model as models

    config = from_dict(RunConfig, {"model": {"base": args.model, "prune_vocab": not args.full_vocab}})
    codec = RowCodec(Schema.from_yaml(ROOT / "recipes/census_schema.yaml"), models.load_tokenizer(args.model))
    device = models.default_device()
    model = models.add_lora(models.base_model(config.model, codec, device), 16, 32, 0.0, ["q_proj", "v_proj"]).eval()
    return Synthesizer(config, codec, model, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--run-dir", help="sample from this run's fine-tuned model")
    parser.add_argument("--rows", type=int, default=256, help="rows to sample per batch size")
    parser.add_argument("--batch-sizes", default="256,512")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--full-vocab", action="store_true", help="score the whole vocabulary (lever off)")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    synth = build(args)
    device = (torch.cuda.get_device_name() if synth.device.type == "cuda"
              else f"CPU, {torch.get_num_threads()} threads")
    results = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        synth.config.sample.batch_size = batch
        synth.sample(batch, seed=0, progress=False)  # warm-up
        if synth.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        df = synth.sample(args.rows, seed=1, progress=False)
        seconds = time.perf_counter() - start
        stats = synth.last_sample_stats
        results.append({"batch_size": batch, "rows": len(df), "seconds": seconds, "rows_per_s": len(df) / seconds,
                        "valid_rate": stats.valid_rate})
        print(f"batch {batch:5d}: {len(df) / seconds:8.1f} valid rows/s ({len(df)} rows in {seconds:.1f} s, "
              f"valid-row rate {stats.valid_rate:.1%})", flush=True)
    summary = {"model": args.run_dir or args.model, "prune_vocab": synth.config.model.prune_vocab, "device": device,
               "machine": platform.machine(), "results": results}
    print(f"{summary['model']} on {device}, output layer "
          f"{'pruned to the schema' if summary['prune_vocab'] else 'full vocabulary'}")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
