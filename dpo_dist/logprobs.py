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

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dpo_dist.batching import MicroBatch

HEAD_FLAG = "_dpo_dist_response_head"
CHUNK_ROWS = 1024  # positions per vocabulary projection: CHUNK_ROWS × vocab floats at a time


def _target_logps(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """log softmax(hidden @ weightᵀ + bias)[target] in float32. hidden [N, H], targets [N] -> [N]."""
    logits = F.linear(hidden, weight, bias).float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


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
        targets, scored = request  # [rows, L]: the next token; whether it is a response token
        selected, selected_targets = hidden[scored], targets[scored]
        parts = []
        for start in range(0, selected.shape[0], CHUNK_ROWS):
            args = (selected[start : start + CHUNK_ROWS], selected_targets[start : start + CHUNK_ROWS],
                    head.weight, head.bias)
            # Recomputing the chunk in backward keeps one chunk's logits alive, not all of them.
            parts.append(checkpoint(_target_logps, *args, use_reentrant=False) if torch.is_grad_enabled()
                         else _target_logps(*args))
        values = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
        return torch.zeros(scored.shape, dtype=torch.float32, device=hidden.device).masked_scatter(scored, values)

    head.forward = forward  # an instance attribute: hooks (ZeRO-3 gathering) and state_dict unchanged
    setattr(head, HEAD_FLAG, True)
    return True


def _find_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The installed head, also through DDP / DeepSpeed / peft wrappers."""
    return next((m for m in model.modules() if getattr(m, HEAD_FLAG, False)), None)


@contextlib.contextmanager
def _response_request(head: torch.nn.Module, targets: torch.Tensor, scored: torch.Tensor):
    head._request = (targets, scored)
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


def token_logps(logits: torch.Tensor, targets: torch.Tensor, rows_per_chunk: int = 4) -> torch.Tensor:
    """log softmax(logits)[target] per position in float32, a few rows at a time (fallback path).

    logits: [N, T, V] (any float dtype), targets: [N, T] -> [N, T] float32.
    """
    out = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
    for start in range(0, logits.shape[0], rows_per_chunk):
        chunk = logits[start : start + rows_per_chunk].float()
        picked = chunk.gather(-1, targets[start : start + rows_per_chunk].unsqueeze(-1)).squeeze(-1)
        out[start : start + rows_per_chunk] = picked - torch.logsumexp(chunk, dim=-1)
    return out


def sequence_logps(model: torch.nn.Module, batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of response-token log-probs per sequence, and the response token count per sequence.

    One forward pass over chosen and rejected sequences together, padded or packed (see
    batching.collate). Returns ([2B] float32, [2B] int64); sequences 0..B-1 are the chosen
    responses, B..2B-1 the rejected ones.
    """
    # Position t predicts token t+1; it is scored when token t+1 is a response token.
    targets = torch.zeros_like(batch.input_ids)
    targets[:, :-1] = batch.input_ids[:, 1:]
    scored = torch.zeros_like(batch.response_mask)
    scored[:, :-1] = batch.response_mask[:, 1:]
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask(),
                  position_ids=batch.position_ids, use_cache=False)
    head = _find_head(model)
    with _compile_settings(batch):
        if head is not None:
            with _response_request(head, targets, scored):
                per_token = model(**inputs).logits
        else:
            per_token = token_logps(model(**inputs).logits, targets)
    owner = torch.zeros_like(batch.seq_index)
    owner[:, :-1] = batch.seq_index[:, 1:]  # the sequence of the predicted token
    num_seqs = 2 * batch.num_pairs
    logps = torch.zeros(num_seqs, dtype=torch.float32, device=per_token.device)
    logps = logps.index_add(0, owner[scored], per_token[scored].float())
    counts = torch.bincount(owner[scored], minlength=num_seqs)
    return logps, counts
