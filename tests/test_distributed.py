"""Training on several processes (gloo on CPU): one logical batch split across ranks."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dplm import model as models
from conftest import privacy_config, train_config
from dplm.schema import Schema, coerce_table
from dplm.serialize import RowCodec
from dplm.train import train
from conftest import census_kinds_file
from test_privacy import independent_epsilon

ROOT = Path(__file__).resolve().parents[1]


def _run_rank(rank: int, world: int, init_file: str, out_dir: str, dp: bool, max_epsilon) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from dplm.datasets import load_census

        tokenizer = models.load_tokenizer("tiny-random")
        schema = Schema.from_yaml(ROOT / "recipes/census_schema.yaml")
        codec = RowCodec(schema, tokenizer)
        sequences = codec.encode_table(coerce_table(load_census().head(64), schema))
        base = models.load_base_model("tiny-random", len(tokenizer))
        models.restrict_output_vocab(base, codec.output_token_ids())
        torch.manual_seed(0)
        model = models.add_lora(base, 4, 8, 0.0, ["q_proj", "v_proj"])
        result = train(model, sequences, tokenizer.pad_token_id,
                       train_config(batch_size=16, micro_batch_size=4, max_steps=3, seed=2),
                       privacy_config(enabled=dp, max_epsilon=max_epsilon), torch.device("cpu"), progress=False)
        weights = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        torch.save({"weights": weights, "privacy": result.privacy, "processes": result.processes,
                    "stop_reason": result.stop_reason},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _train(tmp_path, world: int, dp: bool, max_epsilon=None) -> list[dict]:
    out = tmp_path / f"w{world}-{dp}"
    out.mkdir()
    mp.spawn(_run_rank, args=(world, str(out / "init"), str(out), dp, max_epsilon), nprocs=world, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def test_two_processes_without_dp_equal_one_process(tmp_path):
    """The batch's gradient is all-reduced exactly: two ranks train the same weights as one."""
    one = _train(tmp_path, 1, dp=False)[0]
    ranks = _train(tmp_path, 2, dp=False)
    assert ranks[0]["processes"] == 2
    for name, w in one["weights"].items():
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name])
        assert torch.allclose(ranks[0]["weights"][name], w, atol=1e-6), name


def test_two_processes_with_dp_share_weights_epsilon_and_cap(tmp_path):
    cap = independent_epsilon(1.5, 16 / 64, 2, 1e-5) * 1.0001  # stops both ranks after 2 of 3 steps
    ranks = _train(tmp_path, 2, dp=True, max_epsilon=cap)
    for name, w in ranks[0]["weights"].items():
        assert torch.equal(w, ranks[1]["weights"][name]), name
    expected = independent_epsilon(1.5, 16 / 64, 2, 1e-5)  # what one process reports
    for rank in ranks:
        assert rank["stop_reason"] == "max_epsilon" and rank["privacy"]["steps"] == 2
        assert rank["privacy"]["epsilon"] == pytest.approx(expected, rel=1e-4) and rank["privacy"]["epsilon"] <= cap


def test_torchrun_launch_of_the_cli(tmp_path):
    """The documented multi-process launch: rank 0 writes the run, the accountant is unchanged,
    and every rank estimates the same DP schema and canaries (else the weights would differ)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "dplm.cli", "train",
           str(ROOT / "recipes/census_dp.yaml"), "model.base=tiny-random", "train.max_steps=2",
           "train.batch_size=32", "train.micro_batch_size=32", "privacy.accountant=rdp", "privacy.noise_multiplier=1.5",
           "data.sample_fraction=0.0256", "sample.num_rows=5", f"output_dir={out}",  # ~1,000 training rows
           "output_csv=null", f"data.schema={census_kinds_file(tmp_path)}", "privacy.metadata_epsilon=30", "privacy.max_epsilon=null",
           "audit.canaries=2", "audit.canary_inclusion=1", "-q"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 processes" in done.stdout
    privacy = json.loads((out / "privacy.json").read_text())
    assert privacy["steps"] == 2
    assert len(privacy["metadata_estimated_under_dp"]) == 16  # every census column, and the count of units
    units = privacy["num_training_units"] + 2  # the DP count of ~1,000 rows, and 2 canaries
    assert privacy["sample_rate"] == pytest.approx(32 / units)
    training = independent_epsilon(1.5, 32 / units, 2, 0.9e-5)  # 0.1 of delta went to the category sets
    assert privacy["epsilon"] == pytest.approx(30 + 0.05 + training, rel=1e-4)
