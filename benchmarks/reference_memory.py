"""Peak memory per rank of the reference pass: whole on one process vs partitioned by ZeRO-3 on two,
and the time to fingerprint the reference weights on a first and a second run.

    python benchmarks/reference_memory.py [--hidden 1024 --layers 32 --pairs 16] [--deepspeed JSON]

A weight-dominated model (fp32, ~300M parameters at the defaults; short pairs) so that the memory
is the weights'. Each pass is its own `dpo-dist precompute` (2 processes: `accelerate launch
--config_file launch/accelerate/zero3_cpu.yaml`); peak RSS is that of the largest process (rank).
The two caches must be equal, or the benchmark stops. DeepSpeed's CPU shared-memory op is built
first: the first ZeRO launch of an environment compiles it (~20 s), and the compiler's memory
would count as a rank's peak. --deepspeed: the 2-process run's DeepSpeed
JSON instead of ds_configs/zero3_cpu.json, e.g. benchmarks/zero3_hf_docs.json (the ZeRO-3 example of
the Hugging Face DeepSpeed docs, without offload: what users copy, with training-time budgets of
gathered parameters that the reference engine must not keep).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from common import REPO, make_data, make_model, run_measured, timestamp
from safetensors.torch import load_file


def build_deepspeed_shm_op() -> None:
    """Compiles (or finds already built) the op the ZeRO-3 ranks load, outside the measured runs."""
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    builder = ShareMemCommBuilder()
    if builder.is_compatible():  # as DeepSpeed checks before using it (else the ranks use gloo alone)
        builder.load(verbose=False)


def fingerprint_seconds(weights: list[Path], digests_home: Path) -> tuple[float, float]:
    """Seconds to digest the weights with an empty digest sidecar, then again with it filled."""
    os.environ["DPO_DIST_CACHE_HOME"] = str(digests_home)
    from dpo_dist.fingerprint import digest_of_files

    times = []
    for _ in range(2):
        start = time.perf_counter()
        digest_of_files(weights)
        times.append(time.perf_counter() - start)
    return times[0], times[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--deepspeed", type=Path, help="DeepSpeed JSON of the 2-process run")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_model(tmp / "model", args.hidden, args.layers)
        params = sum(t.numel() for t in load_file(model / "model.safetensors").values())
        data = make_data(tmp / "data.jsonl", args.pairs, prompt_words=(4, 16), response_words=(2, 8))
        common = ["-m", "dpo_dist", "precompute", f"model.policy={model}", f"data.train={data}",
                  "train.eval_batch_size=4", "ref_cache.shard_size=4"]
        os.environ["DPO_DIST_CACHE_HOME"] = str(tmp / "digests-runs")
        build_deepspeed_shm_op()
        whole = run_measured([*common, f"output_dir={tmp / 'whole'}"])
        zero3 = run_measured(["-m", "accelerate.commands.launch", "--config_file",
                              str(REPO / "launch" / "accelerate" / "zero3_cpu.yaml"), *common,
                              f"output_dir={tmp / 'zero3'}",
                              *([f"distributed.deepspeed={args.deepspeed.resolve()}"] if args.deepspeed else [])])
        for shard in (tmp / "whole" / "ref_cache").glob("*.safetensors"):
            a, b = load_file(shard), load_file(tmp / "zero3" / "ref_cache" / shard.name)
            assert all(torch.equal(a[k], b[k]) for k in a), f"caches differ in {shard.name}"
        first, second = fingerprint_seconds(sorted(model.glob("*.safetensors")), tmp / "digests-bench")

    gib = params * 4 / 2**30
    print(f"\nmodel: Llama hidden {args.hidden} x {args.layers} layers, {params / 1e6:.0f}M parameters "
          f"({gib:.2f} GiB fp32); {args.pairs} short pairs; ZeRO-3 JSON "
          f"{args.deepspeed or 'ds_configs/zero3_cpu.json'}; {timestamp()}\n")
    print("| reference pass | peak RSS per rank (MiB) | wall (s) | peak vs 1 process |")
    print("|---|---:|---:|---:|")
    for name, r in (("1 process, whole", whole), ("2 processes, ZeRO-3 partitioned", zero3)):
        print(f"| {name} | {r['peak_mib']:.0f} | {r['seconds']:.1f} | {r['peak_mib'] / whole['peak_mib']:.2f} |")
    print(f"\n| fingerprint of the reference weights ({gib:.2f} GiB) | seconds |\n|---|---:|")
    print(f"| first run (read and hashed) | {first:.2f} |\n| second run (unchanged: digest reused) | {second:.4f} |")


if __name__ == "__main__":
    main()
