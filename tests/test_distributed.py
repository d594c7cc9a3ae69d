"""Real multi-process runs (2 CPU processes, gloo, DeepSpeed on CPU): sharding, process-count
invariance, sharded checkpoints with exact resume after SIGKILL, HF export, LoRA under ZeRO."""

import json
import os
import shutil
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import (REPO, ZERO_REWARD_TOLERANCE, accelerate, kill_group, latest_step, launch_background, run_cli,
                      text_rows, torchrun, wait_for, write_jsonl)

pytestmark = pytest.mark.slow


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
    """Global batch 4 in six ways; fp32 final weights agree to 1e-5."""
    root, base = setup
    steps = ["train.max_steps=4"]
    runs = {
        "1 proc, micro 4 x accum 1": train(root / "a", base, *steps, "train.micro_batch_size=4"),
        "1 proc, micro 1 x accum 4": train(root / "b", base, *steps, "train.micro_batch_size=1", "train.grad_accum=4"),
        "2 procs ZeRO-2, micro 1 x accum 2": train(root / "c", base, *steps, "train.micro_batch_size=1",
                                                   "train.grad_accum=2", launcher=accelerate("zero2_cpu.yaml", 29622)),
        "2 procs ZeRO-3, micro 2 x accum 1": train(root / "d", base, *steps, "train.micro_batch_size=2",
                                                   launcher=accelerate("zero3_cpu.yaml", 29623)),
        "2 procs plain DDP (ddp_cpu), micro 2": train(root / "f", base, *steps, "train.micro_batch_size=2",
                                                      launcher=accelerate("ddp_cpu.yaml", 29625)),
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


def test_sigkill_after_checkpoint_then_resume_gives_the_same_weights(setup):
    root, base = setup
    args = [*base, "train.micro_batch_size=2", "train.max_steps=40", "train.save_every=5", "train.keep_last=2"]
    straight = train(root / "straight", args, launcher=accelerate("zero3_cpu.yaml", 29631))

    out = root / "killed"
    run_args = [f"output_dir={out}", *args, "resume=auto"]
    proc = launch_background(run_args, accelerate("zero3_cpu.yaml", 29632))
    wait_for(lambda: latest_step(out) >= 5)
    kill_group(proc)
    killed_at = latest_step(out)
    assert 5 <= killed_at < 40 and not (out / "final").exists(), "the kill should land mid-run"
    assert len(list((out / "checkpoints" / f"step-{killed_at:06d}" / "pytorch_model").glob("zero_pp_rank_*"))) == 4

    resumed = train(out, args, "resume=auto", launcher=accelerate("zero3_cpu.yaml", 29633))
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6, msg=key)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 40 and len(set(steps)) == 40  # every step logged once after the resume
    kept = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert kept == ["step-000035", "step-000040"]


def test_kill_during_saves_never_leaves_latest_incomplete(setup):
    """Checkpoint every step and SIGKILL at random moments (mostly inside a save): `latest` always
    names a complete checkpoint, and the run still ends with the uninterrupted run's weights."""
    import random

    root, base = setup
    args = [*base, "train.micro_batch_size=4", "train.max_steps=60", "train.save_every=1", "train.keep_last=2"]
    straight = train(root / "straight1", args)
    out = root / "kills"
    rng = random.Random(0)
    for _ in range(3):
        before = latest_step(out)
        proc = launch_background([f"output_dir={out}", *args, "resume=auto"])
        wait_for(lambda: latest_step(out) > before + 2)
        time.sleep(rng.uniform(0.0, 0.3))
        kill_group(proc)
        step = latest_step(out)
        ckpt = out / "checkpoints" / f"step-{step:06d}"
        assert (ckpt / "trainer_state.json").is_file() and (ckpt / "model.safetensors").is_file()
        assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == step
    resumed = train(out, args, "resume=auto")
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6, msg=key)


