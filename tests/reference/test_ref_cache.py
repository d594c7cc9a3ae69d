"""The reference cache: right numbers, process-count independent, refused when stale, resumable."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import REPO, ZERO_REWARD_TOLERANCE, accelerate, run_cli, text_rows, write_jsonl
from dpo_dist.config import load_config
from dpo_dist.data import load_preference_data
from dpo_dist.errors import UserError
from dpo_dist.precision import forward_dtypes, resolve_precision
from dpo_dist.reference.cache import cache_status, fingerprint_parts, load_cache
from oracle import naive_logp

TWO_PROCS = accelerate("ddp_cpu.yaml", 29611)


def cache_args(tiny, data_file, out, *extra):
    return [f"output_dir={out}", f"model.policy={tiny['policy']}", f"model.reference={tiny['reference']}",
            f"data.train={data_file}", *extra]


def read_cache(cache_dir):
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    shards = {s["file"]: load_file(cache_dir / s["file"]) for s in manifest["shards"]}
    return manifest, shards


@pytest.fixture(scope="module")
def built(tiny, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache1")
    result = run_cli("precompute", *cache_args(tiny, text_file, out, "ref_cache.shard_size=5"))
    assert result.returncode == 0, result.stderr
    return out / "ref_cache"


def test_cache_layout_and_values_match_plain_forward(tiny, text_file, built):
    manifest, shards = read_cache(built)
    assert manifest["complete"] and manifest["format_version"] == 2 and manifest["num_examples"] == {"train": 12}
    assert set(manifest["fingerprint_parts"]) >= {"reference weights", "tokenizer", "train data files",
                                                  "preprocessing settings"}
    tok = AutoTokenizer.from_pretrained(tiny["policy"])
    pairs = load_preference_data(str(text_file), tok, 1024, "keep_end").pairs
    ref = AutoModelForCausalLM.from_pretrained(tiny["reference"]).eval()
    rows = {k: torch.cat([s[k] for s in shards.values()]) for k in next(iter(shards.values()))}
    assert rows["index"].tolist() == list(range(12))
    assert rows["chosen_logps"].dtype == torch.float32 and rows["chosen_tokens"].dtype == torch.int64
    for i, pair in enumerate(pairs):
        assert rows["chosen_logps"][i].item() == pytest.approx(naive_logp(ref, pair.chosen), rel=1e-5)
        assert rows["rejected_logps"][i].item() == pytest.approx(naive_logp(ref, pair.rejected), rel=1e-5)
        assert rows["chosen_tokens"][i] == pair.chosen.response_tokens
        shared = min(pair.chosen.response_tokens, pair.rejected.response_tokens)  # LD-DPO's shared length
        assert rows["chosen_shared_logps"][i].item() == pytest.approx(naive_logp(ref, pair.chosen, shared), rel=1e-5)
        assert rows["rejected_shared_logps"][i].item() == pytest.approx(naive_logp(ref, pair.rejected, shared), rel=1e-5)


@pytest.mark.slow
def test_cache_matches_trl_precompute(tiny, text_file, built, tmp_path):
    from datasets import load_dataset
    from trl import DPOConfig, DPOTrainer

    dataset = load_dataset("json", data_files=str(text_file), split="train")
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny["policy"]),
        ref_model=AutoModelForCausalLM.from_pretrained(tiny["reference"]),
        args=DPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], precompute_ref_log_probs=True,
                       precompute_ref_batch_size=4, max_length=None),
        train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(tiny["policy"]),
    )
    _, shards = read_cache(built)
    ours = torch.cat([s["chosen_logps"] for s in shards.values()]), torch.cat([s["rejected_logps"] for s in shards.values()])
    theirs = (torch.tensor(trainer.train_dataset["ref_chosen_logps"]),
              torch.tensor(trainer.train_dataset["ref_rejected_logps"]))
    for mine, trl in zip(ours, theirs):
        torch.testing.assert_close(mine, trl.float(), rtol=2e-4, atol=0)


@pytest.mark.slow
def test_two_processes_build_the_same_cache(tiny, text_file, built, tmp_path):
    result = run_cli("precompute", *cache_args(tiny, text_file, tmp_path, "ref_cache.shard_size=5"),
                     launcher=TWO_PROCS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[rank 1] reference pass: 1 shard(s) to compute" in result.stdout + result.stderr
    m1, one = read_cache(built)
    m2, two = read_cache(tmp_path / "ref_cache")
    assert m1 == m2 and one.keys() == two.keys()
    for name in one:
        for key in one[name]:
            assert torch.equal(one[name][key], two[name][key]), (name, key)


def test_flex_attention_reference_pass_equals_sdpa(tiny, text_file, built, tmp_path):
    """The reference pass through FlexAttention (compiled, shared prompts under a block mask) writes
    the sdpa cache's numbers; training with it on the CPU is refused in one line."""
    flex = [*cache_args(tiny, text_file, tmp_path, "ref_cache.shard_size=5"), "model.attn_implementation=flex_attention"]
    result = run_cli("precompute", *flex)
    assert result.returncode == 0, result.stderr[-3000:]
    _, sdpa = read_cache(built)
    _, compiled = read_cache(tmp_path / "ref_cache")
    for name in sdpa:
        for key in ("chosen_logps", "rejected_logps"):
            torch.testing.assert_close(compiled[name][key], sdpa[name][key], rtol=1e-5, atol=1e-5)
    result = run_cli("train", *flex)
    assert result.returncode == 2 and "flex_attention cannot train on the CPU" in result.stderr
    assert "Traceback" not in result.stderr


