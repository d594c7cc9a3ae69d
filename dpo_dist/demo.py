"""`dpo-dist demo`: the whole pipeline on the CPU in a few minutes, with nothing from a hub.

Builds a tiny Llama and a tokenizer from the bundled arithmetic preference data (correct vs wrong
sums; eval problems never seen in training), then precompute -> evaluate -> train -> evaluate,
prints eval preference accuracy before and after training, and draws the training curves.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from dpo_dist.commands import evaluate_command, load_run_config, precompute_command, train_command
from dpo_dist.report import write_report
from dpo_dist.tiny import save_tiny_model

# A randomly initialised model needs a far larger step size than a pretrained one. β = 0.5 (not
# 0.1) makes the run settle: measured on 2 cores, held-out accuracy 0.946-0.963 whatever CPU kernels
# PyTorch picks (avx512 / avx2 / default, 1 or 2 threads), where β = 0.1 gave 0.594-0.856.
DEMO_SETTINGS = [
    "train.micro_batch_size=32",
    "train.lr=3e-3",
    "train.epochs=30",
    "train.warmup_ratio=0.05",
    "train.log_every=20",
    "train.eval_every=600",
    "train.save_every=0",
    "train.eval_batch_size=64",
    "loss.beta=0.5",
    "data.max_length=32",
]


def demo_data_files() -> dict[str, str]:
    root = resources.files("dpo_dist") / "demo_data"
    return {name: str(root / f"{name}.jsonl") for name in ("train", "eval")}


def build_demo_model(path: Path, train_file: str) -> Path:
    if (path / "config.json").is_file():
        return path
    texts = []
    for line in Path(train_file).read_text().splitlines():
        row = json.loads(line)
        texts.append(row["prompt"] + row["chosen"])
    return save_tiny_model(path, texts, seed=0, hidden_size=128, num_layers=2, num_heads=4)


def _summary(metrics: dict) -> str:
    return (f"reward accuracy {metrics['eval/rewards/accuracies']:.3f}, "
            f"policy prefers chosen {metrics['eval/logps/accuracies']:.3f}, loss {metrics['eval/loss']:.4f}")


def run_demo(output_dir: str, config_path: Path | None, overrides: list[str]) -> dict:
    out = Path(output_dir)
    files = demo_data_files()
    model_dir = build_demo_model(out / "model", files["train"])
    base = [
        f"output_dir={out / 'train'}",
        f"model.policy={model_dir}",
        f"data.train={files['train']}",
        f"data.eval={files['eval']}",
        f"ref_cache.dir={out / 'ref_cache'}",
        "resume=null",
        *DEMO_SETTINGS,
    ]
    cfg = load_run_config(config_path, base + list(overrides))
    precompute_command(cfg)

    before_cfg = load_run_config(config_path, base + list(overrides) + [f"output_dir={out / 'eval_before'}"])
    before = evaluate_command(before_cfg)
    train_command(cfg)
    after_cfg = load_run_config(
        config_path,
        base + list(overrides) + [
            f"output_dir={out / 'eval_after'}",
            f"model.policy={out / 'train' / 'final'}",
            f"model.reference={model_dir}",
        ],
    )
    after = evaluate_command(after_cfg)
    print("\n=== dpo-dist demo: held-out arithmetic preferences ===")
    print(f"before training: {_summary(before)}")
    print(f"after training:  {_summary(after)}")
    print("(reward accuracy is 0 before training: the policy equals the reference, so every reward is 0)")
    picture, _ = write_report([out / "train"])
    print(f"training curves: {picture}")
    return {"before": before, "after": after}
