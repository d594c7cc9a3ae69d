"""Peak memory and time of one training forward+backward: response-only chunked LM head vs full logits.

    python benchmarks/logits_memory.py [--vocab 32000 --seq 1024 --batch 4]

A Llama with a realistic vocabulary, sequences whose second half is the response. The full-logits
path materialises [2·batch × seq × vocab] float32 logits (and their log-softmax); the response head
projects response positions only, a chunk at a time, recomputed in backward. Each variant runs in
its own child process so peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def child(head: bool, vocab: int, seq: int, batch: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpo_dist.data.batching import MicroBatch
    from dpo_dist.model.logprobs import install_response_head, sequence_logps

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=512,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    if head:
        install_response_head(model)
    rows = 2 * batch
    ids = torch.randint(0, vocab, (rows, seq))
    response = torch.zeros(rows, seq, dtype=torch.bool)
    response[:, seq // 2 :] = True
    sequence = torch.arange(rows)[:, None].repeat(1, seq)
    batch_ = MicroBatch(input_ids=ids, position_ids=torch.arange(seq).repeat(rows, 1), response_mask=response,
                        seq_index=sequence, unit_index=sequence, side=torch.zeros_like(ids),
                        seq_lengths=torch.full((rows,), seq), index=torch.arange(batch), weight=torch.ones(batch))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    logps = sequence_logps(model, batch_).logps
    logps.sum().backward()
    return {"seconds": time.perf_counter() - start,
            "peak_extra_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024,
            "logps": logps.detach().tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--child", choices=["head", "full"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child == "head", args.vocab, args.seq, args.batch)))
        return
    results = {}
    for variant in ("full", "head"):
        out = subprocess.run([sys.executable, __file__, "--child", variant, "--vocab", str(args.vocab),
                              "--seq", str(args.seq), "--batch", str(args.batch)], capture_output=True, text=True)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode or not line:
            raise RuntimeError(out.stderr[-3000:])
        results[variant] = json.loads(line[-1][7:])
    diff = max(abs(a - b) / abs(a) for a, b in zip(results["full"]["logps"], results["head"]["logps"]))
    full_logits_mib = 2 * args.batch * args.seq * args.vocab * 4 / 2**20
    print(f"\nvocab {args.vocab}, {2 * args.batch} sequences x {args.seq} tokens (half response); "
          f"one float32 copy of the full logits = {full_logits_mib:.0f} MiB\n")
    print("| LM head | peak memory above the model (MiB) | forward+backward (s) | vs full logits |")
    print("|---|---:|---:|---:|")
    for name, key in (("full logits", "full"), ("response-only, chunked", "head")):
        r = results[key]
        print(f"| {name} | {r['peak_extra_mib']:.0f} | {r['seconds']:.2f} | "
              f"{r['peak_extra_mib'] / results['full']['peak_extra_mib']:.2f}x memory |")
    print(f"\nlargest relative difference of the per-sequence log-probs: {diff:.1e}")


if __name__ == "__main__":
    main()
