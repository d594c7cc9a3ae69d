"""Per-sequence response log-probabilities: the one scoring function for policy and reference.

Scoring both models with the same code and dtype is what makes step-0 rewards exactly zero when
the policy starts from the reference.
"""

from __future__ import annotations

import torch

from dpo_dist.batching import MicroBatch


def token_logps(logits: torch.Tensor, targets: torch.Tensor, rows_per_chunk: int = 4) -> torch.Tensor:
    """log softmax(logits)[target] per position, in float32, a few rows at a time.

    logits: [N, T, V] (any float dtype), targets: [N, T] -> [N, T] float32. Chunking over rows keeps
    the float32 copy of the logits to `rows_per_chunk` rows, not the whole batch.
    """
    out = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
    for start in range(0, logits.shape[0], rows_per_chunk):
        chunk = logits[start : start + rows_per_chunk].float()
        picked = chunk.gather(-1, targets[start : start + rows_per_chunk].unsqueeze(-1)).squeeze(-1)
        out[start : start + rows_per_chunk] = picked - torch.logsumexp(chunk, dim=-1)
    return out


def sequence_logps(model: torch.nn.Module, batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of response-token log-probs per row, and the response token count per row.

    One forward pass over chosen and rejected rows together. Returns ([2B] float32, [2B] int64);
    rows 0..B-1 are the chosen responses, B..2B-1 the rejected ones.
    """
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    # The logit at position t predicts token t+1.
    per_token = token_logps(logits[:, :-1], batch.input_ids[:, 1:])
    mask = batch.response_mask[:, 1:]
    logps = (per_token * mask).sum(dim=-1)
    return logps, mask.sum(dim=-1)
