"""The ZeRO-3 reference: slices read from safetensors files; under `launch/accelerate/zero3_cpu.yaml`
(2 CPU processes, gloo) the reference is partitioned on every rank, for `precompute` and for a
resident reference, and gives the 1-process numbers."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import REPO, probe_launch, run_cli, text_rows, write_jsonl
from dpo_dist.model.weight_files import NotSliceable, checkpoint_index
from dpo_dist.reference.partitioned import load_partitions


@pytest.mark.parametrize("dtype,shard_size", [(torch.float32, None), (torch.bfloat16, "200KB")])
def test_flat_slices_read_from_disk_equal_the_weights(tiny, tmp_path, dtype, shard_size):
    """One file and an index of shards, fp32 and bf16: every flat range equals the tensor's."""
    model = AutoModelForCausalLM.from_pretrained(tiny["reference"], dtype=dtype)
    model.save_pretrained(tmp_path, **({"max_shard_size": shard_size} if shard_size else {}))
    assert (tmp_path / "model.safetensors.index.json").is_file() == bool(shard_size)
    stored = checkpoint_index(tmp_path)
    weights = model.state_dict()
    assert set(stored) == set(weights)
    for name, tensor in weights.items():
        flat = tensor.reshape(-1)
        start, count = flat.numel() // 3, flat.numel() // 2
        assert torch.equal(stored[name].read_flat(start, count), flat[start:start + count]), name
        assert stored[name].read_flat(flat.numel(), 0).numel() == 0


def test_each_rank_gets_its_zero3_partition(tiny):
    """DeepSpeed's layout, emulated: rank r holds flat elements [r*P, (r+1)*P), zero-padded."""
    stored = checkpoint_index(tiny["reference"])
    world = 3  # sizes not divisible by 3 exercise the padding
    parts = {}
    for rank in range(world):
        model = AutoModelForCausalLM.from_pretrained(tiny["policy"])  # other weights: all overwritten
        for p in model.parameters():
            p.ds_numel = p.numel()
            p.ds_tensor = torch.full((math.ceil(p.numel() / world),), float("nan"))
        load_partitions(model, stored, rank)
        parts[rank] = {n: p.ds_tensor for n, p in model.named_parameters()}
    reference = AutoModelForCausalLM.from_pretrained(tiny["reference"]).state_dict()
    for name, tensor in reference.items():
        joined = torch.cat([parts[r][name] for r in range(world)])
        assert torch.equal(joined[: tensor.numel()], tensor.reshape(-1)), name
        assert not joined[tensor.numel():].isnan().any()  # padding written, not left undefined


def test_reference_budget_is_the_largest_layer(tiny, tmp_path):
    """The frozen ZeRO-3 reference keeps about two layers gathered; a layer's size comes from the
    safetensors headers (no weights read), and is None where there are none."""
    from dpo_dist.reference.engine import largest_layer_params

    model = AutoModelForCausalLM.from_pretrained(tiny["policy"])
    layer = max(sum(p.numel() for p in block.parameters()) for block in model.model.layers)
    assert largest_layer_params(tiny["policy"]) == layer
    (tmp_path / "model.bin").write_bytes(b"")
    assert largest_layer_params(tmp_path) is None


def test_unsliceable_checkpoints_are_recognised(tiny, tmp_path):
    with pytest.raises(NotSliceable, match="no safetensors"):
        checkpoint_index(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tiny["policy"])
    for p in model.parameters():
        p.ds_numel, p.ds_tensor = p.numel(), torch.empty(p.numel())
    stored = checkpoint_index(tiny["reference"])
    del stored["lm_head.weight"]
    with pytest.raises(NotSliceable, match="lm_head.weight"):
        load_partitions(model, stored, 0)


# --- 2 processes, ZeRO-3 -------------------------------------------------------------------------


def assert_partitioned(records, kind: str):
    loads = [r for r in records if r["kind"] == "reference"]
    assert sorted(r["rank"] for r in loads) == [0, 1], loads
    for r in loads:
        assert r["engine"] == "DeepSpeedEngine" and r["unpartitioned"] == 0 and r["requires_grad"] == 0
        assert r["held"] == pytest.approx(r["full"] / 2, rel=1e-3), kind
        assert r["fractions"] and all(f == pytest.approx(0.5, abs=1e-3) for f in r["fractions"]), kind