def _splits(cfg):
    tok = AutoTokenizer.from_pretrained(cfg.model.policy)
    return {"train": load_preference_data(cfg.data.train, tok, cfg.data.max_length, cfg.data.truncation)}, tok


def status(cfg):
    """The cache's status for a one-process run of `cfg` without DeepSpeed."""
    forward = forward_dtypes(cfg, resolve_precision(cfg), deepspeed=False)
    return cache_status(cfg, fingerprint_parts(cfg, *_splits(cfg), forward))


def test_stale_cache_is_refused_with_the_reason(tiny, text_file, built, tmp_path):
    base = [f"model.policy={tiny['policy']}", f"model.reference={tiny['reference']}", f"data.train={text_file}",
            f"ref_cache.dir={built}", "ref_cache.shard_size=5"]
    cfg = load_config(None, base)
    assert status(cfg) == "complete"

    changed_data = write_jsonl(tmp_path / "more.jsonl", text_rows(13))
    cfg = load_config(None, base + [f"data.train={changed_data}"])
    with pytest.raises(UserError, match="different train data files.*ref_cache.overwrite=true"):
        status(cfg)

    cfg = load_config(None, base + ["data.max_length=16"])
    with pytest.raises(UserError, match="different preprocessing settings"):
        status(cfg)

    for precision in ("train.mixed_precision=bf16", "model.dtype=bfloat16"):  # a bf16 forward's numbers differ
        with pytest.raises(UserError, match="different forward precision"):
            status(load_config(None, base + [precision]))

    other_tok = tmp_path / "other_tok"
    shutil.copytree(tiny["policy"], other_tok)
    tok_cfg = json.loads((other_tok / "tokenizer_config.json").read_text())
    tok_cfg["eos_token"] = "<unk>"  # a different EOS changes every text row's tokens
    (other_tok / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    cfg = load_config(None, base + [f"model.policy={other_tok}"])
    with pytest.raises(UserError, match="different tokenizer"):
        status(cfg)

    other_ref = tmp_path / "other_ref"
    shutil.copytree(tiny["reference"], other_ref)
    model = AutoModelForCausalLM.from_pretrained(other_ref)
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1e-3
    model.save_pretrained(other_ref)
    cfg = load_config(None, base + [f"model.reference={other_ref}"])
    with pytest.raises(UserError, match="different reference weights"):
        status(cfg)


def test_truncated_shard_is_refused_by_name(tiny, text_file, built, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(built, cache)
    shard = cache / "train-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    cfg = load_config(None, [f"model.policy={tiny['policy']}", f"model.reference={tiny['reference']}",
                             f"data.train={text_file}", f"ref_cache.dir={cache}", "ref_cache.shard_size=5"])
    with pytest.raises(UserError, match="train-00001.safetensors is unreadable"):
        load_cache(cfg, _splits(cfg)[0])
    result = run_cli("train", *cache_args(tiny, text_file, tmp_path / "out", f"ref_cache.dir={cache}",
                                          "ref_cache.shard_size=5", "train.max_steps=1"))
    assert result.returncode == 2 and "train-00001.safetensors is unreadable" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_sigkill_mid_precompute_then_rerun_completes_identically(tiny, tmp_path):
    data = write_jsonl(tmp_path / "big.jsonl", text_rows(600, seed=5))
    args = cache_args(tiny, data, tmp_path / "killed", "ref_cache.shard_size=20", "train.eval_batch_size=1")
    cache = tmp_path / "killed" / "ref_cache"
    proc = subprocess.Popen([sys.executable, "-m", "dpo_dist", "precompute", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    deadline = time.time() + 120
    while time.time() < deadline and len(list(cache.glob("train-*.safetensors"))) < 3:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(cache.glob("train-*.safetensors")))
    assert 3 <= done_before < 30, "the kill should land mid-pass"
    assert not json.loads((cache / "manifest.json").read_text())["complete"]

    result = run_cli("precompute", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{30 - done_before} shard(s) to compute, {done_before} already complete" in result.stdout
    straight = run_cli("precompute", *cache_args(tiny, data, tmp_path / "straight", "ref_cache.shard_size=20",
                                                 "train.eval_batch_size=1"))
    assert straight.returncode == 0
    m1, resumed = read_cache(cache)
    m2, clean = read_cache(tmp_path / "straight" / "ref_cache")
    assert m1 == m2 and m1["complete"]
    for name in clean:
        for key in clean[name]:
            assert torch.equal(resumed[name][key], clean[name][key])
    assert not list(cache.glob(".*tmp*"))


def step0_metrics(out):
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])


