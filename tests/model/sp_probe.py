"""Run by tests/model/test_ulysses.py under torchrun (2 processes, gloo): for each data file, layout
and attention, the response log-probs and parameter gradients of one micro-batch with the sequence
cut across both ranks (Ulysses), against the same batch whole on one rank. Rank 0 writes the largest
differences as JSON lines to argv[2]."""

import json
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo_dist.data import load_preference_data
from dpo_dist.data.batching import collate
from dpo_dist.model import attention, loading, ulysses
from dpo_dist.model.logprobs import install_response_head, sequence_logps

LAYOUTS = {"padded": (None, False), "packed": ("block_mask", False), "shared": ("block_mask", True)}


def grads_of(model, batch, sp=None):
    model.zero_grad()
    logps = sequence_logps(model, batch).logps
    (logps * torch.linspace(-1, 1, logps.numel())).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    if sp is not None:  # each rank holds its columns' share of every gradient
        for g in grads.values():
            dist.all_reduce(g, group=sp.group)
    return logps.detach(), grads


def main() -> None:
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    path, out_path, *files = sys.argv[1:]
    tok = AutoTokenizer.from_pretrained(path)
    group = dist.new_group(list(range(size)))
    lines = []
    for attn in ("sdpa", "eager"):
        whole = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn)
        install_response_head(whole)
        cut = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn)
        install_response_head(cut)
        sp = ulysses.SequenceParallel(group, size, rank)
        attention.install(cut, sp)
        for file in files:
            pairs = load_preference_data(file, tok, 1024, "keep_end").pairs
            for layout, (packing, share) in LAYOUTS.items():
                expected, grad_expected = grads_of(whole, collate(pairs, tok.pad_token_id, packing=packing,
                                                                  share_prefix=share))
                batch = collate(pairs, tok.pad_token_id, packing=packing, share_prefix=share, shard=(size, rank))
                got, grad_got = grads_of(cut, batch, sp)
                lines.append({"attn": attn, "data": file, "layout": layout, "columns": list(batch.columns),
                              "logps": (got - expected).abs().max().item(), "largest": expected.abs().max().item(),
                              "grads": max(((grad_got[n] - g).abs().max() / g.abs().max().clamp(min=1e-12)).item()
                                           for n, g in grad_expected.items())})
    # Wide rows (the mask made 16 queries at a time) with every layer recomputed in backward.
    attention.WHOLE_MASK_ENTRIES, attention.MASK_BLOCK_ENTRIES, attention.MIN_QUERY_BLOCK = 0, 1, 16
    loading.checkpoint_layers(cut)
    pairs = load_preference_data(files[-1], tok, 1024, "keep_end").pairs
    expected, grad_expected = grads_of(whole, collate(pairs, tok.pad_token_id))  # padded: the model's own mask
    batch = collate(pairs, tok.pad_token_id, packing="block_mask", share_prefix=True, shard=(size, rank))
    got, grad_got = grads_of(cut.train(), batch, sp)
    lines.append({"attn": "eager, blocked, checkpointed layers", "data": files[-1], "layout": "shared",
                  "columns": list(batch.columns), "logps": (got - expected).abs().max().item(),
                  "largest": expected.abs().max().item(),
                  "grads": max(((grad_got[n] - g).abs().max() / g.abs().max().clamp(min=1e-12)).item()
                               for n, g in grad_expected.items())})
    # FlexAttention: forward only on the CPU (the reference pass, evaluation); the BlockMask of the
    # layout is built at full width, as for sdpa.
    whole = AutoModelForCausalLM.from_pretrained(path, attn_implementation="flex_attention")
    install_response_head(whole)
    cut = AutoModelForCausalLM.from_pretrained(path, attn_implementation="flex_attention")
    install_response_head(cut)
    attention.install(cut, ulysses.SequenceParallel(group, size, rank))
    pairs = load_preference_data(files[-1], tok, 1024, "keep_end").pairs
    with torch.no_grad():
        expected = sequence_logps(whole, collate(pairs, tok.pad_token_id, packing="flex", share_prefix=True)).logps
        got = sequence_logps(cut, collate(pairs, tok.pad_token_id, packing="flex", share_prefix=True,
                                          shard=(size, rank))).logps
    lines.append({"attn": "flex_attention", "data": files[-1], "layout": "shared", "columns": [0, 1],
                  "logps": (got - expected).abs().max().item(), "largest": expected.abs().max().item(), "grads": 0.0})
    if rank == 0:
        with open(out_path, "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
