"""Ulysses sequence parallelism: each sequence cut across the N ranks of a group.

Every rank of a group holds the same micro-batch and runs the model on its slice of the columns
(`MicroBatch.columns`). Everything but attention works token by token. In attention
(`model.attention`), DeepSpeed's all-to-all (`deepspeed.sequence.layer._SeqAllToAll`) turns this
rank's [rows, W/N, heads, d] into [rows, W, heads/N, d]; the batch layout's own mask (padding,
packing, a shared prompt's two sides) then applies at full width, as without sequence parallelism,
and the inverse all-to-all returns the output to the slice. Each rank scores the response tokens of
its slice; `SequenceParallel.sum` adds the per-sequence sums across the group. Every rank's backward
must pass through the whole model, the all-to-alls being collectives, also when its slice holds no
response token (its scores are then an empty function of its hidden states). Memory per rank: 1/N
of the activations and of the attention's queries, keys and values; the mask is made a block of
queries at a time; the weights are the data-parallel layer's business (ZeRO).
"""

from __future__ import annotations

import torch

from dpo_dist.errors import UserError

CORES = ("sdpa", "eager", "flex_attention")


class _SumAcrossGroup(torch.autograd.Function):
    """All-reduce (sum) forward, identity backward: every rank of the group computes the same loss
    from the summed values, so each rank's slice gets d loss / d sum once, from its own backward."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, group) -> torch.Tensor:
        total = values.clone()
        torch.distributed.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class SequenceParallel:
    """A rank's sequence-parallel group: `size` ranks, this one is `rank` in it."""

    def __init__(self, group, size: int, rank: int):
        self.group, self.size, self.rank = group, size, rank

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        return _SumAcrossGroup.apply(values, self.group)


def _all_to_all(x: torch.Tensor, group, scatter: int, gather: int) -> torch.Tensor:
    from deepspeed.sequence.layer import _SeqAllToAll

    return _SeqAllToAll.apply(group, x.contiguous(), scatter, gather, 0)


def heads_to_ranks(module, sp: SequenceParallel, query, key, value):
    """query [rows, heads, W/N, d], key / value [rows, kv heads, W/N, d] (rotary already applied at the
    tokens' own positions) -> the same at full width W on heads/N (kv heads/N) heads."""
    repeat = getattr(module, "_dpo_dist_kv_repeat", 1)
    if repeat > 1:  # fewer key/value heads than ranks: each rank gets a copy of its query heads' one
        key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    # [rows, heads, W/N, d] -> [rows, W/N, heads, d] -> all-to-all -> [rows, W, heads/N, d] -> [rows, heads/N, W, d]
    return tuple(_all_to_all(t.transpose(1, 2), sp.group, 2, 1).transpose(1, 2) for t in (query, key, value))


def sequence_to_ranks(sp: SequenceParallel, out: torch.Tensor) -> torch.Tensor:
    """Attention output [rows, W, heads/N, d] -> this rank's columns [rows, W/N, heads, d]."""
    return _all_to_all(out, sp.group, 1, 2)


def _heads(config) -> tuple[int, int]:
    heads = config.num_attention_heads
    return heads, getattr(config, "num_key_value_heads", None) or heads


def check_heads(config, size: int) -> None:
    heads, kv_heads = _heads(config)
    if heads % size or (kv_heads % size and size % kv_heads):
        raise UserError(f"distributed.sequence_parallel={size}: the model has {heads} attention heads and "
                        f"{kv_heads} key/value heads; N must divide the heads, and divide or be a multiple of the "
                        "key/value heads")


def share_heads(layers: list[torch.nn.Module], config, size: int) -> None:
    """Each attention layer's key/value replication for `size` ranks, and its query heads per key/value head."""
    import deepspeed
    import deepspeed.comm

    if not deepspeed.comm.is_initialized():  # its all-to-all runs on DeepSpeed's view of the process group
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)
    heads, kv_heads = _heads(config)
    repeat = max(1, size // kv_heads)
    for layer in layers:
        layer._dpo_dist_kv_repeat = repeat
        layer.num_key_value_groups = heads // (kv_heads * repeat)


def check_supported(attn_implementation: str, size: int) -> None:
    if size > 1 and attn_implementation not in CORES:
        raise UserError(f"distributed.sequence_parallel={size} with model.attn_implementation={attn_implementation}: "
                        f"not supported yet (flash kernels take the packing from position ids); use one of "
                        f"{', '.join(CORES)}")
