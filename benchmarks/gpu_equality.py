"""Attention backends against the padded path, log-probs and gradients, where a GPU is lent.

    python benchmarks/gpu_equality.py [--hidden 512 --layers 4 --pairs 16 --dtype float32]

On the CPU the tests check FlexAttention's forward only (PyTorch has no CPU backward for it) and
skip flash varlen (no kernels); this runs every layout on the GPU — padded sdpa (the baseline),
block_mask sdpa unshared and shared, flex unshared and shared, flash varlen (if flash_attn is
installed) — and prints each one's largest log-prob and gradient differences from the baseline.
fp32 should agree to ~1e-5; bf16 to bf16 rounding.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import make_data, make_model  # noqa: E402

LAYOUTS = [  # name, attn_implementation, packing, share_prefix
    ("padded sdpa", "sdpa", None, False),
    ("block_mask sdpa", "sdpa", "block_mask", False),
    ("block_mask sdpa shared", "sdpa", "block_mask", True),
    ("flex", "flex_attention", "flex", False),
    ("flex shared", "flex_attention", "flex", True),
    ("varlen flash", "flash_attention_2", "varlen", False),
]


def logps_and_grads(model_dir: Path, pairs, pad_id: int, attn: str, packing, share: bool, dtype):
    from transformers import AutoModelForCausalLM

    from dpo_dist.batching import collate
    from dpo_dist.logprobs import install_response_head, sequence_logps

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn).cuda()
    install_response_head(model)
    batch = collate(pairs, pad_id, packing=packing, share_prefix=share).to("cuda")
    logps = sequence_logps(model, batch).logps
    (logps * torch.linspace(-1, 1, logps.numel(), device="cuda")).sum().backward()
    return logps.detach().cpu(), {n: p.grad.float().cpu() for n, p in model.named_parameters()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_equality.py needs a CUDA GPU")
    from transformers import AutoTokenizer

    from dpo_dist.data import load_preference_data

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model(Path(tmp) / "model", args.hidden, args.layers)
        data = make_data(Path(tmp) / "data.jsonl", args.pairs, prompt_words=(120, 480), response_words=(40, 160))
        tok = AutoTokenizer.from_pretrained(model_dir)
        pairs = list(load_preference_data(str(data), tok, 2048, "keep_end").pairs)
        dtype = getattr(torch, args.dtype)
        print(f"{torch.cuda.get_device_name()}, {args.dtype}, {len(pairs)} long-prompt pairs")
        print("| layout | max |Δ log-prob| | max rel Δ gradient |")
        print("|---|---:|---:|")
        base = None
        for name, attn, packing, share in LAYOUTS:
            if attn == "flash_attention_2":
                try:
                    import flash_attn  # noqa: F401
                except ImportError:
                    print(f"| {name} | flash_attn not installed | |")
                    continue
            logps, grads = logps_and_grads(model_dir, pairs, tok.pad_token_id, attn, packing, share, dtype)
            if base is None:
                base = logps, grads
                print(f"| {name} | baseline | baseline |")
                continue
            d_logp = (logps - base[0]).abs().max().item()
            d_grad = max(((g - base[1][n]).abs().max() / base[1][n].abs().max().clamp(min=1e-12)).item()
                         for n, g in grads.items())
            print(f"| {name} | {d_logp:.2e} | {d_grad:.2e} |")


if __name__ == "__main__":
    main()