def test_export_matches_the_trained_model(setup, tiny):
    """ZeRO-3 final/ (gathered live) and `dpo-dist export` of its last sharded checkpoint (consolidated
    offline) load with from_pretrained and give the same logits."""
    root, base = setup
    out = root / "export"
    train(out, base, "train.micro_batch_size=2", "train.max_steps=3", "train.save_every=3",
          launcher=accelerate("zero3_cpu.yaml", 29641))
    result = run_cli("export", str(out / "checkpoints" / "step-000003"), "--output_dir", str(root / "exported"))
    assert result.returncode == 0, result.stderr[-3000:]
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25]])
    final = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    exported = AutoModelForCausalLM.from_pretrained(root / "exported").eval()
    initial = AutoModelForCausalLM.from_pretrained(tiny["policy"]).eval()
    with torch.no_grad():
        a, b, c = (m(ids).logits for m in (final, exported, initial))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert (a - c).abs().max() > 1e-4
    assert (out / "final" / "tokenizer.json").is_file()


@pytest.mark.parametrize("config,port", [("zero2_cpu.yaml", 29651), ("zero3_cpu.yaml", 29652)])
def test_lora_under_zero(setup, tiny, config, port):
    from peft import PeftModel

    root, base = setup
    out = root / f"lora-{config}"
    result = run_cli("train", f"output_dir={out}", *base, "model.lora.r=4", "model.lora.save_merged=true",
                     "train.micro_batch_size=2", "train.max_steps=3", "train.lr=1e-2",
                     launcher=accelerate(config, port))
    assert result.returncode == 0, result.stderr[-4000:]
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["rewards/chosen"]) <= ZERO_REWARD_TOLERANCE and first["pairs"] == 4  # base model = reference
    adapter = load_file(out / "final" / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert max(v.abs().max().item() for k, v in adapter.items() if "lora_B" in k) > 0  # it trained
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["policy"]), out / "final").eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "final" / "merged").eval()
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, merged(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("loss,port", [("[aot, sft]", 29626), ("bco_pair", 29627)])
def test_batch_losses_do_not_depend_on_processes_or_split(setup, tiny, loss, port):
    """aot sorts the step's pairs: computed over the global batch, it gives the same weights for
    one process or two (ZeRO-2) and any micro-batching; so does bco_pair. (A reference other than
    the policy, so that sorting within each micro-batch instead would change the result.)"""
    root, base = setup
    # Responses of equal length, so that log-ratio order is not set by length alone.
    rows = [{**row, "rejected": " " + " ".join(reversed(row["chosen"].split()))} for row in text_rows(30, seed=11)]
    data = write_jsonl(root / "same_lengths.jsonl", rows)
    # lr 1e-4: Adam turns rounding noise in near-zero gradients into steps of ~lr.
    args = [*base, f"data.train={data}", "train.max_steps=3", "train.lr=1e-4", f"loss.type={loss}",
            f"model.reference={tiny['reference']}", f"ref_cache.dir={root / 'cache_other_reference'}",
            "loss.weights=null" if "," not in loss else "loss.weights=[1.0, 0.3]"]
    name = loss.strip("[]").replace(", ", "_")
    whole = train(root / f"{name}-a", args, "train.micro_batch_size=4")
    runs = {
        "1 proc, micro 1 x accum 4": train(root / f"{name}-b", args, "train.micro_batch_size=1", "train.grad_accum=4"),
        "2 procs ZeRO-2, micro 1 x accum 2": train(root / f"{name}-c", args, "train.micro_batch_size=1",
                                                   "train.grad_accum=2", launcher=accelerate("zero2_cpu.yaml", port)),
    }
    for run, weights in runs.items():
        for key in whole:
            torch.testing.assert_close(weights[key], whole[key], rtol=0, atol=1e-5, msg=f"{run}: {key}")
    losses = [[json.loads(line)["loss"] for line in (root / f"{name}-{k}" / "metrics.jsonl").read_text().splitlines()]
              for k in "ac"]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_bco_pair_resumes_exactly(setup):
    root, base = setup
    args = [*base, "loss.type=bco_pair", "train.micro_batch_size=2", "train.max_steps=6", "train.save_every=3"]
    straight = train(root / "bco-straight", args)
    out = root / "bco-resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(root / "bco-straight" / "checkpoints" / "step-000003", out / "checkpoints" / "step-000003")
    (out / "checkpoints" / "latest").write_text("step-000003\n")
    resumed = train(out, args, "resume=auto")
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)
