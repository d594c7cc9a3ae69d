"""Preference losses: TRL 1.16's family under its names and with its numbers, plus RPO and
reference-free. A new variant is a function of `Terms` plus an entry in LOSSES.

`loss.type` names one loss or several; the loss is Σ_k weight_k · mean over pairs of loss_k. Each
function returns the per-pair loss [B] (float32). Notation: ρ = log π(y|x) − log π_ref(y|x) per
response (w: chosen, l: rejected); s = the f-divergence's f'(e^ρ) (s = ρ for reverse KL, DPO);
δ = s_w − s_l; n = response tokens; ε = loss.label_smoothing. With `loss.ld_alpha`, log π of each
response is LD-DPO's (sum over the pair's shared length + α × the rest), for policy and reference.
The formulas are in the README's loss table.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dpo_dist.errors import UserError
from dpo_dist.model.logprobs import SequenceScores


@dataclass
class PairScores:
    """One micro-batch (or global batch) of pairs: the policy's and the reference's per-sequence
    scores ([2B]: chosen then rejected, see logprobs.SequenceScores)."""

    policy: SequenceScores
    ref: SequenceScores

    @property
    def num_pairs(self) -> int:
        return self.policy.logps.numel() // 2


@dataclass
class LossOutput:
    losses: torch.Tensor  # [B], per pair
    chosen_rewards: torch.Tensor  # [B], detached: β·ρ_w
    rejected_rewards: torch.Tensor  # [B], detached: β·ρ_l
    chosen_logps: torch.Tensor  # [B], detached: log π(y_w|x) as the loss saw it (LD-weighted if set)
    rejected_logps: torch.Tensor


@dataclass
class Terms:
    """What the loss functions read, [B] each."""

    beta: float
    eps: float
    discopop_tau: float
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor
    ref_rejected_logps: torch.Tensor
    chosen_scores: torch.Tensor
    rejected_scores: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    sft: torch.Tensor  # this pair's part of the SFT term: its mean over the step's pairs is the token-mean NLL

    @property
    def chosen_ratio(self) -> torch.Tensor:
        return self.chosen_logps - self.ref_chosen_logps

    @property
    def rejected_ratio(self) -> torch.Tensor:
        return self.rejected_logps - self.ref_rejected_logps

    @property
    def delta(self) -> torch.Tensor:
        return self.chosen_scores - self.rejected_scores


def _smoothed_logistic(h: torch.Tensor, eps: float) -> torch.Tensor:
    return -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)


def sigmoid(t: Terms) -> torch.Tensor:
    """DPO, Rafailov et al. 2023, eq. 7; ε > 0: conservative DPO (cDPO; TRL 1.16 ignores ε here)."""
    return _smoothed_logistic(t.beta * t.delta, t.eps)


def hinge(t: Terms) -> torch.Tensor:
    """SLiC-HF hinge, Zhao et al. 2023."""
    return torch.relu(1 - t.beta * t.delta)


def ipo(t: Terms) -> torch.Tensor:
    """IPO, Azar et al. 2023, eq. 17 (β is τ), per-token averaged scores as TRL does."""
    return (t.chosen_scores / t.chosen_tokens - t.rejected_scores / t.rejected_tokens - 1 / (2 * t.beta)) ** 2


def exo_pair(t: Terms) -> torch.Tensor:
    """EXO, Ji et al. 2024, eq. 16: KL from the smoothed label [1−ε, ε] to softmax(β·[s_w, s_l])."""
    h = t.beta * t.delta
    return (torch.sigmoid(h) * (F.logsigmoid(h) - math.log1p(-t.eps))
            + torch.sigmoid(-h) * (F.logsigmoid(-h) - math.log(t.eps)))


def nca_pair(t: Terms) -> torch.Tensor:
    """NCA, Chen et al. 2024 (noise-contrastive alignment), paired form."""
    rw, rl = t.beta * t.chosen_ratio, t.beta * t.rejected_ratio
    return -F.logsigmoid(rw) - 0.5 * F.logsigmoid(-rw) - 0.5 * F.logsigmoid(-rl)


def robust(t: Terms) -> torch.Tensor:
    """Robust DPO, Chowdhury et al. 2024, eq. 8 (ε: the assumed label-flip rate)."""
    h = t.beta * t.delta
    return (-(1 - t.eps) * F.logsigmoid(h) + t.eps * F.logsigmoid(-h)) / (1 - 2 * t.eps)


def bco_pair(t: Terms) -> torch.Tensor:
    """BCO, Jung et al. 2024, paired form as TRL 1.16 has it (no reward shift δ)."""
    return -F.logsigmoid(t.beta * t.chosen_ratio) - F.logsigmoid(-t.beta * t.rejected_ratio)


def sppo_hard(t: Terms) -> torch.Tensor:
    """SPPO, Wu et al. 2024, eq. 4.7 with hard win probabilities 1 / 0."""
    return (t.chosen_ratio - 0.5 / t.beta) ** 2 + (t.rejected_ratio + 0.5 / t.beta) ** 2


def aot(t: Terms) -> torch.Tensor:
    """AOT, Melnyk et al. 2024: the batch's sorted policy log-ratios against its sorted reference ones."""
    policy = torch.sort(t.chosen_logps - t.rejected_logps).values
    reference = torch.sort(t.ref_chosen_logps - t.ref_rejected_logps).values
    return _smoothed_logistic(t.beta * (policy - reference), t.eps)


