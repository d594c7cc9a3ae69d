"""One long preference pair, its sequence whole on one process or cut across 2 (Ulysses,
distributed.sequence_parallel=2): the largest rank's peak memory while training, and the longest
pair that trains within a memory budget.

    python benchmarks/long_sequences.py [--tokens 14000 --hidden 256 --layers 4 --budget-mib 2500]

Both runs use the same DeepSpeed JSON (ds_configs/zero3_cpu.json; 1 process, or 2 under `accelerate
launch`), packing with the prompt shared by both responses (one row of prompt + chosen + rejected),
reference log-probs from a cache built beforehand, 2 optimizer steps. Peak RSS is that of the largest
process, with glibc's mmap threshold fixed at 128 KiB (`LIVE_MEMORY`) for both: by default glibc
raises it as large buffers are freed, and later ones of that size then stay in its heap after they
are freed, so RSS would count freed activations (PyTorch has no CPU allocator of its own to report
live bytes, as `torch.cuda.max_memory_allocated` does on a GPU). The budget search doubles the pair
until a run passes the budget, then halves the step.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

from common import REPO, WORDS, make_model, run_measured, timestamp

LIVE_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}  # freed tensors leave RSS (see above)


def make_pair(path: Path, tokens: int, seed: int = 0) -> Path:
    """A pair of about `tokens` tokens: a prompt of half, two responses of a quarter each."""
    rng = random.Random(seed)

    def text(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    path.write_text(json.dumps({"prompt": text(tokens // 2), "chosen": " " + text(tokens // 4),
                                "rejected": " " + text(tokens // 4)}) + "\n")
    return path


def train_peak(tmp: Path, model: Path, tokens: int, cut: int) -> float:
    """Peak MiB of the largest process training one pair of `tokens` tokens, sequences cut across `cut`."""
    run = tmp / f"{tokens}-{cut}"
    run.mkdir()
    data = make_pair(run / "pair.jsonl", tokens)
    settings = [f"model.policy={model}", f"data.train={data}", f"data.max_length={tokens + 64}",
                "train.packing=true", "train.prefix_sharing=true", "train.micro_batch_size=1", "train.max_steps=2",
                "train.save_every=0", "train.report_to=none", f"ref_cache.dir={run / 'cache'}",
                f"distributed.deepspeed={REPO / 'ds_configs' / 'zero3_cpu.json'}"]
    run_measured(["-m", "dpo_dist", "precompute", *settings, f"output_dir={run / 'pre'}"], LIVE_MEMORY)  # the cache
    launch = []
    if cut > 1:
        launch = ["-m", "accelerate.commands.launch", "--config_file",
                  str(REPO / "launch" / "accelerate" / "zero3_cpu.yaml"), "--main_process_port", "29795"]
    return run_measured([*launch, "-m", "dpo_dist", "train", *settings, f"output_dir={run / 'train'}",
                         f"distributed.sequence_parallel={cut}"], LIVE_MEMORY)["peak_mib"]


def longest_within(tmp: Path, model: Path, cut: int, budget: float, start: int) -> int:
    """The longest pair (to ~1k tokens) whose training peaks within `budget` MiB."""
    fits, tokens = 0, start
    while train_peak(tmp, model, tokens, cut) <= budget:
        fits, tokens = tokens, tokens * 2
    step = (tokens - fits) // 2
    while step >= 1024:
        if train_peak(tmp, model, fits + step, cut) <= budget:
            fits += step
        step //= 2
    return fits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=14000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--budget-mib", type=float, default=2500)
    parser.add_argument("--skip-search", action="store_true", help="only the fixed-length comparison")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_model(tmp / "model", args.hidden, args.layers)
        peaks = {cut: train_peak(tmp, model, args.tokens, cut) for cut in (1, 2)}
        longest = {} if args.skip_search else {
            cut: longest_within(tmp, model, cut, args.budget_mib, 4096) for cut in (1, 2)}

    print(f"\nmodel: Llama hidden {args.hidden} x {args.layers} layers, 8 heads; one pair of ~{args.tokens} tokens "
          f"(packed, prompt shared); ds_configs/zero3_cpu.json; glibc mmap threshold 128 KiB; {timestamp()}\n")
    print("| sequence | peak RSS, largest rank (MiB) | vs whole |\n|---|---:|---:|")
    for cut, label in ((1, "whole on 1 process"), (2, "cut across 2 processes")):
        print(f"| {label} | {peaks[cut]:.0f} | {peaks[cut] / peaks[1]:.2f} |")
    if longest:
        print(f"\n| budget {args.budget_mib:.0f} MiB per rank | longest pair that trains (tokens) |\n|---|---:|")
        for cut, label in ((1, "whole on 1 process"), (2, "cut across 2 processes")):
            print(f"| {label} | ~{longest[cut]} |")


if __name__ == "__main__":
    sys.exit(main())
