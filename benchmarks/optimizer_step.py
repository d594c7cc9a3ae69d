"""AdamW step: PyTorch's per-tensor loop, foreach and fused implementations, on the same parameters.

    python benchmarks/optimizer_step.py [--params_m 75 --steps 10 --device cpu]

dpo_dist builds a fused AdamW (`distributed._optimizer`). PyTorch's default is foreach on GPUs and
the per-tensor loop on the CPU. Each implementation runs in its own child process on --params_m
million fp32 parameters (1024 x 1024 matrices, gradients set), one warm-up step, then --steps timed
steps. Memory: the peak (RSS on the CPU, allocated on a GPU) above what parameters, gradients and
optimizer state hold after the warm-up, i.e. the step's temporaries. Prints a table with ratios
against the per-tensor loop.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

MODES = {"per_tensor": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def memory_mib(device: str) -> tuple[float, float]:
    """(now, peak so far) of this process: resident memory on the CPU, allocated on a GPU."""
    import torch

    if device == "cuda":
        return torch.cuda.memory_allocated() / 2**20, torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * resource.getpagesize() / 2**20, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(mode: str, params_m: int, steps: int, device: str) -> dict:
    import torch

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(1024, 1024, device=device)) for _ in range(round(params_m / 1.048576))]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = torch.optim.AdamW(params, lr=1e-3, **MODES[mode])
    optimizer.step()  # creates the state
    settled, _ = memory_mib(device)
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return {"ms": (time.perf_counter() - start) / steps * 1000, "temporaries_mib": memory_mib(device)[1] - settled}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params_m", type=int, default=75, help="million parameters")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.params_m, args.steps, args.device)))
        return
    results = {}
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--params_m", str(args.params_m),
                              "--steps", str(args.steps), "--device", args.device],
                             capture_output=True, text=True, check=True)
        results[mode] = json.loads(out.stdout.split("RESULT ", 1)[1])
    base = results["per_tensor"]["ms"]
    print(f"AdamW on {args.params_m}M fp32 parameters ({args.device}), mean of {args.steps} steps\n")
    print("| implementation | ms / step | vs per-tensor | step temporaries (MiB) |")
    print("|---|---:|---:|---:|")
    for mode, r in results.items():
        print(f"| {mode} | {r['ms']:.0f} | {base / r['ms']:.2f}x | {max(r['temporaries_mib'], 0):.0f} |")
    print(f"\nCommand: `python benchmarks/optimizer_step.py --params_m {args.params_m} --steps {args.steps}"
          + (f" --device {args.device}`" if args.device != "cpu" else "`"))


if __name__ == "__main__":
    main()
