"""The attention of a scored model: its own kernel (sdpa, eager; flex under sequence parallelism) fed
the batch layout's mask a block of queries at a time, optionally cut across a sequence-parallel group.

A packed or shared-prompt row needs a mask of its own, [W, W] per row: 0.8 GB in float32 for a row of
14k tokens, made whole on every rank whatever the sequence parallelism (each rank attends over the
whole width, on its share of the heads). So the mask travels as the layout (`LayoutMask`: unit and
side of every token) and each layer makes it a block of queries at a time, under activation
checkpointing: one block's mask exists at a time, in forward and in backward (each block's attention
then runs twice, but only over the keys before its last query). Batches whose mask is small enough
(up to 2^26 entries: 8 rows of 2.9k tokens) get it whole, made once per forward and shared by every
layer, as before.

transformers hands a layer only the model's `attention_mask` argument; the layout is handed here
instead (`handing`), for one forward. A layer recomputed in backward (gradient checkpointing) is
handed the mask its forward saw through torch's checkpoint `context_fn` (`recompute_context`).
"""

from __future__ import annotations

import contextlib
import sys

import torch
from torch.utils.checkpoint import checkpoint

from dpo_dist.data.batching import LayoutMask
from dpo_dist.model import ulysses

NAME = "dpo_dist_{}"  # the attention implementation registered for each core
FLAG = "_dpo_dist_attention"  # on each attention module: (Attention, the core it wraps)
STATE = "_dpo_dist_attention_state"  # on the outermost model sequence_logps was given: its Attention
CORES = ("sdpa", "eager")  # kernels that take a 4-D mask; flex only under sequence parallelism
WHOLE_MASK_ENTRIES = 1 << 26  # a mask up to this size (256 MB in float32) is made whole, once per forward
MASK_BLOCK_ENTRIES = 1 << 22  # a larger one a block of queries at a time, of about this size (16 MB)
MIN_QUERY_BLOCK = 128

_handed = None  # the current forward's mask: LayoutMask, a BlockMask (flex), or None


class Attention:
    """What one model's attention layers share: under sequence parallelism, the group `sp` that cuts
    its sequences (each layer keeps the core it wraps beside it, under FLAG)."""

    def __init__(self, sp: ulysses.SequenceParallel | None = None):
        self.sp = sp


@contextlib.contextmanager
def handing(mask):
    """The mask every attention layer uses during this forward, instead of the model's argument."""
    global _handed
    previous, _handed = _handed, mask
    try:
        yield
    finally:
        _handed = previous


def recompute_context():
    """torch.utils.checkpoint's `context_fn`: a checkpointed layer is recomputed in backward with
    the mask its forward was handed (the forward's `handing` has ended by then)."""
    return contextlib.nullcontext(), handing(_handed)


def _masked_block(core, module, query, key, value, mask: LayoutMask, start: int, kwargs) -> torch.Tensor:
    """Queries [start, start + q) attend to keys [0, start + q): later keys are causally masked anyway."""
    end = start + query.shape[2]
    return core(module, query, key[:, :, :end], value[:, :, :end], mask.rows(start, end, query.dtype),
                **kwargs)[0]


def _attend(core, module, query, key, value, mask, kwargs) -> torch.Tensor:
    """core's output [rows, W, heads, d] for query [rows, heads, W, d] under `mask`."""
    if not isinstance(mask, LayoutMask):
        return core(module, query, key, value, mask, **kwargs)[0]
    rows, width = query.shape[0], query.shape[2]
    block = max(MIN_QUERY_BLOCK, MASK_BLOCK_ENTRIES // (rows * width))
    if rows * width * width <= WHOLE_MASK_ENTRIES or block >= width:
        return core(module, query, key, value, mask.whole(query.dtype), **kwargs)[0]
    parts = []
    for start in range(0, width, block):
        args = (core, module, query[:, :, start : start + block], key, value, mask, start, kwargs)
        parts.append(checkpoint(_masked_block, *args, use_reentrant=False) if torch.is_grad_enabled()
                     else _masked_block(*args))
    return torch.cat(parts, dim=1)


def layout_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' attention interface. query [rows, heads, w, d], key / value [rows, kv heads, w, d]
    (w = W, or W/N under sequence parallelism) -> ([rows, w, heads, d], None)."""
    state, core = getattr(module, FLAG)
    mask = _handed if (_handed is not None or state.sp is not None) else attention_mask
    if state.sp is None:
        return _attend(core, module, query, key, value, mask, kwargs), None
    query, key, value = ulysses.heads_to_ranks(module, state.sp, query, key, value)
    return ulysses.sequence_to_ranks(state.sp, _attend(core, module, query, key, value, mask, kwargs)), None


def install(model: torch.nn.Module, sp: ulysses.SequenceParallel | None = None) -> Attention | None:
    """Routes `model`'s attention layers through `layout_attention` (again: updates the group).
    None where the model's attention takes no 4-D mask and no group cuts it (flash, flex alone)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    configs = [m.config for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")]
    layers = [m for m in model.modules() if hasattr(m, "num_key_value_groups") and hasattr(m, "config")]
    state = next((getattr(m, FLAG)[0] for m in layers if hasattr(m, FLAG)), None)
    if state is None:
        core = configs[0]._attn_implementation
        if core not in CORES and not (sp is not None and core in ulysses.CORES):
            return None
        state = Attention()
        AttentionInterface.register(NAME.format(core), layout_attention)
        # the 4-D mask transformers makes from a 2-D padding mask, when no layout is handed
        AttentionMaskInterface.register(NAME.format(core), eager_mask if core == "eager" else sdpa_mask)
        for layer in layers:
            eager = getattr(sys.modules[type(layer).__module__], "eager_attention_forward", None)
            setattr(layer, FLAG, (state, ALL_ATTENTION_FUNCTIONS.get_interface(core, eager)))
        for cfg in configs:
            cfg._attn_implementation = NAME.format(core)
    if sp is not None:
        ulysses.check_heads(configs[0], sp.size)
        state.sp = sp
        ulysses.share_heads(layers, configs[0], sp.size)
    vars(model)[STATE] = state
    return state


def prepare(model: torch.nn.Module) -> Attention | None:
    """`model`'s Attention, installed on first use; found once per outermost model (DDP / DeepSpeed /
    peft wrappers)."""
    if STATE not in vars(model):
        vars(model)[STATE] = install(model)
    return vars(model)[STATE]