def aot_unpaired(t: Terms) -> torch.Tensor:
    """AOT, Melnyk et al. 2024, unpaired: the batch's sorted chosen ρ against its sorted rejected ρ."""
    delta = torch.sort(t.chosen_ratio).values - torch.sort(t.rejected_ratio).values
    return _smoothed_logistic(t.beta * delta, t.eps)


def apo_zero(t: Terms) -> torch.Tensor:
    """APO-zero, D'Oosterlinck et al. 2024, eq. 7: raise the chosen, lower the rejected likelihood."""
    return 1 - torch.sigmoid(t.beta * t.chosen_ratio) + torch.sigmoid(t.beta * t.rejected_ratio)


def apo_down(t: Terms) -> torch.Tensor:
    """APO-down, D'Oosterlinck et al. 2024, eq. 8: lower both, the rejected more."""
    return torch.sigmoid(t.beta * t.chosen_ratio) + 1 - torch.sigmoid(t.beta * (t.chosen_ratio - t.rejected_ratio))


def discopop(t: Terms) -> torch.Tensor:
    """DiscoPOP, Chris Lu et al. 2024, eq. 5: logistic and exponential losses mixed by σ(βδ/τ)."""
    h = t.beta * t.delta
    mix = torch.sigmoid(h / t.discopop_tau)
    return -F.logsigmoid(h) * (1 - mix) + torch.exp(-h) * mix


def sft(t: Terms) -> torch.Tensor:
    """Negative log-likelihood of the chosen responses, averaged over the step's chosen tokens."""
    return t.sft


def sigmoid_norm(t: Terms) -> torch.Tensor:
    """DPO on per-token averaged scores (length-normalised DPO, as in SimPO's normalisation)."""
    return -F.logsigmoid(t.beta * (t.chosen_scores / t.chosen_tokens - t.rejected_scores / t.rejected_tokens))


LOSSES: dict[str, Callable[[Terms], torch.Tensor]] = {
    f.__name__: f for f in (sigmoid, hinge, ipo, exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot,
                            aot_unpaired, apo_zero, apo_down, discopop, sft, sigmoid_norm)
}
BATCH_COUPLED = ("aot", "aot_unpaired")  # sort the batch: computed over the step's global batch
F_DIVERGENCE_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
SMOOTHED = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def loss_types(cfg) -> list[str]:
    return [cfg.type] if isinstance(cfg.type, str) else list(cfg.type)


def couples_pairs(cfg) -> bool:
    """Whether a pair's loss depends on the other pairs of its step (the sorting losses)."""
    return any(t in BATCH_COUPLED for t in loss_types(cfg))


