"""bf16 that trains, on the CPU for real: fp32 master weights, autocast, DeepSpeed bf16 on 2
processes, exact resume after SIGKILL, the reference pass in the run's precision, and the refusals."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import (REPO, accelerate, kill_group, latest_step, launch_background, probe_launch, run_cli,
                      text_rows, wait_for, write_jsonl)
from dpo_dist.config import load_config
from dpo_dist.distributed import check_attention_precision
from dpo_dist.errors import UserError
from dpo_dist.precision import MasterWeightAdamW, check_deepspeed_precision


def test_master_weights_keep_updates_that_bf16_rounds_away():
    """16 AdamW steps at lr 1e-5 on bf16 weights: stepping them in place leaves almost all of them
    unchanged; fp32 masters take every update, land where fp32 training lands, and survive a
    state-dict round trip (what a checkpoint stores)."""
    torch.manual_seed(0)
    start = torch.randn(64, 64) * 0.02
    direction = torch.randn(64, 64)  # a consistent gradient, as over steps of one preference signal
    grads = [direction + 0.1 * torch.randn(64, 64) for _ in range(16)]

    def train(weight, optimizer):
        for grad in grads:
            weight.grad = grad.to(weight.dtype)
            optimizer.step()
            optimizer.zero_grad()
        return weight.detach().float()

    fp32 = torch.nn.Parameter(start.clone())
    expected = train(fp32, torch.optim.AdamW([fp32], lr=1e-5))
    pure = torch.nn.Parameter(start.to(torch.bfloat16))
    in_place = train(pure, torch.optim.AdamW([pure], lr=1e-5))
    mastered = torch.nn.Parameter(start.to(torch.bfloat16))
    optimizer = MasterWeightAdamW([mastered], lr=1e-5)
    with_masters = train(mastered, optimizer)

    initial = start.to(torch.bfloat16).float()
    assert (in_place != initial).float().mean() < 0.2  # the updates round away
    assert (with_masters != initial).float().mean() > 0.8
    master = optimizer.param_groups[0]["params"][0]  # every update, on top of the bf16 start
    torch.testing.assert_close(master, initial + (expected - start), rtol=0, atol=1e-6)  # bf16 grads: ~1%
    assert torch.equal(with_masters, master.to(torch.bfloat16).float())

    state = optimizer.state_dict()
    fresh = torch.nn.Parameter(start.to(torch.bfloat16))
    restored = MasterWeightAdamW([fresh], lr=1e-5)
    restored.load_state_dict(state)
    assert torch.equal(restored.param_groups[0]["params"][0], optimizer.param_groups[0]["params"][0])
    assert torch.equal(fresh.detach(), mastered.detach())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("precision") / "train.jsonl", text_rows(40, seed=5))


def run_train(out, tiny, data, *extra, launcher=None):
    result = run_cli("train", f"output_dir={out}", f"model.policy={tiny['policy']}", f"data.train={data}",
                     "train.lr=1e-4", "train.warmup_ratio=0", "train.log_every=1", "train.save_every=0",
                     "train.micro_batch_size=2", "train.max_steps=16", "train.report_to=none", *extra,
                     launcher=launcher)
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return load_file(out / "final" / "model.safetensors"), metrics, result.stdout


def update(final: dict, initial: dict) -> torch.Tensor:
    return torch.cat([(final[k].float() - initial[k].float()).flatten() for k in initial])


@pytest.fixture(scope="module")
def runs(tiny, data, tmp_path_factory):
    """fp32; bf16 autocast over fp32 weights; bf16 weights with fp32 masters (1 process each)."""
    root = tmp_path_factory.mktemp("runs")
    return {
        "fp32": run_train(root / "fp32", tiny, data, "train.mixed_precision=fp32"),
        "autocast": run_train(root / "autocast", tiny, data, "train.mixed_precision=bf16"),
        "bf16 weights": run_train(root / "bf16", tiny, data, "train.mixed_precision=bf16", "model.dtype=bfloat16"),
    }


@pytest.mark.slow
def test_bf16_trains_like_fp32(tiny, runs):
    """Both bf16 runs move the weights as the fp32 run does (as far as bf16 can show a change: the
    fp32 run's own result rounded to bf16), in the same direction; step 1 is exactly DPO's start."""
    initial = load_file(tiny["policy"] / "model.safetensors")
    fp32_weights, _, _ = runs["fp32"]
    for name, dtype in (("autocast", torch.float32), ("bf16 weights", torch.bfloat16)):
        weights, metrics, stdout = runs[name]
        assert "train.mixed_precision=bf16 -> bf16" in stdout
        assert {v.dtype for v in weights.values()} == {dtype}, name  # exported as loaded
        seen = {k: v.to(dtype) for k, v in initial.items()}  # the start and fp32's end, as this dtype shows them
        fp32_update = update({k: v.to(dtype) for k, v in fp32_weights.items()}, seen)
        moved = update(weights, seen)
        assert (moved != 0).float().mean() > 0.8 * (fp32_update != 0).float().mean(), name
        assert torch.nn.functional.cosine_similarity(moved, fp32_update, dim=0) > 0.9, name
        first = metrics[0]  # the reference pass ran in the same precision: rewards are 0 up to rounding
        assert first["step"] == 1 and first["loss"] == pytest.approx(math.log(2), abs=1e-3), name
        assert abs(first["rewards/chosen"]) < 1e-3 and abs(first["rewards/rejected"]) < 1e-3, name


def bf16_representable(weights: dict) -> float:
    """Share of the values that a bf16 copy cast up would hold."""
    flat = torch.cat([v.flatten() for v in weights.values()])
    return (flat == flat.to(torch.bfloat16).float()).float().mean().item()


@pytest.mark.slow
@pytest.mark.parametrize("config,port", [("zero2_cpu.yaml", 29681), ("zero3_cpu.yaml", 29682)])
def test_deepspeed_bf16_exports_the_fp32_masters(tiny, data, runs, tmp_path, config, port):
    """DeepSpeed casts the weights to bf16 and steps fp32 masters: the float32 export is those
    masters (as its last checkpoint holds them, read with DeepSpeed's own zero_to_fp32), not the
    bf16 copy cast up, and its update is the 1-process autocast run's."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    out = tmp_path / "ds"
    weights, metrics, stdout = run_train(out, tiny, data, "train.mixed_precision=bf16", "train.micro_batch_size=1",
                                         "train.save_every=16", launcher=accelerate(config, port))
    assert "DeepSpeed's master weights" in stdout
    masters = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints" / "step-000016"))
    assert {v.dtype for v in weights.values()} == {torch.float32}
    for key, value in weights.items():
        torch.testing.assert_close(value, masters[key], rtol=0, atol=0, msg=key)
    assert bf16_representable(weights) < 0.5  # the bf16 module copy: 1.0
    one_weights, one_metrics, _ = runs["autocast"]
    for ours, theirs in zip(metrics, one_metrics):
        assert ours["loss"] == pytest.approx(theirs["loss"], abs=2e-3), ours["step"]
    initial = load_file(tiny["policy"] / "model.safetensors")
    cosine = torch.nn.functional.cosine_similarity(update(weights, initial), update(one_weights, initial), dim=0)
    assert cosine >= 0.99


@pytest.mark.slow
@pytest.mark.parametrize("config,port,processes", [("zero2_cpu.yaml", 29683, 2), ("zero3_cpu.yaml", 29684, 2),
                                                   ("zero3_cpu.yaml", 29686, 3)])
def test_deepspeed_bf16_masters_start_from_the_fp32_weights(tiny, data, tmp_path, config, port, processes):
    """DeepSpeed would make its masters from the bf16 copy, rounding every starting weight; they are
    set from the fp32 files, so a run that barely moves (one step at lr 1e-12) exports the fp32
    start itself, not its bf16 rounding. 3 processes: ZeRO-3 partitions that 3 does not divide
    (64-wide norms), whose last part is padded."""
    weights, _, _ = run_train(tmp_path / "still", tiny, data, "train.mixed_precision=bf16", "train.micro_batch_size=1",
                              "train.lr=1e-12", "train.max_steps=1",
                              launcher=[*accelerate(config, port), "--num_processes", str(processes)])
    initial = load_file(tiny["policy"] / "model.safetensors")
    assert bf16_representable(initial) < 0.5
    for key, value in initial.items():
        torch.testing.assert_close(weights[key], value, rtol=0, atol=1e-10, msg=key)


@pytest.mark.slow
def test_bf16_weights_export_their_masters_in_float32(tiny, data, runs, tmp_path):
    """model.dtype=bfloat16 exports bf16 as asked; export.dtype=float32 (in the run, or `dpo-dist
    export --dtype float32` of its checkpoint) writes MasterWeightAdamW's fp32 masters instead."""
    bf16_weights, _, _ = runs["bf16 weights"]
    assert {v.dtype for v in bf16_weights.values()} == {torch.bfloat16}
    out = tmp_path / "fp32-export"
    weights, _, _ = run_train(out, tiny, data, "train.mixed_precision=bf16", "model.dtype=bfloat16",
                              "export.dtype=float32", "train.save_every=16")
    assert {v.dtype for v in weights.values()} == {torch.float32}
    assert json.loads((out / "final" / "config.json").read_text())["dtype"] == "float32"
    optimizer = torch.load(out / "checkpoints" / "step-000016" / "optimizer.bin", weights_only=False)
    from transformers import AutoModelForCausalLM
    names = [n for n, p in AutoModelForCausalLM.from_pretrained(tiny["policy"]).named_parameters()]
    for name, master in zip(names, optimizer["master_weights"]):
        torch.testing.assert_close(weights[name], master, rtol=0, atol=0, msg=name)
    for key, value in bf16_weights.items():  # the same run otherwise: its bf16 export is the masters rounded
        assert torch.equal(value, weights[key].to(torch.bfloat16)), key
    assert bf16_representable(weights) < 0.5
    exported = run_cli("export", str(out / "checkpoints" / "step-000016"), "--output_dir", str(tmp_path / "again"),
                       "--dtype", "float32")
    assert exported.returncode == 0, exported.stderr[-3000:]
    again = load_file(tmp_path / "again" / "model.safetensors")
    for key, value in weights.items():
        assert torch.equal(again[key], value), key


@pytest.mark.slow
@pytest.mark.parametrize("launcher,extra", [
    (None, ["model.dtype=bfloat16"]),  # 1 process: fp32 master weights in the optimizer state
    ("zero2_cpu.yaml", []),  # 2 processes: DeepSpeed's bf16 weights and fp32 master partitions
], ids=["master-weights", "zero2x2"])
def test_bf16_resumes_exactly_after_sigkill(tiny, data, tmp_path, launcher, extra):
    ports = iter(range(29691, 29700))
    launch = (lambda: accelerate(launcher, next(ports))) if launcher else (lambda: None)
    args = [f"model.policy={tiny['policy']}", f"data.train={data}", "train.lr=1e-4", "train.warmup_ratio=0",
            "train.log_every=1",
            "train.micro_batch_size=1", "train.max_steps=30", "train.save_every=3", "train.report_to=none",
            "train.mixed_precision=bf16", *extra]
    straight, _, _ = run_train(tmp_path / "straight", tiny, data, *args, launcher=launch())
    out = tmp_path / "killed"
    proc = launch_background([f"output_dir={out}", *args], launch())
    wait_for(lambda: latest_step(out) >= 3)
    kill_group(proc)
    assert 3 <= latest_step(out) < 30 and not (out / "final").exists(), "the kill should land mid-run"
    resumed, _, stdout = run_train(out, tiny, data, *args, launcher=launch())
    assert "resumed from" in stdout
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("launcher,adapters", [("zero2_cpu.yaml", "torch.bfloat16"), ("zero3_cpu.yaml", "torch.float32")])
def test_lora_under_deepspeed_bf16(tiny, data, tmp_path, launcher, adapters):
    """LoRA under DeepSpeed bf16, as the README says: ZeRO-1/2 cast the adapters to bf16 for the
    forward (DeepSpeed steps fp32 masters of them), ZeRO-3 keeps them fp32 beside the bf16 base;
    the base is bf16 either way, the exported adapter fp32, and step 1 is DPO's start."""
    out = tmp_path / "lora"
    records = probe_launch(["train", f"output_dir={out}", f"model.policy={tiny['policy']}", f"data.train={data}",
                            "model.lora.r=4", "train.mixed_precision=bf16", "train.max_steps=2", "train.log_every=1",
                            "train.micro_batch_size=1", "train.report_to=none"], port=29685, launcher=launcher)
    prepared = [r for r in records if r["kind"] == "prepared"]
    assert len(prepared) == 2 and all(r["trained_dtypes"] == [adapters] for r in prepared), prepared
    assert all(r["frozen_dtypes"] == ["torch.bfloat16"] for r in prepared), prepared
    assert {v.dtype for v in load_file(out / "final" / "adapter_model.safetensors").values()} == {torch.float32}
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-3)


def test_precision_disagreements_are_refused(tiny, data, tmp_path):
    cfg = load_config(None, ["model.policy=x", "data.train=x", "train.mixed_precision=fp32"])
    with pytest.raises(UserError, match=r"sets bf16.enabled=true, but train.mixed_precision=fp32 means fp32 here"):
        check_deepspeed_precision({"bf16": {"enabled": True}}, cfg, "fp32", "DeepSpeed JSON x.json")
    check_deepspeed_precision({"bf16": {"enabled": "auto"}}, cfg, "fp32", "x")  # "auto": ours decides
    with pytest.raises(UserError, match="model.dtype=bfloat16 under DeepSpeed needs train.mixed_precision=bf16"):
        check_deepspeed_precision({}, load_config(None, ["model.dtype=bfloat16"]), "fp32", "x")

    json_path = tmp_path / "bf16.json"
    ds = json.loads((REPO / "ds_configs" / "zero2_cpu.json").read_text())
    ds["bf16"] = {"enabled": True}
    json_path.write_text(json.dumps(ds))
    base = [f"output_dir={tmp_path / 'out'}", f"model.policy={tiny['policy']}", f"data.train={data}"]
    for extra, message in (
        ([f"distributed.deepspeed={json_path}", "train.mixed_precision=fp32"], "sets bf16.enabled=true"),
        (["train.mixed_precision=fp16"], "needs a CUDA GPU"),
    ):
        result = run_cli("train", *base, *extra)
        assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
    flash = load_config(None, ["train.mixed_precision=fp32"])
    flash.model.attn_implementation = "flash_attention_2"  # (a config with it is refused where flash_attn is missing)
    with pytest.raises(UserError, match="runs in bf16 / fp16 only"):
        check_attention_precision(flash, "fp32", casts=False)
