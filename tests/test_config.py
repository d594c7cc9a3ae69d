"""Config: YAML + dotted overrides, typed, unknown keys refused with a suggestion."""

import pytest
import yaml

from conftest import run_cli
from dpo_dist.commands import load_run_config
from dpo_dist.config import describe_keys, load_config, save_config
from dpo_dist.errors import UserError


def test_defaults_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("output_dir: out\nloss: {beta: 0.3}\ntrain: {lr: 1e-6, grad_accum: 2}\n")
    cfg = load_config(path, ["train.lr=2e-6", "model.lora.r=8", "data.train=[a.jsonl, b.jsonl]"])
    assert cfg.loss.beta == 0.3 and cfg.train.grad_accum == 2 and cfg.train.lr == 2e-6
    assert cfg.model.lora.r == 8 and cfg.model.lora.alpha == 32  # the section turned on, with defaults
    assert cfg.data.train == ["a.jsonl", "b.jsonl"]
    assert cfg.loss.type == "sigmoid" and cfg.train.scheduler == "cosine" and cfg.train.warmup_ratio == 0.1


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["model.lora.r=4", "resume=null"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("override,message", [
    ("train.lrr=1", "unknown key 'train.lrr'; did you mean 'train.lr'?"),
    ("trian.lr=1", "unknown key 'trian'; did you mean 'train'?"),
    ("train.lr=fast", "train.lr='fast' has the wrong type"),
    ("train.micro_batch_size=2.5", "train.micro_batch_size=2.5 has the wrong type"),
    ("loss.type=dpo", "loss.type='dpo' is not one of"),
    ("loss.beta=0", "loss.beta=0.0 is out of range; allowed: a finite number > 0"),
    ("train.save_best=eval/los", "train.save_best='eval/los' is not an eval metric; did you mean 'eval/loss'?"),
    ("train.grad_accum=0", "train.grad_accum=0 is out of range; allowed: an integer >= 1"),
    ("lr", "not of the form"),
])
def test_bad_config_is_refused_by_name(override, message):
    with pytest.raises(UserError, match=message.replace("?", r"\?").replace("(", r"\(")):
        load_run_config(None, [override])


def test_every_key_is_documented():
    rows = describe_keys()
    assert all(text for key, _, text in rows), [key for key, _, text in rows if not text]
    keys = {key for key, _, _ in rows}
    assert {"loss.beta", "train.grad_accum", "ref_cache.dir", "model.lora.r", "resume"} <= keys


def test_cli_help_and_config_error_exit_code(tmp_path):
    help_text = run_cli("train", "--help").stdout
    assert "train.micro_batch_size" in help_text and "key=value" in help_text
    for key in ("loss.type", "loss.weights", "loss.label_smoothing", "loss.f_divergence_type",
                "loss.f_alpha_divergence_coef", "loss.use_weighting", "loss.ld_alpha", "loss.discopop_tau"):
        assert f"  {key} (" in help_text, key
    for typo, nearest in (("train.lrr=1", "train.lr"), ("loss.f_divergnce_type=js_divergence", "loss.f_divergence_type"),
                          ("loss.type=sigmod", "sigmoid"), ("train.save_best=eval/los", "eval/loss")):
        result = run_cli("train", typo)
        assert result.returncode == 2 and f"did you mean '{nearest}'" in result.stderr
        assert "Traceback" not in result.stderr


def test_written_config_is_the_resolved_one(tiny, text_file, tmp_path):
    out = tmp_path / "out"
    result = run_cli("precompute", f"output_dir={out}", f"model.policy={tiny['policy']}", f"data.train={text_file}",
                     "loss.beta=0.25")
    assert result.returncode == 0, result.stderr
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["loss"]["beta"] == 0.25 and written["train"]["lr"] == 5e-7


def test_global_batch_size_derives_grad_accum_for_the_process_count():
    from dpo_dist.distributed import derive_grad_accum

    cfg = load_config(None, ["train.global_batch_size=8", "train.micro_batch_size=2"])
    derive_grad_accum(cfg, 2)
    assert cfg.train.grad_accum == 2
    derive_grad_accum(cfg, 4)  # the job came back on more GPUs: same pairs per step
    assert cfg.train.grad_accum == 1
    with pytest.raises(UserError, match=r"train.global_batch_size=8 is not a multiple of .* 2 x 3"):
        derive_grad_accum(cfg, 3)
    with pytest.raises(UserError, match="train.global_batch_size=0 is out of range"):
        load_config(None, ["train.global_batch_size=0"])
