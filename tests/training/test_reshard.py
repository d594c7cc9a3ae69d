"""Resuming under another layout — fewer ranks, more ranks, another ZeRO stage, DeepSpeed or none —
continues to the weights of an uninterrupted run (issue 19). Every run here is a real launch: 2
processes over gloo under accelerate + DeepSpeed, or one plain process."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import accelerate, one_line_error, run_cli, text_rows, write_jsonl

pytestmark = pytest.mark.slow

STEPS = 6
ONE = (["train.micro_batch_size=2"], None)  # the same global batch as 1 pair x 2 processes
ZERO2_X2 = (["train.micro_batch_size=1"], "zero2_cpu.yaml")
ZERO3_X2 = (["train.micro_batch_size=1"], "zero3_cpu.yaml")
ports = iter(range(29711, 29760))


@pytest.fixture(scope="module")
def base(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard")
    data = write_jsonl(root / "train.jsonl", text_rows(24, seed=3))
    args = [f"model.policy={tiny['policy']}", f"data.train={data}", f"ref_cache.dir={root / 'cache'}",
            "train.lr=1e-3", "train.log_every=1", "train.save_every=1", "train.keep_last=10",
            f"train.max_steps={STEPS}"]
    result = run_cli("precompute", f"output_dir={root / 'pre'}", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    return root, args


def train(out, args, layout, *extra):
    settings, launcher = layout
    result = run_cli("train", f"output_dir={out}", *args, *settings, *extra,
                     launcher=accelerate(launcher, next(ports)) if launcher else None)
    return result


def resume_elsewhere(checkpoint, out, args, layout, *extra):
    """A fresh output dir holding only `checkpoint`, continued under `layout` with resume=auto."""
    shutil.copytree(checkpoint, out / "checkpoints" / checkpoint.name)
    (out / "checkpoints" / "latest").write_text(checkpoint.name + "\n")
    result = train(out, args, layout, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / checkpoint.name}" in result.stdout
    assert (out / "checkpoints" / checkpoint.name / "universal").is_dir()
    return result


def weights(out, name="model.safetensors"):
    return {k: v.float() for k, v in load_file(out / "final" / name).items()}


def assert_same_weights(a, b, atol=1e-5, rtol=0.0):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=rtol, msg=key)


@pytest.fixture(scope="module")
def straight_zero2(base):
    root, args = base
    out = root / "straight-zero2"
    result = train(out, args, ZERO2_X2)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_resume_across_process_counts_and_zero_stages(base, straight_zero2, tmp_path):
    """One run's steps pass through three layouts, each resuming the checkpoint the previous wrote:
    ZeRO-2 x2 -> 1 process without DeepSpeed (fewer ranks) -> ZeRO-3 x2 (more ranks) -> ZeRO-2 x2
    (another stage). Each ends on the weights of the uninterrupted ZeRO-2 run."""
    root, args = base
    expected = weights(straight_zero2)
    steps = straight_zero2 / "checkpoints"

    one = tmp_path / "one"
    result = resume_elsewhere(steps / "step-000002", one, args, ONE)
    assert "written by 2 processes under DeepSpeed ZeRO-2, continuing as 1 process without DeepSpeed" in result.stdout
    assert_same_weights(weights(one), expected)

    zero3 = tmp_path / "zero3"
    resume_elsewhere(one / "checkpoints" / "step-000003", zero3, args, ZERO3_X2)
    assert_same_weights(weights(zero3), expected)

    zero2 = tmp_path / "zero2"
    resume_elsewhere(zero3 / "checkpoints" / "step-000004", zero2, args, ZERO2_X2)
    assert_same_weights(weights(zero2), expected)


def test_changed_global_batch_across_layouts_is_refused(base, straight_zero2, tmp_path):
    """2 processes x 1 pair resumed as 1 process x 1 pair: the data order would differ; one line."""
    root, args = base
    out = tmp_path / "run"
    shutil.copytree(straight_zero2 / "checkpoints" / "step-000002", out / "checkpoints" / "step-000002")
    result = run_cli("train", f"output_dir={out}", *args, "train.micro_batch_size=1")
    one_line_error(result, "global batch changed since it was written", "train.allow_resume_changes=true")


def test_lora_adapter_resumes_from_one_process_under_zero3(base, tmp_path):
    root, args = base
    lora = ["model.lora.r=4"]
    straight = tmp_path / "straight"
    result = train(straight, args, ONE, *lora)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = tmp_path / "zero3"
    resume_elsewhere(straight / "checkpoints" / "step-000003", resumed, args, ONE, *lora,
                     "distributed.deepspeed=ds_configs/zero3_cpu.json")
    adapter = "adapter_model.safetensors"
    assert_same_weights(weights(resumed, adapter), weights(straight, adapter))


def test_bf16_master_weights_resume_under_deepspeed(base, tmp_path):
    """bf16 weights with fp32 master copies in the optimizer (no DeepSpeed) continued under ZeRO-2
    bf16 (DeepSpeed's own fp32 masters): the masters carry over, so the run ends where the
    uninterrupted one does, up to bf16 rounding of the forward."""
    root, args = base
    args = [*args, f"ref_cache.dir={tmp_path / 'cache'}"]  # reference log-probs of a bf16 forward
    straight = tmp_path / "straight"
    result = train(straight, args, ONE, "model.dtype=bfloat16")
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = tmp_path / "zero2"
    resume_elsewhere(straight / "checkpoints" / "step-000003", resumed, args, ONE, "model.dtype=bfloat16",
                     "train.mixed_precision=bf16", "distributed.deepspeed=ds_configs/zero2_cpu.json")
    expected, got = weights(straight), weights(resumed)
    at_step_3 = {k: v.float() for k, v in load_file(straight / "checkpoints" / "step-000003" / "model.safetensors").items()}
    moved = max((expected[k] - at_step_3[k]).abs().max() for k in expected)
    apart = max((expected[k] - got[k]).abs().max() for k in expected)
    print(f"last 3 steps moved weights by up to {moved:.3g}; resumed and uninterrupted differ by {apart:.3g}")
    # One bf16 rounding apart, but for a few weights whose gradient is at noise level: Adam steps
    # them by ~lr whichever its sign, which bf16 vs fp32 gradient accumulation can flip (1 in 23k).
    diff = torch.cat([(expected[k] - got[k]).abs().flatten() for k in expected])
    bound = torch.cat([(1e-5 + 2 ** -7 * got[k].abs()).flatten() for k in expected])
    assert (diff > bound).float().mean() < 1e-4
    assert apart < moved / 4


class _MainProcess:
    is_main_process, num_processes = True, 1

    def print(self, *args):
        pass

    def wait_for_everyone(self):
        pass


def test_a_checkpoint_that_cannot_be_converted_is_refused_naming_both_layouts(tmp_path):
    """An accelerate checkpoint whose optimizer state lacks a trained weight: one error naming both
    layouts and what to do; no half-written universal folder is left."""
    from safetensors.torch import save_file

    from dpo_dist.errors import UserError
    from dpo_dist.training import reshard

    save_file({"w": torch.ones(2)}, tmp_path / "model.safetensors")
    torch.save({"state": {}, "param_groups": [{"lr": 1e-3, "params": [0]}]}, tmp_path / "optimizer.bin")
    written = {"processes": 1, "deepspeed": False, "zero_stage": 0, "fp32_master_copies": False}
    layout = {"processes": 2, "deepspeed": True, "zero_stage": 3, "fp32_master_copies": False}
    with pytest.raises(UserError) as error:
        reshard.universal_checkpoint(_MainProcess(), tmp_path, written, layout, {"w": torch.Size([2])})
    message = str(error.value)
    for phrase in ("written by 1 process without DeepSpeed", "this run is 2 processes under DeepSpeed ZeRO-3",
                   "optimizer.bin has no state for w", "resume=null"):
        assert phrase in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "optimizer.bin"]
