"""Ulysses sequence parallelism: each sequence cut across the N ranks of a group.

Every rank of a group holds the same micro-batch and runs the model on its slice of the columns
(`MicroBatch.columns`). Everything but attention works token by token. In attention, DeepSpeed's
all-to-all (`deepspeed.sequence.layer._SeqAllToAll`) turns this rank's [rows, W/N, heads, d] into
[rows, W, heads/N, d]; the batch layout's own mask (padding, packing, a shared prompt's two sides)
then applies at full width, as without sequence parallelism, and the inverse all-to-all returns the
output to the slice. Each rank scores the response tokens of its slice; `SequenceParallel.sum` adds
the per-sequence sums across the group. Every rank's backward must pass through the whole model, the
all-to-alls being collectives, also when its slice holds no response token (its scores are then an
empty function of its hidden states). Memory per rank: 1/N of the activations and of the attention
scores; the weights are the data-parallel layer's business (ZeRO).
"""

from __future__ import annotations

import contextlib
import sys

import torch

from dpo_dist.errors import UserError

ATTENTION = "dpo_dist_ulysses"
FLAG = "_dpo_dist_ulysses"  # on each attention module: (SequenceParallel, the attention it wraps)
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
    """A rank's sequence-parallel group: `size` ranks, this one is `rank` in it. `mask` is the
    current forward's full-width attention mask (set by `full_mask`)."""

    def __init__(self, group, size: int, rank: int, core: str):
        self.group, self.size, self.rank, self.core = group, size, rank, core
        self.mask = None

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        return _SumAcrossGroup.apply(values, self.group)

    @contextlib.contextmanager
    def full_mask(self, mask):
        self.mask = mask
        try:
            yield
        finally:
            self.mask = None


def _all_to_all(x: torch.Tensor, group, scatter: int, gather: int) -> torch.Tensor:
    from deepspeed.sequence.layer import _SeqAllToAll

    return _SeqAllToAll.apply(group, x.contiguous(), scatter, gather, 0)


def ulysses_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' attention interface. query [rows, heads, W/N, d], key / value [rows, kv heads,
    W/N, d] (rotary already applied at the tokens' own positions) -> [rows, W/N, heads, d]."""
    sp, core = getattr(module, FLAG)
    repeat = getattr(module, "_dpo_dist_kv_repeat", 1)
    if repeat > 1:  # fewer key/value heads than ranks: each rank gets a copy of its query heads' one
        key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    # [rows, heads, W/N, d] -> [rows, W/N, heads, d] -> all-to-all -> [rows, W, heads/N, d] -> [rows, heads/N, W, d]
    q, k, v = (_all_to_all(t.transpose(1, 2), sp.group, 2, 1).transpose(1, 2) for t in (query, key, value))
    out, _ = core(module, q, k, v, sp.mask, **kwargs)  # [rows, W, heads/N, d]
    return _all_to_all(out, sp.group, 1, 2), None  # [rows, W/N, heads, d]


def install(model: torch.nn.Module, sp: SequenceParallel) -> None:
    """Routes every attention layer of `model` through `ulysses_attention`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    import deepspeed
    import deepspeed.comm

    if not deepspeed.comm.is_initialized():  # its all-to-all runs on DeepSpeed's view of the process group
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)
    AttentionInterface.register(ATTENTION, ulysses_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # the model's own mask is not used
    configs = [m.config for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")]
    config = configs[0]
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if heads % sp.size or (kv_heads % sp.size and sp.size % kv_heads):
        raise UserError(f"distributed.sequence_parallel={sp.size}: the model has {heads} attention heads and "
                        f"{kv_heads} key/value heads; N must divide the heads, and divide or be a multiple of the "
                        "key/value heads")
    layers = [m for m in model.modules() if hasattr(m, "num_key_value_groups") and hasattr(m, "config")]
    for layer in layers:
        eager = getattr(sys.modules[type(layer).__module__], "eager_attention_forward", None)
        core = ALL_ATTENTION_FUNCTIONS.get_interface(sp.core, eager)
        setattr(layer, FLAG, (sp, core))
        repeat = max(1, sp.size // kv_heads)
        layer._dpo_dist_kv_repeat = repeat
        layer.num_key_value_groups = heads // (kv_heads * repeat)
    for cfg in configs:
        cfg._attn_implementation = ATTENTION


def find(model: torch.nn.Module) -> SequenceParallel | None:
    """The SequenceParallel `install` gave `model` (also through DDP / DeepSpeed / peft wrappers)."""
    layer = next((m for m in model.modules() if hasattr(m, FLAG)), None)
    return None if layer is None else getattr(layer, FLAG)[0]


def check_supported(attn_implementation: str, size: int) -> None:
    if size > 1 and attn_implementation not in CORES:
        raise UserError(f"distributed.sequence_parallel={size} with model.attn_implementation={attn_implementation}: "
                        f"not supported yet (flash kernels take the packing from position ids); use one of "
                        f"{', '.join(CORES)}")
