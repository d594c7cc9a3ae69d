"""Per-pair preference losses. Pure functions of log-probs; a new variant = a function + an entry.

All tensors are [B] float32. With h = β·[(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))]:
  sigmoid  −(1−ε)·log σ(h) − ε·log σ(−h)               DPO (Rafailov et al. 2023, eq. 7); ε>0 is cDPO
  robust   [−(1−ε)·log σ(h) + ε·log σ(−h)] / (1−2ε)     robust DPO (Chowdhury et al. 2024, eq. 8)
  hinge    max(0, 1 − h)                                 SLiC (Zhao et al. 2023)
  ipo      (Δ/len − 1/(2β))²                             IPO (Azar et al. 2023, eq. 17), each log-ratio
                                                         divided by its response length, as TRL does
Implicit rewards are β·(log π − log π_ref) of each response (unnormalised for every type).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PairScores:
    """Summed response log-probs of one micro-batch, [B] each."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


@dataclass
class LossOutput:
    losses: torch.Tensor  # [B], per pair
    chosen_rewards: torch.Tensor  # [B], detached
    rejected_rewards: torch.Tensor  # [B], detached


def sigmoid_loss(chosen_ratio, rejected_ratio, s: PairScores, beta: float, eps: float) -> torch.Tensor:
    h = beta * (chosen_ratio - rejected_ratio)
    return -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)


def robust_loss(chosen_ratio, rejected_ratio, s: PairScores, beta: float, eps: float) -> torch.Tensor:
    h = beta * (chosen_ratio - rejected_ratio)
    return (-(1 - eps) * F.logsigmoid(h) + eps * F.logsigmoid(-h)) / (1 - 2 * eps)


def hinge_loss(chosen_ratio, rejected_ratio, s: PairScores, beta: float, eps: float) -> torch.Tensor:
    return torch.relu(1 - beta * (chosen_ratio - rejected_ratio))


def ipo_loss(chosen_ratio, rejected_ratio, s: PairScores, beta: float, eps: float) -> torch.Tensor:
    delta = chosen_ratio / s.chosen_tokens.clamp(min=1) - rejected_ratio / s.rejected_tokens.clamp(min=1)
    return (delta - 1 / (2 * beta)) ** 2


LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "sigmoid": sigmoid_loss,
    "robust": robust_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
}


def preference_loss(
    scores: PairScores,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    rpo_alpha: float | None = None,
    reference_free: bool = False,
) -> LossOutput:
    """Per-pair loss and implicit rewards. `rpo_alpha` adds α × the chosen response's mean token NLL."""
    ref_chosen, ref_rejected = scores.ref_chosen, scores.ref_rejected
    if reference_free:
        ref_chosen, ref_rejected = torch.zeros_like(ref_chosen), torch.zeros_like(ref_rejected)
    chosen_ratio = scores.policy_chosen - ref_chosen
    rejected_ratio = scores.policy_rejected - ref_rejected
    losses = LOSSES[loss_type](chosen_ratio, rejected_ratio, scores, beta, label_smoothing)
    if rpo_alpha is not None:
        losses = losses + rpo_alpha * (-scores.policy_chosen / scores.chosen_tokens.clamp(min=1))
    return LossOutput(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())
