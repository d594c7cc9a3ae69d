"""Peak memory and speed of bf16 and fp32 training with exact and bucketed widths, in one run.

    python benchmarks/shape_buckets.py [--pairs 256 --batch 8 --steps 32 --multiple 64]

Long prompts (120-480 words, responses 40-160), packing and prefix sharing (the defaults), the
locally built 4-layer Llama of the other benchmarks, one process on the CPU, `--steps` optimizer
steps each. With `train.pad_to_multiple_of=1` every micro-batch has the exact width of its longest
pack, so nearly every step is a new shape; oneDNN keeps kernels per shape, and in bf16 the cache
grows with each. The table gives each run's peak RSS (the child process), its training pairs/s
(metrics.jsonl, the loop alone) and the padding that bucketing adds (token slots of the epoch's
micro-batches against the exact widths, worked out from the same batches).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from common import make_data, make_model, run_measured, timestamp

RUNS = {  # name: (precision overrides, pad_to_multiple_of or None for --multiple)
    "fp32, exact widths": (["train.mixed_precision=fp32"], 1),
    "bf16 autocast, exact widths": (["train.mixed_precision=bf16"], 1),
    "fp32, bucketed": (["train.mixed_precision=fp32"], None),
    "bf16 autocast, bucketed": (["train.mixed_precision=bf16"], None),
    "bf16 weights, bucketed": (["train.mixed_precision=bf16", "model.dtype=bfloat16"], None),
}


def token_slots(model: Path, data: Path, batch: int, steps: int, multiple: int) -> int:
    """rows x width over the micro-batches of the first `steps` steps (what the linear layers compute)."""
    from transformers import AutoTokenizer

    from dpo_dist.config import load_config
    from dpo_dist.data import load_preference_data
    from dpo_dist.data.batching import StepPlan, collate

    cfg = load_config(None, [f"train.pad_to_multiple_of={multiple}"])
    pairs = load_preference_data(str(data), AutoTokenizer.from_pretrained(model), cfg.data.max_length,
                                 cfg.data.truncation).pairs
    plan = StepPlan(len(pairs), batch, seed=cfg.train.seed)
    return sum(collate([pairs[k] for k in plan.step_positions(step)[1]], 0, **cfg.batch_layout).input_ids.numel()
               for step in range(steps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--multiple", type=int, default=64)
    args = parser.parse_args()

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_model(tmp / "model")
        data = make_data(tmp / "data.jsonl", args.pairs, prompt_words=(120, 480), response_words=(40, 160))
        for name, (precision, multiple) in RUNS.items():
            out = tmp / f"run{len(results)}"
            measured = run_measured(["-m", "dpo_dist", "train", f"model.policy={model}", f"data.train={data}",
                                     f"output_dir={out}", f"ref_cache.dir={tmp / (out.name + '-cache')}",
                                     f"train.micro_batch_size={args.batch}", f"train.max_steps={args.steps}",
                                     f"train.log_every={args.steps}", "train.save_every=0", "train.lr=1e-6",
                                     "train.report_to=none", "resume=null",
                                     f"train.pad_to_multiple_of={multiple or args.multiple}", *precision])
            last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
            results[name] = {**measured, "pairs_per_s": last["pairs_per_s"]}
        exact = token_slots(model, data, args.batch, args.steps, 1)
        bucketed = token_slots(model, data, args.batch, args.steps, args.multiple)

    base = results["fp32, exact widths"]
    print(f"\n{args.pairs} long-prompt pairs, micro-batch {args.batch}, {args.steps} steps, 1 process, CPU "
          f"({sys.platform}); train.pad_to_multiple_of={args.multiple} adds {100 * (bucketed / exact - 1):.1f}% token "
          f"slots; {timestamp()}\n")
    print("| run | peak RSS (MiB) | vs fp32 exact | vs fp32 of the same widths | training pairs/s | vs same precision, exact |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        fp32_same = results["fp32, bucketed" if "bucketed" in name else "fp32, exact widths"]
        exact_same = results.get(name.replace("bucketed", "exact widths"))
        speed = f"{r['pairs_per_s'] / exact_same['pairs_per_s']:.2f}x" if exact_same else "—"
        print(f"| {name} | {r['peak_mib']:.0f} | {r['peak_mib'] / base['peak_mib']:.2f}x | "
              f"{r['peak_mib'] / fp32_same['peak_mib']:.2f}x | {r['pairs_per_s']:.1f} | {speed} |")


if __name__ == "__main__":
    main()
