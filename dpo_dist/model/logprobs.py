"""Per-sequence response log-probabilities: the one scoring function for policy and reference.

Scoring both models with the same code and dtype is what makes step-0 rewards exactly zero when
the policy starts from the reference.

The output layer never builds [tokens × vocab] logits for the whole batch: `install_response_head`
makes the model's LM head, while a request is set, project only the hidden states of positions that
predict a response token, a chunk at a time, and return each one's log-probability of its target.
In training each chunk is recomputed in backward (activation checkpointing), so peak memory holds
one chunk of logits, not all of them; prompt positions cost no vocabulary projection at all.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dpo_dist.data.batching import LayoutMask, MicroBatch
from dpo_dist.model import attention

HEAD_FLAG = "_dpo_dist_response_head"
FOUND_HEAD = "_dpo_dist_found_head"  # on the outermost model sequence_logps was given: its head, or None
CHUNK_ROWS = 1024  # positions per vocabulary projection: CHUNK_ROWS × vocab floats at a time


def _picked_logps(logits: torch.Tensor, targets: torch.Tensor, with_sq: bool) -> torch.Tensor:
    """log softmax(logits)[target] in float32: [..., V] -> [...]; with_sq: [..., 2], the second
    column log p(target) − log Σ_v p_v² (WPO's aligned log-prob, Zhou et al. 2024, eq. 2), detached."""
    logits = logits.float()
    norm = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - norm
    if not with_sq:
        return picked
    with torch.no_grad():
        aligned = picked - (torch.logsumexp(2 * logits, dim=-1) - 2 * norm)
    return torch.stack([picked, aligned], dim=-1)


def _fp32_logits(hidden: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """hidden @ weightᵀ + bias as float32 logits, outside autocast: fp32 weights (autocast runs) give
    an fp32 matmul; bf16 / fp16 weights accumulate into fp32 output directly on CUDA (no rounding of
    the logits to 16 bits first) and are upcast after the matmul elsewhere. [N, H] -> [N, V]."""
    with torch.autocast(hidden.device.type, enabled=False):
        hidden = hidden.to(weight.dtype)
        if weight.dtype == torch.float32 or not hidden.is_cuda:
            return F.linear(hidden, weight, bias).float()
        logits = torch.mm(hidden, weight.t(), out_dtype=torch.float32)
        return logits if bias is None else logits + bias.float()


def _target_logps(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias, with_sq: bool):
    """`_picked_logps` of hidden @ weightᵀ + bias. hidden [N, H], targets [N] -> [N] (or [N, 2])."""
    return _picked_logps(_fp32_logits(hidden, weight, bias), targets, with_sq)


def install_response_head(model: torch.nn.Module) -> bool:
    """Teaches the model's output layer the response-only mode; False where it cannot apply
    (no plain linear head, or logits post-processed, e.g. Gemma's soft-capping)."""
    head = model.get_output_embeddings()
    config = getattr(model, "config", None)
    if not isinstance(head, torch.nn.Linear) or getattr(config, "final_logit_softcapping", None):
        return False
    plain_forward = head.forward

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        request = getattr(head, "_request", None)
        if request is None:
            return plain_forward(hidden)
        targets, index, with_sq = request  # [n]: the next token, and the flat position predicting it
        selected, selected_targets = hidden.flatten(0, 1).index_select(0, index), targets
        parts = []
        # At least one (maybe empty) chunk: the scores stay a function of `hidden` and of the head's
        # weights, so every rank's backward runs through the whole model and reaches the head (under
        # sequence parallelism a rank's columns may hold no response token; ZeRO-3 reduces every
        # rank's gradient of every weight, the all-to-alls are collectives).
        for start in range(0, max(index.numel(), 1), CHUNK_ROWS):
            args = (selected[start : start + CHUNK_ROWS], selected_targets[start : start + CHUNK_ROWS],
                    head.weight, head.bias, with_sq)
            # Recomputing the chunk in backward keeps one chunk's logits alive, not all of them.
            parts.append(checkpoint(_target_logps, *args, use_reentrant=False) if torch.is_grad_enabled()
                         else _target_logps(*args))
        return torch.cat(parts)

    head.forward = forward  # an instance attribute: hooks (ZeRO-3 gathering) and state_dict unchanged
    setattr(head, HEAD_FLAG, True)
    return True


def _find_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The installed head, also through DDP / DeepSpeed / peft wrappers; looked for once per outermost
    model (a 70B model has thousands of modules to walk)."""
    if FOUND_HEAD not in vars(model):
        vars(model)[FOUND_HEAD] = next((m for m in model.modules() if getattr(m, HEAD_FLAG, False)), None)
    return vars(model)[FOUND_HEAD]


@contextlib.contextmanager
def _response_request(head: torch.nn.Module, targets: torch.Tensor, index: torch.Tensor, with_sq: bool):
    head._request = (targets, index, with_sq)
    try:
        yield
    finally:
        head._request = None


def _compile_settings(batch: MicroBatch):
    """PyTorch 2.13's CPU FlexAttention kernel fails to compile once shapes turn dynamic while the
    mask reads the layout's tensors (C++ codegen error); on the CPU each new shape compiles static."""
    if batch.packing == "flex" and batch.input_ids.device.type == "cpu":
        return torch._dynamo.config.patch(automatic_dynamic_shapes=False)
    return contextlib.nullcontext()


def token_logps(logits: torch.Tensor, targets: torch.Tensor, rows_per_chunk: int = 4,
                with_sq: bool = False) -> torch.Tensor:
    """`_picked_logps` per position, a few rows at a time (the path for heads `install_response_head`
    cannot teach). logits: [N, T, V] (any float dtype), targets: [N, T] -> [N, T] (or [N, T, 2]) float32."""
    return torch.cat([_picked_logps(logits[start : start + rows_per_chunk], targets[start : start + rows_per_chunk],
                                    with_sq) for start in range(0, logits.shape[0], rows_per_chunk)])


@dataclass
class SequenceScores:
    """Per sequence ([2B]: the B chosen, then the B rejected responses): the summed response-token
    log-probs; the response token count; the sum over the pair's shared length, the first
    min(chosen, rejected) response tokens (LD-DPO, Liu et al. 2024); with `wpo`, the mean over the
    response of log p − log Σ_v p_v² (detached; WPO's weight is its exp)."""

    logps: torch.Tensor
    tokens: torch.Tensor
    shared_logps: torch.Tensor
    wpo: torch.Tensor | None = None

    def halves(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        value = getattr(self, name)
        return None if value is None else value.chunk(2)


def sequence_logps(model: torch.nn.Module, batch: MicroBatch, wpo: bool = False) -> SequenceScores:
    """Response log-probs per sequence from one forward pass over chosen and rejected sequences
    together, padded or packed (see batching.collate); sums in float32. Which positions count comes
    from the batch (`MicroBatch.scoring`, worked out on the host): no host sync here."""
    plan = batch.scoring()
    state = attention.prepare(model)
    sp = None if state is None else state.sp
    if (sp is None) != (batch.columns is None):
        raise ValueError("a batch collated with a shard (collate(shard=...)) goes with a sequence-parallel model "
                         "(attention.install with a group), and only with one")
    mask = batch.attention_mask(full=sp is not None)
    handed = sp is not None or isinstance(mask, LayoutMask)  # the attention gets it (at full width under SP)
    if handed and state is None:
        raise ValueError(f"a {batch.packing} batch needs an attention that takes a 4-D mask (sdpa, eager)")
    inputs = dict(input_ids=batch.input_ids, attention_mask=None if handed else mask,
                  position_ids=batch.position_ids, use_cache=False, **batch.varlen_kwargs())
    if sp is not None:  # this rank's columns
        lo, hi = batch.columns
        inputs.update(input_ids=batch.input_ids[:, lo:hi], position_ids=batch.position_ids[:, lo:hi])
    head = _find_head(model)
    with _compile_settings(batch), attention.handing(mask if handed else None):
        if head is not None:
            with _response_request(head, plan.target, plan.index, wpo):
                values = model(**inputs).logits  # [n] (or [n, 2]): the head scored the positions only
        else:
            logits = model(**inputs).logits.flatten(0, 1).index_select(0, plan.index)
            values = token_logps(logits[None], plan.target[None], with_sq=wpo)[0]
    values = values.float()
    logp = values[:, 0] if wpo else values
    # Cut across ranks, a sequence's sum is made of parts that depend on where the batch's width
    # splits: they are added in float64, so the float32 result does not (the same pairs in a wider
    # or narrower batch, as in the reference pass, give the same log-probs: step-0 rewards are 0).
    dtype = torch.float32 if sp is None else torch.float64
    zeros = torch.zeros(2 * batch.num_pairs, dtype=dtype, device=values.device)
    parts = [logp, logp * plan.in_shared, *([values[:, 1]] if wpo else [])]
    sums = torch.stack([zeros.index_add(0, plan.owner, part.to(dtype)) for part in parts])
    if sp is not None:  # each rank scored the response tokens of its columns
        sums = sp.sum(sums).float()
    return SequenceScores(
        logps=sums[0],
        tokens=plan.tokens,
        shared_logps=sums[1],
        wpo=sums[2] / plan.tokens.clamp(min=1) if wpo else None,
    )
