"""Training steps on the CPU with glibc's default heap policy vs the memory kept (dpo_dist.host_memory).

    python benchmarks/host_memory.py [--hidden 1024 --layers 8 --steps 12 --repeats 3]

PyTorch allocates every CPU tensor with malloc; by default glibc returns freed buffers of a few MB
to the kernel, so each step faults its casts, gradients and activations in again. Each run is one
`dpo-dist train` process (bf16 autocast, 8 short pairs per step, the reference cache built once
beforehand); "glibc default" sets a glibc tunable to its default value, which dpo_dist takes as the
user's own malloc settings and leaves alone. A step's time is the median over steps 2..N of the
per-step time in metrics.jsonl (the first step also allocates Adam's state); peak RSS is the process's.
Runs alternate, `--repeats` times; prints medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from common import make_data, make_model, run_measured, timestamp

from dpo_dist import host_memory

POLICIES = {"glibc default": {"GLIBC_TUNABLES": "glibc.malloc.check=0"}, "kept (dpo_dist)": {}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    if host_memory.user_malloc_settings():
        sys.exit("unset MALLOC_*_ and GLIBC_TUNABLES' glibc.malloc settings first: with them dpo_dist keeps glibc's policy")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_model(tmp / "model", args.hidden, args.layers)
        data = make_data(tmp / "data.jsonl", 8 * args.steps, prompt_words=(8, 40), response_words=(4, 30))
        settings = [f"model.policy={model}", f"data.train={data}", f"ref_cache.dir={tmp / 'cache'}",
                    "train.mixed_precision=bf16", "train.micro_batch_size=8", "train.log_every=1",
                    "train.save_every=0", "train.report_to=none"]
        run_measured(["-m", "dpo_dist", "precompute", *settings, f"output_dir={tmp / 'pre'}"])
        runs = {name: [] for name in POLICIES}
        for r in range(args.repeats):
            for name, env in POLICIES.items():
                out = tmp / f"run-{r}-{name.split()[0]}"
                measured = run_measured(["-m", "dpo_dist", "train", *settings, f"output_dir={out}"], env)
                lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
                step_s = [line["pairs"] / line["pairs_per_s"] for line in lines if "pairs_per_s" in line][1:]
                runs[name].append({"step_ms": 1000 * statistics.median(step_s), "peak_mib": measured["peak_mib"]})
                print(f"repeat {r + 1}/{args.repeats} {name}: {runs[name][-1]['step_ms']:.0f} ms/step", flush=True)

    med = {name: {k: statistics.median(x[k] for x in rs) for k in ("step_ms", "peak_mib")} for name, rs in runs.items()}
    base = med["glibc default"]
    print(f"\n1 process, Llama hidden {args.hidden} x {args.layers} layers (vocab 512), bf16 autocast, 8 short pairs "
          f"per step, {args.steps} steps; median of {args.repeats}; {timestamp()}\n")
    print("| heap policy | ms / step (steps 2..N) | vs glibc default | peak RSS (MiB) |\n|---|---:|---:|---:|")
    for name, m in med.items():
        print(f"| {name} | {m['step_ms']:.0f} | {base['step_ms'] / m['step_ms']:.2f}x | {m['peak_mib']:.0f} |")


if __name__ == "__main__":
    sys.exit(main())
