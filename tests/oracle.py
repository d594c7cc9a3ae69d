"""The independent oracle the log-prob tests compare against: a plain transformers forward of one
sequence, unpadded, and the sum of its response tokens' log-probabilities in float64."""

import torch

from dpo_dist.data import Sequence


def naive_logp(model, seq: Sequence, first: int | None = None) -> float:
    """Sum of log p(token | prefix) over the response tokens of one sequence (only its `first`
    ones if given), no padding, float64."""
    ids = torch.as_tensor(seq.ids, dtype=torch.long)[None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    positions = range(max(seq.response_start, 1), len(seq.ids))
    return sum(logp[t - 1, seq.ids[t]].item() for t in list(positions)[:first])
