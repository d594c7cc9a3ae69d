"""The loss family against TRL 1.16's own loss code, fed the same per-token log-probs.

TRL's `DPOTrainer._compute_loss` runs on a stand-in model whose forward returns given per-token
log-probs (as TRL's fused LM head would) and on precomputed reference log-probs; ours gets the
per-sequence sums of the same tensors. Loss and gradient (with respect to every per-token log-prob)
must agree to 1e-5 relative.
"""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from dpo_dist.commands import load_run_config
from dpo_dist.config import LossConfig
from dpo_dist.errors import UserError
from dpo_dist.model.logprobs import SequenceScores
from dpo_dist.training.losses import LOSSES, PairScores, preference_loss

B, T = 6, 12  # pairs, sequence length (prompt 3 tokens, then responses of different lengths)


class StandInModel(torch.nn.Module):
    """Returns fixed per-token outputs, as TRL's fused LM head (`fused_lm_head=True`) would."""

    def __init__(self, log_probs, log_sum_sq_probs):
        super().__init__()
        self.outputs = SimpleNamespace(log_probs=log_probs, log_sum_sq_probs=log_sum_sq_probs,
                                       entropy=torch.zeros_like(log_probs), mean_logits=torch.zeros_like(log_probs),
                                       is_top1=torch.zeros_like(log_probs, dtype=torch.bool), aux_loss=None)

    def forward(self, **kwargs):
        return self.outputs


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def make_inputs(seed: int = 0):
    """Completion mask [2B, T] (chosen rows, then rejected), per-token policy and reference
    log-probs and log Σp² on the shifted positions [2B, T-1], zero off the responses."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, T - 3, (2 * B,), generator=g)
    completion = torch.zeros(2 * B, T, dtype=torch.long)
    for row, n in enumerate(lengths.tolist()):
        completion[row, 3 : 3 + n] = 1
    shifted = completion[:, 1:].float()
    policy = -3 * torch.rand(2 * B, T - 1, generator=g) * shifted
    ref = policy.detach() + 0.4 * torch.randn(2 * B, T - 1, generator=g) * shifted
    log_sum_sq = -torch.rand(2 * B, T - 1, generator=g)
    return completion, policy, ref, log_sum_sq


def trl_loss(accelerator, cfg: LossConfig, completion, policy, ref, log_sum_sq):
    """TRL 1.16's loss of these inputs and its gradient with respect to `policy`."""
    from trl import DPOTrainer

    trainer = object.__new__(DPOTrainer)
    trainer.accelerator = accelerator
    trainer.beta, trainer.label_smoothing = cfg.beta, cfg.label_smoothing
    trainer.loss_types = [cfg.type] if isinstance(cfg.type, str) else cfg.type
    trainer.loss_weights = cfg.weights or [1.0] * len(trainer.loss_types)
    trainer.ld_alpha, trainer.use_weighting = cfg.ld_alpha, cfg.use_weighting
    trainer.f_divergence_type, trainer.f_alpha_divergence_coef = cfg.f_divergence_type, cfg.f_alpha_divergence_coef
    trainer.args = SimpleNamespace(discopop_tau=cfg.discopop_tau)
    trainer.precompute_ref_logps, trainer.aux_loss_enabled = True, False
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0
    leaf = policy.clone().requires_grad_()
    model = StandInModel(leaf * completion[:, 1:], log_sum_sq).eval()
    trainer.model = model
    ref_logps = _trl_ref_logps(ref, completion, cfg.ld_alpha)
    inputs = {"input_ids": torch.ones_like(completion), "attention_mask": torch.ones_like(completion),
              "completion_mask": completion, "ref_chosen_logps": ref_logps[:B], "ref_rejected_logps": ref_logps[B:]}
    loss = trainer._compute_loss(model, inputs, return_outputs=False)
    loss.backward()
    return loss.item(), leaf.grad


