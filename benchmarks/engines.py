"""Per-rank peak memory and wall time of FSDP2 vs DeepSpeed ZeRO-3 on a weight-bound model: the
reference pass and training, each against one whole process.

    python benchmarks/engines.py [--hidden 1024 --layers 32 --pairs 8 --steps 2]

fp32, ~300M parameters at the defaults, short pairs: the memory is the weights' (and in training
their gradients and AdamW's two moments). Every run is its own launch, 2 processes under `accelerate
launch --config_file launch/accelerate/{zero3_cpu,fsdp2_cpu}.yaml`; peak RSS is that of the
largest process (rank), so it includes loading. Training reads the reference cache of the
1-process reference pass (all engines fingerprint it alike). The caches must be equal and the
2-process runs must end on the 1-process weights (1e-4), or the benchmark stops.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import torch
from common import REPO, make_data, make_model, run_measured, timestamp
from reference_memory import build_deepspeed_shm_op
from safetensors.torch import load_file

LAUNCHES = {"1 process": ([], ["train.micro_batch_size=2"]),
            **{f"2 processes, {name}": (["-m", "accelerate.commands.launch", "--config_file",
                                         str(REPO / "launch" / "accelerate" / config)], ["train.micro_batch_size=1"])
               for name, config in (("ZeRO-3", "zero3_cpu.yaml"), ("FSDP2", "fsdp2_cpu.yaml"))}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_model(tmp / "model", args.hidden, args.layers)
        params = sum(t.numel() for t in load_file(model / "model.safetensors").values())
        data = make_data(tmp / "data.jsonl", args.pairs, prompt_words=(4, 16), response_words=(2, 8))
        common = [f"model.policy={model}", f"data.train={data}", "train.eval_batch_size=4", "ref_cache.shard_size=4",
                  "train.lr=1e-5", f"train.max_steps={args.steps}", "train.save_every=0", "train.log_every=1"]
        os.environ["DPO_DIST_CACHE_HOME"] = str(tmp / "digests")
        build_deepspeed_shm_op()
        rows = []
        for name, (launch, batch) in LAUNCHES.items():
            out = tmp / name.replace(" ", "_").replace(",", "")
            reference = run_measured([*launch, "-m", "dpo_dist", "precompute", *common, f"output_dir={out}"])
            cache = out / "ref_cache"
            if rows:  # training of every engine reads the 1-process cache; theirs must equal it
                for shard in cache.glob("*.safetensors"):
                    a, b = load_file(shard), load_file(rows[0][3] / shard.name)
                    assert all(torch.equal(a[k], b[k]) for k in a), f"{name}: cache differs in {shard.name}"
                shutil.rmtree(cache)
                shutil.copytree(rows[0][3], cache)
            training = run_measured([*launch, "-m", "dpo_dist", "train", *common, *batch, f"output_dir={out}"])
            rows.append((name, reference, training, cache, load_file(out / "final" / "model.safetensors")))
        expected = rows[0][4]
        for name, *_, final in rows[1:]:
            apart = max((final[k] - expected[k]).abs().max().item() for k in expected)
            assert apart < 1e-4, f"{name} ended {apart:.2e} from the 1-process weights"

    gib = params * 4 / 2**30
    print(f"\nmodel: Llama hidden {args.hidden} x {args.layers} layers, {params / 1e6:.0f}M parameters "
          f"({gib:.2f} GiB fp32); {args.pairs} short pairs, {args.steps} steps of 2 pairs; {timestamp()}\n")
    print("| run | reference pass: peak RSS per rank (MiB) | vs 1 process | wall (s) "
          "| training: peak RSS per rank (MiB) | vs 1 process | wall (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    one_ref, one_train = rows[0][1]["peak_mib"], rows[0][2]["peak_mib"]
    for name, reference, training, *_ in rows:
        print(f"| {name} | {reference['peak_mib']:.0f} | {reference['peak_mib'] / one_ref:.2f} | "
              f"{reference['seconds']:.1f} | {training['peak_mib']:.0f} | {training['peak_mib'] / one_train:.2f} | "
              f"{training['seconds']:.1f} |")


if __name__ == "__main__":
    main()
