"""How far bf16 training moves the weights at a DPO learning rate, against fp32: the share of
weights that changed and the cosine between each run's update and the fp32 run's.

    python benchmarks/bf16_updates.py [--lr 1e-5 --steps 16]

The same pairs, order and global batch each: fp32; bf16 autocast over fp32 weights
(`train.mixed_precision=bf16`); bf16 weights with fp32 master copies in the optimizer
(`model.dtype=bfloat16`), exported as loaded (bf16) and with `export.dtype=float32` (the masters,
what the run trains and resumes from); DeepSpeed ZeRO-2 on 2 processes with bf16 over fp32 weights
(its float32 export: DeepSpeed's fp32 masters). bf16 exports are set against the fp32 run's result
rounded to bf16, as far as bf16 can show a change (most DPO-sized updates are below one bf16 ulp).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from common import REPO, make_data, make_model, run_measured, timestamp


def train(tmp: Path, name: str, model: Path, data: Path, lr: float, steps: int, *extra: str) -> Path:
    out = tmp / name
    launch = (["-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / "accelerate" / "zero2_cpu.yaml"),
               "--main_process_port", "29731"] if name == "zero2" else [])
    run_measured([*launch, "-m", "dpo_dist", "train", f"model.policy={model}", f"data.train={data}", f"output_dir={out}",
                  f"ref_cache.dir={tmp / (name + '-cache')}", f"train.lr={lr}", "train.warmup_ratio=0", "train.micro_batch_size=4",
                  f"train.max_steps={steps}", f"train.save_every={steps}", "train.report_to=none", *extra])
    return out


def flat(weights: dict, names: list[str], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.cat([weights[k].to(dtype).float().flatten() for k in names])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=64)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_model(tmp / "model")
        data = make_data(tmp / "data.jsonl", args.pairs, prompt_words=(8, 40), response_words=(4, 30))
        runs = {name: train(tmp, name, model, data, args.lr, args.steps, *extra) for name, extra in (
            ("fp32", ["train.mixed_precision=fp32"]),
            ("autocast", ["train.mixed_precision=bf16"]),
            ("bf16", ["train.mixed_precision=bf16", "model.dtype=bfloat16"]),
            ("bf16 masters", ["train.mixed_precision=bf16", "model.dtype=bfloat16", "export.dtype=float32"]),
            ("zero2", ["train.mixed_precision=bf16", "train.micro_batch_size=2"]))}
        initial = load_file(model / "model.safetensors")
        names = sorted(initial)
        final = {name: load_file(out / "final" / "model.safetensors") for name, out in runs.items()}

    start, start_seen = flat(initial, names), flat(initial, names, torch.bfloat16)
    fp32_update = flat(final["fp32"], names) - start
    fp32_seen = flat(final["fp32"], names, torch.bfloat16) - start_seen
    rows = [  # run, what is measured, its update, the fp32 update it is set against
        ("fp32", "weights", fp32_update, fp32_update),
        ("bf16 autocast, fp32 weights", "weights", flat(final["autocast"], names) - start, fp32_update),
        ("bf16 weights + fp32 masters", "float32 export (export.dtype=float32): the masters",
         flat(final["bf16 masters"], names) - start_seen, fp32_update),
        ("bf16 weights + fp32 masters", "bf16 export (model.dtype, the default)",
         flat(final["bf16"], names) - start_seen, fp32_seen),
        ("DeepSpeed ZeRO-2 x 2, bf16, model.dtype=float32", "float32 export: DeepSpeed's fp32 masters",
         flat(final["zero2"], names) - start, fp32_update),
        ("fp32", "its weights rounded to bf16", fp32_seen, fp32_seen),
    ]
    print(f"\nLlama hidden 256 x 4 layers, {args.pairs} short pairs, lr {args.lr:g}, {args.steps} steps of 4 pairs "
          f"(1 process x micro 4; ZeRO-2: 2 x micro 2), no warm-up; {timestamp()}\n")
    print("| run | measured | weights changed | update cosine vs fp32 (same resolution) |\n|---|---|---:|---:|")
    for run, what, moved, against in rows:
        cosine = torch.nn.functional.cosine_similarity(moved.double(), against.double(), dim=0).item()
        print(f"| {run} | {what} | {100 * (moved != 0).float().mean().item():.1f}% | {cosine:.4f} |")


if __name__ == "__main__":
    sys.exit(main())
