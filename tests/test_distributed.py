"""Real multi-process runs (2 CPU processes, gloo, DeepSpeed on CPU): sharding, process-count
invariance, sharded checkpoints with exact resume after SIGKILL, HF export, LoRA under ZeRO."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import REPO, run_cli, text_rows, write_jsonl

pytestmark = pytest.mark.slow


def accelerate(config: str, port: int) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(REPO / "launch" / "accelerate" / config), "--main_process_port", str(port)]


def torchrun(port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]


@pytest.fixture(scope="module")
def setup(tiny, tmp_path_factory):
    """Data, and a reference cache built once (it does not depend on the process count)."""
    root = tmp_path_factory.mktemp("dist")
    data = write_jsonl(root / "train.jsonl", text_rows(30, seed=11))
    base = [f"model.policy={tiny['policy']}", f"data.train={data}", f"ref_cache.dir={root / 'cache'}",
            "train.lr=1e-3", "train.warmup_ratio=0", "train.log_every=1", "train.save_every=0", "resume=null"]
    result = run_cli("precompute", f"output_dir={root / 'pre'}", *base)
    assert result.returncode == 0, result.stderr[-2000:]
    return root, base


def setup_policy(base):
    return next(arg.split("=", 1)[1] for arg in base if arg.startswith("model.policy="))


def train(out, base, *extra, launcher=None):
    result = run_cli("train", f"output_dir={out}", *base, *extra, launcher=launcher)
    assert result.returncode == 0, result.stderr[-4000:]
    return load_file(out / "final" / "model.safetensors")


def test_two_processes_split_data_and_zero3_shards_each_parameter(setup, tiny):
    root, base = setup
    result = subprocess.run(
        [*accelerate("zero3_cpu.yaml", 29621), str(REPO / "tests" / "dist_probe.py"), f"output_dir={root / 'probe'}",
         *base, "train.micro_batch_size=2", "train.max_steps=1"],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "DS_ACCELERATOR": "cpu"}, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    probes = {p["rank"]: p for p in (json.loads(line[6:]) for line in result.stdout.splitlines()
                                      if line.startswith("PROBE "))}
    assert sorted(probes) == [0, 1]
    assert all(p["num_processes"] == 2 for p in probes.values())
    assert len(probes[0]["first_step_pairs"]) == len(probes[1]["first_step_pairs"]) == 2
    assert not set(probes[0]["first_step_pairs"]) & set(probes[1]["first_step_pairs"])
    for p in probes.values():  # each rank holds half of every parameter (rounded up to pad)
        assert p["full"] == sum(t.numel() for t in AutoModelForCausalLM.from_pretrained(tiny["policy"]).parameters())
        assert p["held"] == pytest.approx(p["full"] / 2, rel=1e-3)
        assert p["per_param_fraction"] and all(0.5 <= f <= 0.51 for f in p["per_param_fraction"])


def test_final_weights_do_not_depend_on_processes_or_split(setup):
    """Global batch 4 in four ways; fp32 final weights agree to 1e-5."""
    root, base = setup
    steps = ["train.max_steps=4"]
    runs = {
        "1 proc, micro 4 x accum 1": train(root / "a", base, *steps, "train.micro_batch_size=4"),
        "1 proc, micro 1 x accum 4": train(root / "b", base, *steps, "train.micro_batch_size=1", "train.grad_accum=4"),
        "2 procs ZeRO-2, micro 1 x accum 2": train(root / "c", base, *steps, "train.micro_batch_size=1",
                                                   "train.grad_accum=2", launcher=accelerate("zero2_cpu.yaml", 29622)),
        "2 procs ZeRO-3, micro 2 x accum 1": train(root / "d", base, *steps, "train.micro_batch_size=2",
                                                   launcher=accelerate("zero3_cpu.yaml", 29623)),
        "torchrun 2 procs ZeRO-2, micro 2": train(root / "e", base, *steps, "train.micro_batch_size=2",
                                                  "distributed.deepspeed=ds_configs/zero2_cpu.json",
                                                  launcher=torchrun(29624)),
    }
    reference = runs.pop("1 proc, micro 4 x accum 1")
    initial = AutoModelForCausalLM.from_pretrained(setup_policy(base)).state_dict()
    assert max((reference[k] - initial[k]).abs().max().item() for k in reference) > 1e-3  # it did train
    for name, weights in runs.items():
        assert weights.keys() == reference.keys(), name
        for key in reference:
            torch.testing.assert_close(weights[key], reference[key], rtol=0, atol=1e-5, msg=f"{name}: {key}")
    lines = [json.loads(line) for line in (root / "c" / "metrics.jsonl").read_text().splitlines()]
    assert [line["pairs"] for line in lines] == [4.0] * 4  # metrics count every pair of both ranks