def check_loss_config(cfg) -> None:
    """Refuses what TRL 1.16 refuses (and unknown names, with the nearest one)."""
    types = loss_types(cfg)
    if not types:
        raise UserError("config: loss.type names no loss")
    for name in types:
        if name not in LOSSES:
            close = difflib.get_close_matches(name, LOSSES, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UserError(f"config: loss.type={name!r} is not one of {', '.join(LOSSES)}{hint}")
    if cfg.weights is not None and len(cfg.weights) != len(types):
        raise UserError(f"config: loss.weights has {len(cfg.weights)} numbers for {len(types)} loss type(s)")
    if cfg.f_divergence_type not in F_DIVERGENCES:
        raise UserError(f"config: loss.f_divergence_type={cfg.f_divergence_type!r} is not one of "
                        f"{', '.join(F_DIVERGENCES)}")
    if cfg.f_divergence_type != "reverse_kl" and not set(types) <= set(F_DIVERGENCE_TYPES):
        raise UserError(f"config: loss.f_divergence_type={cfg.f_divergence_type} works only with loss types "
                        f"{', '.join(F_DIVERGENCE_TYPES)} (the f-DPO reparameterisation cancels only in the "
                        f"chosen-rejected difference), not {', '.join(sorted(set(types) - set(F_DIVERGENCE_TYPES)))}")
    if cfg.use_weighting and set(types) & set(BATCH_COUPLED):
        raise UserError("config: loss.use_weighting (WPO) does not apply to aot / aot_unpaired: they sort the pairs, "
                        "which would misalign the per-pair weights")
    if cfg.use_weighting and "sft" in types:
        raise UserError("config: loss.use_weighting (WPO) does not apply to sft: its term is one mean over the "
                        "batch's tokens, not a per-pair loss (TRL 1.16 fails on this combination)")
    if not 0 <= cfg.label_smoothing < 0.5:
        raise UserError(f"config: loss.label_smoothing must be in [0, 0.5), got {cfg.label_smoothing}")
    if cfg.label_smoothing and not set(types) & set(SMOOTHED):
        raise UserError(f"config: loss.label_smoothing applies to {', '.join(SMOOTHED)}, not {', '.join(types)}")
    if "exo_pair" in types and cfg.label_smoothing == 0:
        raise UserError("config: loss.type exo_pair needs loss.label_smoothing > 0 (the EXO paper uses 1e-3)")
    if cfg.ld_alpha is not None and not 0 <= cfg.ld_alpha <= 1:
        raise UserError(f"config: loss.ld_alpha must be in [0, 1], got {cfg.ld_alpha}")
    if cfg.discopop_tau <= 0:
        raise UserError(f"config: loss.discopop_tau must be > 0, got {cfg.discopop_tau}")


def _f_prime(ratio: torch.Tensor, kind: str, alpha: float) -> torch.Tensor:
    """f'(e^ρ) of the f-divergence (f-DPO, Wang et al. 2023), as TRL 1.16 computes it."""
    if kind == "forward_kl":
        return 1 - torch.exp(-ratio)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(ratio)
    if kind == "alpha_divergence" and abs(alpha - 1.0) >= 1e-6:
        return (torch.exp(torch.clamp((alpha - 1.0) * ratio, max=80.0)) - 1.0) / (alpha - 1.0)
    return ratio  # reverse KL (and the α → 1 limit)


def _weighted(scores: SequenceScores, ld_alpha: float | None) -> torch.Tensor:
    """log π per sequence as the loss sees it: LD-DPO's shared part + α × the rest, or the sum."""
    if ld_alpha is None:
        return scores.logps
    return scores.shared_logps + ld_alpha * (scores.logps - scores.shared_logps)


def preference_loss(scores: PairScores, cfg, sft_scale: torch.Tensor | float | None = None) -> LossOutput:
    """Per-pair loss and implicit rewards of `scores` under the loss config `cfg` (config.LossConfig).

    sft_scale: pairs ÷ chosen response tokens of the step, so that the SFT parts of a micro-batch
    sum to its share of the step's token-mean NLL (TRL's SFT term); None: this batch's own.
    `rpo_alpha` adds α × each chosen response's mean token NLL."""
    policy_chosen, policy_rejected = _weighted(scores.policy, cfg.ld_alpha).chunk(2)
    ref_chosen, ref_rejected = _weighted(scores.ref, cfg.ld_alpha).chunk(2)
    if cfg.reference_free:
        ref_chosen, ref_rejected = torch.zeros_like(ref_chosen), torch.zeros_like(ref_rejected)
    tokens_chosen, tokens_rejected = scores.policy.tokens.float().clamp(min=1).chunk(2)
    raw_chosen = scores.policy.logps[: scores.num_pairs]
    if sft_scale is None:
        sft_scale = scores.num_pairs / scores.policy.tokens[: scores.num_pairs].sum().clamp(min=1)
    terms = Terms(
        beta=cfg.beta, eps=cfg.label_smoothing, discopop_tau=cfg.discopop_tau,
        chosen_logps=policy_chosen, rejected_logps=policy_rejected,
        ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected,
        chosen_scores=_f_prime(policy_chosen - ref_chosen, cfg.f_divergence_type, cfg.f_alpha_divergence_coef),
        rejected_scores=_f_prime(policy_rejected - ref_rejected, cfg.f_divergence_type, cfg.f_alpha_divergence_coef),
        chosen_tokens=tokens_chosen, rejected_tokens=tokens_rejected, sft=-raw_chosen * sft_scale,
    )
    types = loss_types(cfg)
    weights = cfg.weights or [1.0] * len(types)
    losses = sum(weight * LOSSES[name](terms) for name, weight in zip(types, weights))
    if cfg.use_weighting:  # WPO, Zhou et al. 2024, eq. 2: each pair weighted by its responses' probability
        wpo_chosen, wpo_rejected = torch.exp(scores.policy.wpo).chunk(2)
        losses = losses * (wpo_chosen * wpo_rejected)
    if cfg.rpo_alpha is not None:
        losses = losses + cfg.rpo_alpha * (-raw_chosen / tokens_chosen)
    return LossOutput(losses, cfg.beta * terms.chosen_ratio.detach(), cfg.beta * terms.rejected_ratio.detach(),
                      policy_chosen.detach(), policy_rejected.detach())
