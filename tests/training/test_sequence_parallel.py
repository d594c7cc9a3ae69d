"""distributed.sequence_parallel=2 end to end, 2 real processes (gloo, DeepSpeed on the CPU): the
reference pass and training with each sequence cut across both ranks give the numbers of one
process, and a killed run resumes exactly."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import (accelerate, dialogue_rows, kill_group, latest_step, launch_background, one_line_error, run_cli,
                      wait_for, write_jsonl)
from dpo_dist.errors import UserError
from dpo_dist.model.ulysses import check_supported

pytestmark = pytest.mark.slow
ports = iter(range(29761, 29780))
CUT = ["distributed.sequence_parallel=2"]


@pytest.fixture(scope="module")
def base(tiny, tmp_path_factory):
    """Multi-turn chat rows, packed with shared prompts."""
    root = tmp_path_factory.mktemp("sequence_parallel")
    data = write_jsonl(root / "train.jsonl", dialogue_rows(20, seed=5))
    args = [f"model.policy={tiny['policy']}", f"data.train={data}",
            "train.lr=1e-3", "train.warmup_ratio=0", "train.log_every=1", "train.micro_batch_size=2",
            "train.packing=true", "train.prefix_sharing=true", "train.report_to=none"]
    return root, args


def weights(out):
    return load_file(out / "final" / "model.safetensors")


def assert_same(a, b, atol=1e-5):
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=atol, msg=key)


@pytest.fixture(scope="module")
def cut_run(base):
    """ZeRO-3 x 2, each sequence cut across both ranks, the frozen reference partitioned and cut too:
    it builds its reference cache, then trains 12 steps, checkpointing every 2, each layer
    recomputed in backward (gradient checkpointing, as long pairs need)."""
    root, args = base
    args = [*args, *CUT, f"ref_cache.dir={root / 'cache-cut'}", "train.max_steps=12", "train.save_every=2",
            "model.gradient_checkpointing=true"]
    out = root / "cut"
    result = run_cli("train", f"output_dir={out}", *args, launcher=accelerate("zero3_cpu.yaml", next(ports)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es), each sequence cut across 2, global batch 2 pairs (micro 2 x accum 1 x 1)" in result.stdout
    return out, args


def test_reference_pass_and_training_equal_one_process(base, cut_run, tmp_path):
    """The cut run's cache equals the one-process cache, its first rewards are 0, and its training
    ends on the one-process weights."""
    root, args = base
    cut, cut_args = cut_run
    one_cache, cut_cache = tmp_path / "cache-one", root / "cache-cut"
    result = run_cli("precompute", f"output_dir={tmp_path / 'pre'}", *args, f"ref_cache.dir={one_cache}")
    assert result.returncode == 0, result.stderr[-3000:]
    # The policy starts as the reference: scored in training batches of other widths (so cut at
    # other places) than in the reference pass, its first rewards are still exactly 0.
    first = json.loads((cut / "metrics.jsonl").read_text().splitlines()[0])
    assert first["rewards/chosen"] == first["rewards/rejected"] == 0.0, first
    shards = sorted(one_cache.glob("*.safetensors"))
    assert shards and [s.name for s in shards] == sorted(s.name for s in cut_cache.glob("*.safetensors"))
    for shard in shards:
        a, b = load_file(shard), load_file(cut_cache / shard.name)
        for key in a:  # log-prob sums of ~100: float32 rounding of another summation order
            torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-5, msg=f"{shard.name} {key}")

    one = tmp_path / "one"  # reads the cut pass's cache: the comparison is of training alone
    one_args = [a for a in cut_args if a not in CUT]
    result = run_cli("train", f"output_dir={one}", *one_args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same(weights(one), weights(cut))


def test_sequence_parallel_resumes_exactly_after_sigkill(cut_run, tmp_path):
    """The cut run again, SIGKILLed after its first checkpoint and resumed: the same weights, bit for bit."""
    cut, args = cut_run
    out = tmp_path / "killed"
    proc = launch_background([f"output_dir={out}", *args], accelerate("zero3_cpu.yaml", next(ports)))
    wait_for(lambda: latest_step(out) >= 2)
    kill_group(proc)
    assert 2 <= latest_step(out) < 12 and not (out / "final").exists(), "the kill should land mid-run"
    result = run_cli("train", f"output_dir={out}", *args, launcher=accelerate("zero3_cpu.yaml", next(ports)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout
    assert_same(weights(cut), weights(out), atol=0)


@pytest.mark.parametrize("extra,message", [
    ([], "distributed.sequence_parallel=2 does not divide the 1 processes"),
    (["loss.type=aot"], "loss.type=aot looks across the step's pairs"),
], ids=["processes", "coupled loss"])
def test_unsupported_combinations_are_refused_in_one_line(base, tmp_path, extra, message):
    root, args = base
    result = run_cli("train", f"output_dir={tmp_path / 'a'}", *args, *CUT, f"ref_cache.dir={root / 'cache'}", *extra)
    one_line_error(result, message)


def test_flash_kernels_are_refused_under_sequence_parallelism():
    with pytest.raises(UserError, match="with model.attn_implementation=flash_attention_2: not supported"):
        check_supported("flash_attention_2", 2)