@pytest.mark.slow
def test_step0_from_cache_equals_resident_reference(tiny, text_file, tmp_path):
    lines = {}
    for mode in ("true", "false"):
        out = tmp_path / mode
        result = run_cli("train", *cache_args(tiny, text_file, out, f"ref_cache.enabled={mode}", "train.max_steps=1",
                                              "train.log_every=1", "train.micro_batch_size=12", "loss.beta=0.3"))
        assert result.returncode == 0, result.stderr[-3000:]
        lines[mode] = step0_metrics(out)
    assert (tmp_path / "true" / "ref_cache" / "manifest.json").is_file()
    assert not (tmp_path / "false" / "ref_cache").exists()
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected", "grad_norm"):
        # The cache was scored in batches of 8, the resident reference in one of 12: float32
        # sums of ~-90 then differ in the 7th digit, which is all the slack allowed here.
        assert lines["true"][key] == pytest.approx(lines["false"][key], rel=1e-6, abs=1e-5), key
    assert lines["true"]["rewards/chosen"] != 0  # policy A and reference B differ


def test_cached_training_never_builds_a_reference(tiny, text_file, built, tmp_path, monkeypatch):
    """In-process: every from_pretrained call is recorded; the reference folder must never be loaded."""
    import transformers

    from dpo_dist.model import loading
    from dpo_dist.training.trainer import Trainer

    loaded = []
    original = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def recording(cls, path, *args, **kwargs):
        loaded.append(str(path))
        return original(cls, path, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(recording))
    monkeypatch.setattr(loading, "load_reference", lambda cfg: pytest.fail("reference model built"))
    cfg = load_config(None, cache_args(tiny, text_file, tmp_path, f"ref_cache.dir={built}", "ref_cache.shard_size=5",
                                       "ref_cache.auto=false", "train.max_steps=2", "resume=null"))
    trainer = Trainer(cfg)
    trainer.train()
    trainer.close()
    assert loaded == [str(tiny["policy"])]


def test_missing_cache_without_auto_prints_the_precompute_command(tiny, text_file, tmp_path):
    result = run_cli("train", *cache_args(tiny, text_file, tmp_path, "ref_cache.auto=false"))
    assert result.returncode == 2
    assert "dpo-dist precompute --config" in result.stderr and "ref_cache.auto=false" in result.stderr


@pytest.mark.slow
def test_lora_reference_is_the_base_model(tiny, text_file, tmp_path):
    """With LoRA and no separate reference, the cache holds the base model's numbers, so the freshly
    initialised adapter (B = 0) starts with every reward exactly 0."""
    out = tmp_path / "lora"
    result = run_cli("train", f"output_dir={out}", f"model.policy={tiny['policy']}", f"data.train={text_file}",
                     "model.lora.r=4", "model.lora.target_modules=[q_proj, v_proj]", "train.max_steps=2",
                     "train.log_every=1", "train.lr=1e-2", "train.warmup_ratio=0")
    assert result.returncode == 0, result.stderr[-3000:]
    first = step0_metrics(out)
    assert abs(first["rewards/chosen"]) <= ZERO_REWARD_TOLERANCE and abs(first["rewards/rejected"]) <= ZERO_REWARD_TOLERANCE
    assert first["loss"] == pytest.approx(0.693147, abs=1e-6 + ZERO_REWARD_TOLERANCE)
    assert (out / "final" / "adapter_model.safetensors").is_file()
