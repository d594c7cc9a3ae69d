"""Static checks of launch/accelerate/*.yaml and ds_configs/*.json (the CPU variants also run for
real in test_distributed.py, test_ref_cache.py and test_slurm.py)."""

import json

import pytest
import yaml

from conftest import REPO

CONFIGS = sorted((REPO / "launch" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_points_at_an_existing_deepspeed_json(path):
    cfg = yaml.safe_load(path.read_text())
    assert cfg["distributed_type"] in ("DEEPSPEED", "MULTI_GPU", "FSDP")
    if cfg["distributed_type"] == "FSDP":  # dpo_dist runs FSDP2 only, and shards by decoder layer
        assert cfg["fsdp_config"]["fsdp_version"] == 2
        assert cfg["fsdp_config"]["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    if cfg["distributed_type"] == "DEEPSPEED":
        ds_path = REPO / cfg["deepspeed_config"]["deepspeed_config_file"]
        ds = json.loads(ds_path.read_text())
        stage = ds["zero_optimization"]["stage"]
        assert cfg["deepspeed_config"]["zero3_init_flag"] == (stage == 3)  # ZeRO-3 shards from load time
        # accelerate refuses these beside a DeepSpeed JSON; they come from our config instead.
        assert not {"mixed_precision", "gradient_accumulation_steps", "gradient_clipping"} & set(cfg)


@pytest.mark.parametrize("path", sorted((REPO / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_deepspeed_json_leaves_batch_settings_to_dpo_dist(path):
    ds = json.loads(path.read_text())
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert ds[key] == "auto", key
    # One source of truth for precision: train.mixed_precision fills these; gradients accumulate in fp32.
    assert ds["bf16"]["enabled"] == ds["fp16"]["enabled"] == "auto"
    assert ds["data_types"]["grad_accum_dtype"] == "fp32"
    if "cpu" in path.stem:  # CPU variants: a plain torch optimizer
        assert ds["zero_force_ds_cpu_optimizer"] is False


def test_every_gpu_config_has_a_cpu_variant_that_tests_run():
    names = {p.stem for p in CONFIGS}
    for gpu in ("zero2", "zero3", "fsdp2"):
        assert gpu in names and f"{gpu}_cpu" in names
