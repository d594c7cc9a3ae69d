"""Peak resident memory of training with the reference cache vs with the reference model resident.

    python benchmarks/ref_cache_memory.py [--hidden 512 --layers 8 --steps 20]

Same model, data, batch and steps in both runs; the cache is built beforehand by its own
`precompute` process (also measured). Prints a table with the ratio cache / resident.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import make_data, make_model, run_measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=256)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_model(tmp / "model", args.hidden, args.layers)
        data = make_data(tmp / "data.jsonl", args.pairs)
        common = ["-m", "dpo_dist", "train", f"model.policy={model}", f"data.train={data}", "data.max_length=512",
                  f"train.max_steps={args.steps}", "train.micro_batch_size=4", "train.save_every=0",
                  "train.log_every=5", f"ref_cache.dir={tmp / 'cache'}", "resume=null"]
        pre = run_measured(["-m", "dpo_dist", "precompute", *common[3:], f"output_dir={tmp / 'pre'}"])
        cached = run_measured([*common, f"output_dir={tmp / 'cached'}", "ref_cache.auto=false"])
        resident = run_measured([*common, f"output_dir={tmp / 'resident'}", "ref_cache.enabled=false"])

    print(f"\nmodel: Llama hidden {args.hidden} x {args.layers} layers; {args.pairs} pairs; {args.steps} steps of 4 pairs\n")
    print("| run | peak RSS (MiB) | wall (s) | peak vs resident |")
    print("|---|---:|---:|---:|")
    for name, r in (("reference resident (no cache)", resident), ("train from cache", cached),
                    ("precompute (reference pass)", pre)):
        print(f"| {name} | {r['peak_mib']:.0f} | {r['seconds']:.1f} | {r['peak_mib'] / resident['peak_mib']:.2f} |")


if __name__ == "__main__":
    main()