def _trl_ref_logps(ref, completion, ld_alpha):
    """Reference log-probs as TRL's `compute_ref_log_probs` reduces them (LD-DPO's shared/tail split)."""
    if ld_alpha is None:
        return ref.sum(1)
    mask = completion[:, 1:]
    position = mask.cumsum(1)
    shared = torch.minimum(*mask.sum(1).chunk(2)).repeat(2)[:, None]
    return (ref * ((position > 0) & (position <= shared))).sum(1) + ld_alpha * (ref * (position > shared)).sum(1)


def plain_sequence_scores(per_token, completion, log_sum_sq=None) -> SequenceScores:
    """Per-sequence sums of per-token log-probs, written out plainly."""
    mask = completion[:, 1:].float()
    tokens = mask.sum(1).long()
    shared_length = torch.minimum(*tokens.chunk(2)).repeat(2)
    rank = mask.cumsum(1)
    in_shared = mask * (rank <= shared_length[:, None])
    wpo = None
    if log_sum_sq is not None:
        wpo = ((per_token - log_sum_sq) * mask).sum(1).detach() / tokens
    return SequenceScores((per_token * mask).sum(1), tokens, (per_token * in_shared).sum(1), wpo)


def our_loss(cfg: LossConfig, completion, policy, ref, log_sum_sq):
    leaf = policy.clone().requires_grad_()
    scores = PairScores(plain_sequence_scores(leaf, completion, log_sum_sq if cfg.use_weighting else None),
                        plain_sequence_scores(ref, completion))
    loss = preference_loss(scores, cfg).losses.mean()
    loss.backward()
    return loss.item(), leaf.grad


