"""Each loss against a plain re-implementation of its formula, one pair at a time in float64 math."""

import math

import pytest
import torch

from dpo_dist.losses import PairScores, preference_loss


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def plain_loss(kind, pc, pr, rc, rr, nc, nr, beta, eps):
    h = beta * ((pc - rc) - (pr - rr))
    if kind == "sigmoid":
        return -(1 - eps) * logsig(h) - eps * logsig(-h)
    if kind == "robust":
        return (-(1 - eps) * logsig(h) + eps * logsig(-h)) / (1 - 2 * eps)
    if kind == "hinge":
        return max(0.0, 1 - h)
    if kind == "ipo":
        return ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2
    raise ValueError(kind)


@pytest.fixture
def scores():
    g = torch.Generator().manual_seed(0)
    n = 16
    return PairScores(
        policy_chosen=-20 * torch.rand(n, generator=g),
        policy_rejected=-20 * torch.rand(n, generator=g),
        ref_chosen=-20 * torch.rand(n, generator=g),
        ref_rejected=-20 * torch.rand(n, generator=g),
        chosen_tokens=torch.randint(1, 30, (n,), generator=g),
        rejected_tokens=torch.randint(1, 30, (n,), generator=g),
    )


@pytest.mark.parametrize("kind,eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("robust", 0.1), ("hinge", 0.0),
                                      ("ipo", 0.0)])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_loss_matches_formula(scores, kind, eps, beta):
    out = preference_loss(scores, loss_type=kind, beta=beta, label_smoothing=eps)
    for i in range(len(out.losses)):
        args = [float(t[i]) for t in (scores.policy_chosen, scores.policy_rejected, scores.ref_chosen,
                                      scores.ref_rejected, scores.chosen_tokens, scores.rejected_tokens)]
        assert out.losses[i].item() == pytest.approx(plain_loss(kind, *args, beta, eps), rel=1e-5, abs=1e-6)


def test_rewards_are_beta_times_log_ratios(scores):
    out = preference_loss(scores, beta=0.3)
    torch.testing.assert_close(out.chosen_rewards, 0.3 * (scores.policy_chosen - scores.ref_chosen))
    torch.testing.assert_close(out.rejected_rewards, 0.3 * (scores.policy_rejected - scores.ref_rejected))


def test_sigmoid_at_equal_policy_and_reference_is_log2(scores):
    same = PairScores(scores.ref_chosen, scores.ref_rejected, scores.ref_chosen, scores.ref_rejected,
                      scores.chosen_tokens, scores.rejected_tokens)
    out = preference_loss(same, beta=0.1)
    torch.testing.assert_close(out.losses, torch.full_like(out.losses, math.log(2)))
    assert out.chosen_rewards.abs().max() == 0


def test_reference_free_ignores_reference(scores):
    out = preference_loss(scores, beta=0.2, reference_free=True)
    h = 0.2 * (scores.policy_chosen - scores.policy_rejected)
    torch.testing.assert_close(out.losses, -torch.nn.functional.logsigmoid(h))


def test_rpo_adds_chosen_token_nll(scores):
    base = preference_loss(scores, beta=0.1)
    rpo = preference_loss(scores, beta=0.1, rpo_alpha=0.5)
    nll = -scores.policy_chosen / scores.chosen_tokens
    torch.testing.assert_close(rpo.losses - base.losses, 0.5 * nll)


def test_gradient_of_sigmoid_matches_closed_form(scores):
    pc = scores.policy_chosen.clone().requires_grad_(True)
    s = PairScores(pc, scores.policy_rejected, scores.ref_chosen, scores.ref_rejected,
                   scores.chosen_tokens, scores.rejected_tokens)
    out = preference_loss(s, beta=0.1)
    out.losses.sum().backward()
    h = 0.1 * ((pc - scores.ref_chosen) - (scores.policy_rejected - scores.ref_rejected)).detach()
    # d/dpc of -log σ(h) = -β σ(-h)   (DPO paper, eq. 7 gradient)
    torch.testing.assert_close(pc.grad, -0.1 * torch.sigmoid(-h))
