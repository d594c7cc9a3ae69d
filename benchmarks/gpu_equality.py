"""Attention backends against the padded path, log-probs and gradients: a check that fails.

    python benchmarks/gpu_equality.py [--device cuda|cpu] [--dtype float32|bfloat16] [--hidden 512 --layers 4 --pairs 16]

Every layout — padded sdpa (the baseline), block_mask sdpa and eager, unshared and shared, flex
unshared and shared, flash varlen — is run on the same long-prompt pairs; each row prints its
largest log-prob difference (relative to the largest log-prob) and gradient difference (relative
to each weight's largest gradient) from the baseline, and PASS or FAIL against the dtype's
tolerance, and the layout's forward + backward time and (CUDA) peak memory above the model: the
numbers that choose the default attention for packed and shared layouts on a GPU (README
"Performance"). Exit code 1 if any row fails. flash varlen runs in bf16 only (its kernels have no fp32);
on the CPU (`--device cpu`) flex and flash are left out (no CPU backward, no kernels).
`--tolerance-scale` multiplies every tolerance (a negative one makes every row fail: how the
tests check that a failure reaches the exit code).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import make_data, make_model  # noqa: E402

LAYOUTS = [  # name, attn_implementation, packing, share_prefix
    ("padded sdpa", "sdpa", None, False),
    ("block_mask sdpa", "sdpa", "block_mask", False),
    ("block_mask sdpa shared", "sdpa", "block_mask", True),
    ("block_mask eager", "eager", "block_mask", False),
    ("block_mask eager shared", "eager", "block_mask", True),
    ("flex", "flex_attention", "flex", False),
    ("flex shared", "flex_attention", "flex", True),
    ("varlen flash", "flash_attention_2", "varlen", False),
]
# (log-probs, gradients), relative: fp32 is the exact oracle's; bf16 allows its rounding (a wrong
# mask moves log-probs by O(1) relative, far above either).
TOLERANCES = {"float32": (1e-5, 1e-3), "bfloat16": (3e-2, 2e-1)}


def logps_and_grads(model_dir: Path, pairs, pad_id: int, attn: str, packing, share: bool, dtype, device: str):
    """Log-probs, gradients, and the forward + backward's time (ms, the second of two runs: the first
    compiles) and peak memory above the model (MiB, CUDA only) for one layout."""
    from transformers import AutoModelForCausalLM

    from dpo_dist.data.batching import collate
    from dpo_dist.model.logprobs import install_response_head, sequence_logps

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn).to(device)
    install_response_head(model)
    batch = collate(pairs, pad_id, packing=packing, share_prefix=share).to(device)
    cuda = device == "cuda"
    for _ in range(2):
        model.zero_grad()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        logps = sequence_logps(model, batch).logps
        (logps * torch.linspace(-1, 1, logps.numel(), device=device)).sum().backward()
        if cuda:
            torch.cuda.synchronize()
        ms = 1000 * (time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else float("nan")
    return logps.detach().cpu(), {n: p.grad.float().cpu() for n, p in model.named_parameters()}, ms, peak


def runnable(attn: str, dtype: str, device: str) -> str | None:
    """Why a layout cannot run here, or None."""
    if attn == "flash_attention_2":
        if device != "cuda" or dtype != "bfloat16":
            return "bf16 on a GPU only"
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            return "flash_attn not installed (README: Docker --build-arg FLASH_ATTN)"
    if attn == "flex_attention" and device != "cuda":
        return "no CPU backward"
    return None


def differences(logps, grads, base) -> tuple[float, float]:
    d_logp = ((logps - base[0]).abs().max() / base[0].abs().max()).item()
    d_grad = max(((g - base[1][n]).abs().max() / base[1][n].abs().max().clamp(min=1e-12)).item()
                 for n, g in grads.items())
    return d_logp, d_grad


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--dtype", choices=tuple(TOLERANCES), default="float32")
    parser.add_argument("--tolerance-scale", type=float, default=1.0)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_equality.py --device cuda needs a CUDA GPU")
    from transformers import AutoTokenizer

    from dpo_dist.data import load_preference_data

    tol_logp, tol_grad = (t * args.tolerance_scale for t in TOLERANCES[args.dtype])
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model(Path(tmp) / "model", args.hidden, args.layers)
        data = make_data(Path(tmp) / "data.jsonl", args.pairs, prompt_words=(120, 480), response_words=(40, 160))
        tok = AutoTokenizer.from_pretrained(model_dir)
        pairs = list(load_preference_data(str(data), tok, 2048, "keep_end").pairs)
        dtype = getattr(torch, args.dtype)
        where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
        print(f"{where}, {args.dtype}, {len(pairs)} long-prompt pairs; tolerances: log-probs {tol_logp:.0e}, "
              f"gradients {tol_grad:.0e} (relative)")
        print("| layout | rel Δ log-prob | rel Δ gradient | result | fwd+bwd ms | peak MiB above the model |")
        print("|---|---:|---:|---|---:|---:|")
        base = None
        for name, attn, packing, share in LAYOUTS:
            why_not = runnable(attn, args.dtype, args.device)
            if why_not:
                print(f"| {name} | | | not run: {why_not} | | |")
                continue
            logps, grads, ms, peak = logps_and_grads(model_dir, pairs, tok.pad_token_id, attn, packing, share, dtype,
                                                     args.device)
            cost = f"{ms:.0f} | {peak:.0f}"
            if base is None:
                base = logps, grads
                print(f"| {name} | baseline | baseline | | {cost} |")
                continue
            d_logp, d_grad = differences(logps, grads, base)
            ok = d_logp <= tol_logp and d_grad <= tol_grad
            failed += not ok
            print(f"| {name} | {d_logp:.2e} | {d_grad:.2e} | {'PASS' if ok else 'FAIL'} | {cost} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
