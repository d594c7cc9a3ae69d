"""Training end to end on the bundled demo data: the loss falls, held-out accuracy rises, metrics complete."""

import json
import math

import torch

import pytest

from conftest import run_cli
from dpo_dist.demo import DEMO_SETTINGS, build_demo_model, demo_data_files

CONTRACT_KEYS = {"step", "epoch", "loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
                 "rewards/accuracies", "logps/chosen", "logps/rejected", "lr", "grad_norm", "pairs_per_s",
                 "tokens_per_s"}


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    return build_demo_model(tmp_path_factory.mktemp("demo") / "model", demo_data_files()["train"])


def demo_args(model, out, *extra):
    files = demo_data_files()
    return [f"output_dir={out}", f"model.policy={model}", f"data.train={files['train']}",
            f"data.eval={files['eval']}", *DEMO_SETTINGS, *extra]


def read_metrics(out):
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if "loss" in m], [m for m in lines if "eval/loss" in m]


@pytest.mark.slow
def test_short_training_learns_and_logs_every_metric(demo_model, tmp_path):
    out = tmp_path / "run"
    # 6 of the demo's 30 epochs: at β = 0.1 the loss already falls; the demo's β = 0.5 is still on its plateau.
    result = run_cli("train", *demo_args(demo_model, out, "train.epochs=6", "train.eval_every=60",
                                         "train.log_every=1", "loss.beta=0.1"))
    assert result.returncode == 0, result.stderr[-3000:]
    train_lines, eval_lines = read_metrics(out)
    assert CONTRACT_KEYS <= set(train_lines[0]), CONTRACT_KEYS - set(train_lines[0])
    assert {f"eval/{k}" for k in CONTRACT_KEYS - {"step", "epoch", "lr", "grad_norm", "pairs_per_s",
                                                  "tokens_per_s"}} <= set(eval_lines[0])
    first = train_lines[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)  # step 1: policy == reference
    assert sum(m["loss"] for m in train_lines[-20:]) / 20 < first["loss"] - 0.05
    assert eval_lines[-1]["eval/rewards/accuracies"] > eval_lines[0]["eval/rewards/accuracies"] + 0.05
    assert eval_lines[-1]["eval/rewards/accuracies"] > 0.55
    assert [m["step"] for m in train_lines] == sorted(m["step"] for m in train_lines)
    assert (out / "final" / "model.safetensors").is_file() and (out / "tensorboard").is_dir()
    assert (out / "checkpoints" / "latest").is_file()


@pytest.mark.slow
def test_same_seed_same_run(demo_model, tmp_path):
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        result = run_cli("train", *demo_args(demo_model, out, "train.max_steps=6", "train.log_every=2",
                                             f"ref_cache.dir={tmp_path / 'cache'}", "data.eval=null"))
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append([{k: v for k, v in m.items() if not k.endswith("_per_s")} for m in read_metrics(out)[0]])
    assert runs[0] == runs[1]


@pytest.mark.slow
def test_packed_and_shared_prefix_training_match_padded(demo_model, tmp_path):
    runs = {}
    layouts = {"padded": ["train.packing=false"], "packed": ["train.packing=true"],
               "shared": ["train.packing=true", "train.prefix_sharing=true"]}
    for name, layout in layouts.items():
        out = tmp_path / name
        result = run_cli("train", *demo_args(demo_model, out, "train.max_steps=5", "train.log_every=1", *layout,
                                             f"ref_cache.dir={tmp_path / 'cache'}", "data.eval=null",
                                             "train.micro_batch_size=16"))
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = read_metrics(out)[0]
    for name in ("packed", "shared"):
        for padded, other in zip(runs["padded"], runs[name], strict=True):
            for key in ("loss", "rewards/chosen", "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm"):
                assert other[key] == pytest.approx(padded[key], rel=1e-4, abs=1e-5), (name, key)


@pytest.mark.slow
def test_save_best_keeps_the_best_eval_step(demo_model, tmp_path):
    """Held-out pairs with chosen and rejected swapped: training makes their loss rise after the
    first evaluation, so best/ must hold that step's weights, not the last ones."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from conftest import write_jsonl

    rows = [json.loads(line) for line in open(demo_data_files()["train"])][:64]
    swapped = write_jsonl(tmp_path / "swapped.jsonl", [{**r, "chosen": r["rejected"], "rejected": r["chosen"]}
                                                       for r in rows])
    out = tmp_path / "run"
    result = run_cli("train", *demo_args(demo_model, out, f"data.eval={swapped}", "train.max_steps=48",
                                         "train.eval_every=8", "train.save_every=8", "train.keep_last=6",
                                         "train.save_best=eval/loss"))
    assert result.returncode == 0, result.stderr[-3000:]
    _, eval_lines = read_metrics(out)
    best_line = min(eval_lines, key=lambda m: m["eval/loss"])
    assert best_line["step"] < eval_lines[-1]["step"] and eval_lines[-1]["eval/loss"] > best_line["eval/loss"]
    info = json.loads((out / "best" / "best.json").read_text())
    assert info == {"step": best_line["step"], "metric": "eval/loss", "value": best_line["eval/loss"]}
    assert f"best model (eval/loss {info['value']:.4f} at step {info['step']})" in result.stdout
    exported = run_cli("export", str(out / "checkpoints" / f"step-{info['step']:06d}"), "--output_dir",
                       str(tmp_path / "at_best"))
    assert exported.returncode == 0, exported.stderr[-2000:]
    best, at_best = load_file(out / "best" / "model.safetensors"), load_file(tmp_path / "at_best" / "model.safetensors")
    final = load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(best[k], at_best[k]) for k in best)
    assert any(not torch.equal(best[k], final[k]) for k in best)
    AutoModelForCausalLM.from_pretrained(out / "best")