@pytest.fixture(scope="module")
def zero3_setup(tiny, tmp_path_factory):
    """Train 12 pairs and eval 7, shards of 5 and batches of 2: the two ranks get 3 and 2 shards,
    9 and 4 forwards, so rank 1 must run filler forwards or the pass would hang."""
    root = tmp_path_factory.mktemp("zero3")
    base = [f"model.policy={tiny['policy']}", f"model.reference={tiny['reference']}",
            f"data.train={write_jsonl(root / 'train.jsonl', text_rows(12, seed=21))}",
            f"data.eval={write_jsonl(root / 'eval.jsonl', text_rows(7, seed=22))}",
            "ref_cache.shard_size=5", "train.eval_batch_size=2", "resume=null"]
    result = run_cli("precompute", f"output_dir={root / 'one'}", *base)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, base


def read_cache(cache_dir):
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    return manifest, {s["file"]: load_file(cache_dir / s["file"]) for s in manifest["shards"]}


@pytest.mark.slow
def test_zero3_precompute_is_partitioned_and_equals_one_process(zero3_setup):
    root, base = zero3_setup
    records = probe_launch(["precompute", f"output_dir={root / 'z3'}", *base], 29661,
                           env={"DPO_DIST_CACHE_HOME": str(root / "fresh-digests")})  # nothing remembered yet
    assert_partitioned(records, "precompute")
    hashes = {r["rank"]: r["files_hashed"] for r in records if r["kind"] == "hashes"}
    assert hashes[0] > 0 and hashes[1] == 0  # the fingerprint is computed on one rank and broadcast
    m1, one = read_cache(root / "one" / "ref_cache")
    m2, two = read_cache(root / "z3" / "ref_cache")
    assert m1 == m2 and len(one) == 5
    for name in one:
        for key in one[name]:
            assert torch.equal(one[name][key], two[name][key]), (name, key)  # bit-identical


@pytest.mark.slow
def test_zero3_resident_reference_is_partitioned_and_matches_the_cache(zero3_setup):
    """ZeRO-3 training twice: with a resident partitioned reference, and building its own cache
    first (`train` with no cache), whose reference must be gone before the policy is built."""
    root, base = zero3_setup
    steps = ["train.max_steps=2", "train.log_every=1", "train.micro_batch_size=3", "train.eval_every=1"]
    resident = probe_launch(["train", f"output_dir={root / 'resident'}", "ref_cache.enabled=false", *base, *steps],
                            29662)
    assert_partitioned(resident, "resident")
    assert all(r["references_alive"] == 1 for r in resident if r["kind"] == "policy")  # by design
    cached = probe_launch(["train", f"output_dir={root / 'cached'}", *base, *steps], 29663)
    assert_partitioned(cached, "reference pass inside train")
    policy_built = [r for r in cached if r["kind"] == "policy"]
    assert len(policy_built) == 2 and all(r["references_alive"] == 0 for r in policy_built)

    lines = {run: [json.loads(line) for line in (root / run / "metrics.jsonl").read_text().splitlines()]
             for run in ("resident", "cached")}
    assert [line["step"] for line in lines["resident"]] == [1, 1, 2, 2]  # train and eval lines
    for mine, theirs in zip(lines["resident"], lines["cached"]):
        for key, value in mine.items():
            if "per_s" not in key:
                assert value == pytest.approx(theirs[key], rel=1e-6, abs=1e-6), key
    assert lines["resident"][0]["rewards/chosen"] != 0  # policy and reference differ


@pytest.mark.slow
def test_zero3_with_parameter_offload_under_torchrun(zero3_setup):
    """`offload_param: cpu` in the run's DeepSpeed JSON is honoured by the reference (torchrun path)."""
    root, base = zero3_setup
    ds = json.loads((REPO / "ds_configs" / "zero3_cpu.json").read_text())
    ds["zero_optimization"]["offload_param"] = {"device": "cpu"}
    (root / "offload.json").write_text(json.dumps(ds))
    records = probe_launch(["precompute", f"output_dir={root / 'offload'}", *base,
                            f"distributed.deepspeed={root / 'offload.json'}"], 29664, launcher="torchrun")
    assert_partitioned(records, "offload_param")
    _, one = read_cache(root / "one" / "ref_cache")
    _, offloaded = read_cache(root / "offload" / "ref_cache")
    assert all(torch.equal(one[name][key], offloaded[name][key]) for name in one for key in one[name])