CASES = [dict(type=name, label_smoothing=1e-3 if name == "exo_pair" else 0.0) for name in LOSSES] + [
    dict(type="robust", label_smoothing=0.1),
    dict(type="aot", label_smoothing=0.1),
    dict(type="aot_unpaired", label_smoothing=0.2),
    dict(type="exo_pair", label_smoothing=0.1, beta=0.5),
    dict(type=["sigmoid", "sft"], weights=[1.0, 0.5]),
    dict(type=["ipo", "bco_pair", "apo_zero"], weights=[0.3, 1.0, 2.0], beta=0.5),
    *[dict(type=["sigmoid", "ipo"], f_divergence_type=f) for f in ("forward_kl", "js_divergence", "alpha_divergence")],
    dict(type="sigmoid", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0),
    dict(type=["hinge", "discopop", "sigmoid_norm"], f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
    dict(type="sigmoid", use_weighting=True),
    dict(type=["nca_pair", "apo_down"], weights=[1.0, 0.5], use_weighting=True, ld_alpha=0.3),
    dict(type=["aot", "sft"], weights=[1.0, 0.2]),
    dict(type="sigmoid", ld_alpha=0.5),
    dict(type=["aot", "sppo_hard"], ld_alpha=0.0),
    dict(type="discopop", discopop_tau=0.5, beta=0.3),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_loss_and_gradient_equal_trl(accelerator, case):
    cfg = loss_cfg(**case)
    inputs = make_inputs()
    theirs, their_grad = trl_loss(accelerator, cfg, *inputs)
    ours, our_grad = our_loss(cfg, *inputs)
    assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-7)
    torch.testing.assert_close(our_grad, their_grad, rtol=1e-5, atol=1e-7)


def scores_of(policy_chosen, policy_rejected, ref_chosen, ref_rejected, tokens=None) -> PairScores:
    tokens = torch.full((2 * len(policy_chosen),), 10) if tokens is None else tokens
    policy = torch.cat([policy_chosen, policy_rejected])
    ref = torch.cat([ref_chosen, ref_rejected])
    return PairScores(SequenceScores(policy, tokens, policy), SequenceScores(ref, None, ref))


def loss_cfg(**keys) -> LossConfig:
    """The loss section of a run's config, checked as a run checks it."""
    return load_run_config(None, ["model.policy=x", "data.train=x"] + [f"loss.{k}={v}" for k, v in keys.items()]).loss


def test_cdpo_label_smoothing_and_rewards():
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (-20 * torch.rand(8, generator=g) for _ in range(4))
    out = preference_loss(scores_of(pc, pr, rc, rr), loss_cfg(beta=0.3, label_smoothing=0.2))
    h = 0.3 * ((pc - rc) - (pr - rr))
    torch.testing.assert_close(out.losses, -0.8 * torch.nn.functional.logsigmoid(h) - 0.2 * torch.nn.functional.logsigmoid(-h))
    torch.testing.assert_close(out.chosen_rewards, 0.3 * (pc - rc))
    torch.testing.assert_close(out.rejected_rewards, 0.3 * (pr - rr))


def test_sigmoid_at_equal_policy_and_reference_is_log2():
    g = torch.Generator().manual_seed(2)
    rc, rr = -20 * torch.rand(8, generator=g), -20 * torch.rand(8, generator=g)
    out = preference_loss(scores_of(rc, rr, rc, rr), loss_cfg())
    torch.testing.assert_close(out.losses, torch.full_like(out.losses, math.log(2)))
    assert out.chosen_rewards.abs().max() == 0


def test_reference_free_and_rpo():
    g = torch.Generator().manual_seed(3)
    pc, pr, rc, rr = (-20 * torch.rand(8, generator=g) for _ in range(4))
    out = preference_loss(scores_of(pc, pr, rc, rr), loss_cfg(beta=0.2, reference_free=True))
    torch.testing.assert_close(out.losses, -torch.nn.functional.logsigmoid(0.2 * (pc - pr)))
    base = preference_loss(scores_of(pc, pr, rc, rr), loss_cfg())
    rpo = preference_loss(scores_of(pc, pr, rc, rr), loss_cfg(rpo_alpha=0.5))
    torch.testing.assert_close(rpo.losses - base.losses, 0.5 * (-pc / 10))


def test_sft_parts_sum_to_the_step_token_mean():
    """Micro-batches given the step's pairs/tokens scale add up to the whole step's SFT mean."""
    g = torch.Generator().manual_seed(4)
    pc, pr = -20 * torch.rand(8, generator=g), -20 * torch.rand(8, generator=g)
    tokens = torch.randint(1, 30, (16,), generator=g)
    whole = preference_loss(scores_of(pc, pr, pc, pr, tokens), loss_cfg(type="sft")).losses.mean()
    scale = 8 / tokens[:8].sum()
    parts = [preference_loss(scores_of(pc[s], pr[s], pc[s], pr[s], torch.cat([tokens[:8][s], tokens[8:][s]])),
                             loss_cfg(type="sft"), sft_scale=scale).losses.sum() for s in (slice(0, 3), slice(3, 8))]
    torch.testing.assert_close(sum(parts) / 8, whole)
    torch.testing.assert_close(whole, -pc.sum() / tokens[:8].sum())


@pytest.mark.parametrize("keys,message", [
    ({"type": "sigmiod"}, "did you mean 'sigmoid'"),
    ({"type": "[sigmoid, sft]", "weights": "[1.0]"}, "loss.weights has 1 numbers for 2"),
    ({"type": "exo_pair"}, "needs loss.label_smoothing > 0"),
    ({"type": "bco_pair", "f_divergence_type": "js_divergence"}, "works only with loss types"),
    ({"type": "aot", "use_weighting": True}, "does not apply to aot"),
    ({"type": "[sigmoid, sft]", "use_weighting": True}, "does not apply to sft"),
    ({"type": "hinge", "label_smoothing": 0.1}, "label_smoothing applies to"),
    ({"ld_alpha": 1.5}, "ld_alpha must be in [0, 1]"),
    ({"f_divergence_type": "kl"}, "is not one of reverse_kl"),
])
def test_invalid_combinations_are_refused_with_the_reason(keys, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]").replace("'", ".")):
        loss_cfg(**keys)
