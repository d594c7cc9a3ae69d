"""Checks a finished `dpo-dist train` run: the numbers a correct run must show. Exit code 1 if not.

    python benchmarks/check_run.py RUN_DIR [--dtype bfloat16] [--same-weights-as OTHER_RUN_DIR]

- step 1's loss is log 2 (the policy starts as the reference: every reward 0), to the dtype's noise;
- every logged loss and gradient norm is finite;
- OUTPUT_DIR/final/ loads with `from_pretrained` (full model or LoRA adapter);
- with --same-weights-as: the final trained weights equal the other run's (a resumed run against an
  uninterrupted one), to the dtype's tolerance.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

# (step-1 loss vs log 2, final weights) absolute tolerances.
TOLERANCES = {"float32": (1e-5, 1e-5), "bfloat16": (2e-2, 2e-2)}


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    final = run / "final"
    name = "adapter_model.safetensors" if (final / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(final / name)


def problems(run: Path, dtype: str, other: Path | None) -> list[str]:
    tol_loss, tol_weights = TOLERANCES[dtype]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [line for line in lines if "loss" in line]
    found = []
    if not train or train[0]["step"] != 1:
        found.append("no metrics line for step 1 (run with train.log_every=1)")
    elif abs(train[0]["loss"] - math.log(2)) > tol_loss:
        found.append(f"step 1 loss {train[0]['loss']:.6f}, not log 2 = {math.log(2):.6f} (±{tol_loss})")
    bad = [line["step"] for line in train if not math.isfinite(line["loss"])
           or (line.get("grad_norm") is not None and not math.isfinite(line["grad_norm"]))]
    if bad:
        found.append(f"non-finite loss or gradient norm at steps {bad}")
    final = run / "final"
    if (final / "adapter_model.safetensors").is_file():
        from peft import AutoPeftModelForCausalLM

        AutoPeftModelForCausalLM.from_pretrained(final)
    else:
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(final)
    if other is not None:
        mine, theirs = final_weights(run), final_weights(other)
        worst = max((mine[k].float() - theirs[k].float()).abs().max().item() for k in theirs)
        if worst > tol_weights:
            found.append(f"final weights differ from {other} by up to {worst:.2e} (tolerance {tol_weights})")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--dtype", choices=tuple(TOLERANCES), default="float32")
    parser.add_argument("--same-weights-as", type=Path)
    args = parser.parse_args()
    found = problems(args.run, args.dtype, args.same_weights_as)
    for problem in found:
        print(f"{args.run}: {problem}")
    if not found:
        print(f"{args.run}: step 1 loss is log 2, all finite, final/ loads"
              + (f", weights equal {args.same_weights_as}" if args.same_weights_as else ""))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
