"""The preference losses (`losses.DPO_LOSSES`, `dpo_loss`) against hand-worked numbers, and their margins at the start.

Two pairs, beta = 0.5 unless a test says otherwise:

    pair  chosen  rejected  ref_chosen  ref_rejected  n_chosen  n_rejected   h = (c - rc) - (r - rr)
    0     -1.0    -3.0      -2.0        -2.0          2         4             1 - (-1) = 2
    1     -4.0    -2.5      -3.0        -3.0          3         1             -1 - 0.5 = -1.5

so beta h = 1 and -0.75. Each expected value below is worked from these in a comment; `softplus(x) = log(1 + e^x)`
= -logsigmoid(-x).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from rlhf_lightning.losses import (
    DPO_LOSSES,
    REFERENCE_FREE_LOSSES,
    PairLogps,
    chosen_nll,
    dpo_loss,
    dpo_robust_loss,
    dpo_sigmoid_loss,
    implicit_rewards,
    ipo_loss,
    log1mexp,
    orpo_loss,
    simpo_loss,
    slic_hinge_loss,
)

# -logsigmoid(x) = softplus(-x), by hand from the exponential
SP_M1 = math.log(1 + math.exp(-1.0))  # -logsigmoid(1) = 0.313262
SP_1 = math.log(1 + math.exp(1.0))  # -logsigmoid(-1) = 1.313262
SP_075 = math.log(1 + math.exp(0.75))  # -logsigmoid(-0.75) = 1.136871
SP_M075 = math.log(1 + math.exp(-0.75))  # -logsigmoid(0.75) = 0.386871


def pairs(dtype=torch.float64) -> PairLogps:
    t = lambda *x: torch.tensor(x, dtype=dtype)  # noqa: E731
    return PairLogps(t(-1.0, -4.0), t(-3.0, -2.5), t(2.0, 3.0), t(4.0, 1.0), t(-2.0, -3.0), t(-2.0, -3.0))


def close(actual: torch.Tensor, expected: float) -> None:
    # float64 inputs: the only error is the last bits of exp/log
    assert_close(actual, torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=1e-12)


def test_sigmoid_is_dpo_and_label_smoothing_is_cdpo():
    close(dpo_sigmoid_loss(pairs(), 0.5), (SP_M1 + SP_075) / 2)  # 0.725066
    # cDPO, eps = 0.2: 0.8 softplus(-beta h) + 0.2 softplus(beta h) per pair
    close(dpo_sigmoid_loss(pairs(), 0.5, label_smoothing=0.2), (0.8 * SP_M1 + 0.2 * SP_1 + 0.8 * SP_075 + 0.2 * SP_M075) / 2)
    assert float(dpo_sigmoid_loss(pairs(), 0.5, label_smoothing=0.2)) == pytest.approx(0.750066, abs=1e-6)


def test_robust_subtracts_the_flipped_term_and_rescales():
    # (0.8 softplus(-beta h) - 0.2 softplus(beta h)) / (1 - 0.4) per pair: pair 0 goes slightly negative
    expected = ((0.8 * SP_M1 - 0.2 * SP_1) / 0.6 + (0.8 * SP_075 - 0.2 * SP_M075) / 0.6) / 2
    close(dpo_robust_loss(pairs(), 0.5, label_smoothing=0.2), expected)
    assert expected == pytest.approx((-0.020072 + 1.386871) / 2, abs=1e-6)
    close(dpo_robust_loss(pairs(), 0.5), (SP_M1 + SP_075) / 2)  # eps = 0: plain DPO


def test_ipo_averages_each_log_ratio_over_its_tokens_before_squaring():
    # pair 0: 1/2 - (-1)/4 - 1/(2 * 0.5) = -0.25 -> 0.0625; pair 1: -1/3 - 0.5/1 - 1 = -11/6 -> 121/36
    close(ipo_loss(pairs(), 0.5), (0.0625 + 121 / 36) / 2)  # 1.711806


def test_hinge_is_slic_on_the_log_ratios():
    close(slic_hinge_loss(pairs(), 0.5), (max(0.0, 1 - 1.0) + (1 + 0.75)) / 2)  # (0 + 1.75) / 2


def test_simpo_is_reference_free_length_normalized_with_a_margin():
    # z = beta (c / n_c - r / n_r) - gamma, gamma = 0.3: pair 0: 0.5 (-0.5 + 0.75) - 0.3 = -0.175;
    # pair 1: 0.5 (-4/3 + 2.5) - 0.3 = 0.283333
    no_ref = pairs()._replace(ref_chosen=None, ref_rejected=None)
    expected = (math.log(1 + math.exp(0.175)) + math.log(1 + math.exp(-(0.5 * (-4 / 3 + 2.5) - 0.3)))) / 2
    close(simpo_loss(no_ref, 0.5, gamma=0.3), expected)
    assert expected == pytest.approx((0.784470 + 0.561482) / 2, abs=1e-6)


def test_orpo_is_chosen_nll_plus_beta_times_the_odds_ratio_loss():
    # length-normalized l: pair 0 chosen -0.5, rejected -0.75; pair 1 chosen -4/3, rejected -2.5
    # log odds(l) = l - log(1 - e^l); NLL = (1 + 4) / (2 + 3) = 1
    def log_odds(l: float) -> float:
        return l - math.log(1 - math.exp(l))

    ratio0 = math.log(1 + math.exp(-(log_odds(-0.5) - log_odds(-0.75))))  # 0.457913
    ratio1 = math.log(1 + math.exp(-(log_odds(-4 / 3) - log_odds(-2.5))))  # 0.223004
    no_ref = pairs()._replace(ref_chosen=None, ref_rejected=None)
    close(orpo_loss(no_ref, 0.5), 1.0 + 0.5 * (ratio0 + ratio1) / 2)
    assert 1.0 + 0.5 * (ratio0 + ratio1) / 2 == pytest.approx(1.170229, abs=1e-6)


def test_log1mexp_is_accurate_on_both_branches():
    x = torch.tensor([-1e-10, -0.5, -0.7, -30.0], dtype=torch.float64)
    # near 0 log(1 - e^x) is log(-expm1(x)) (1 - e^x would cancel); far out it is about -e^x
    expected = torch.tensor([math.log(-math.expm1(-1e-10)), math.log(-math.expm1(-0.5)), math.log1p(-math.exp(-0.7)), -math.exp(-30.0)], dtype=torch.float64)
    assert_close(log1mexp(x), expected, rtol=1e-12, atol=0)


def test_chosen_nll_weights_and_rpo_alpha():
    close(chosen_nll(pairs()), 1.0)  # (1 + 4) / (2 + 3)
    out = dpo_loss(pairs(), ["sigmoid", "hinge"], beta=0.5, loss_weights=[1.0, 0.5], nll_alpha=0.2)
    close(out.loss, (SP_M1 + SP_075) / 2 + 0.5 * 0.875 + 0.2 * 1.0)
    close(out.nll, 1.0)
    assert not out.chosen_rewards.requires_grad
    close(dpo_loss(pairs(), "ipo", beta=0.5).loss, (0.0625 + 121 / 36) / 2)  # a single name, weight 1


def test_implicit_rewards_with_and_without_a_reference():
    chosen, rejected = implicit_rewards(pairs(), 0.5, reference_free=False)
    assert chosen.tolist() == [0.5, -0.5] and rejected.tolist() == [-0.5, 0.25]  # 0.5 (c - rc), 0.5 (r - rr)
    chosen, rejected = implicit_rewards(pairs(), 0.5, reference_free=True)
    assert chosen.tolist() == pytest.approx([-0.25, -2 / 3]) and rejected.tolist() == [-0.375, -1.25]  # 0.5 logp / n
    out = dpo_loss(pairs()._replace(ref_chosen=None, ref_rejected=None), ["simpo", "orpo"], beta=0.5)
    assert out.chosen_rewards.tolist() == pytest.approx([-0.25, -2 / 3])  # all reference-free: normalized log-probs


@pytest.mark.parametrize("name", sorted(set(DPO_LOSSES) - REFERENCE_FREE_LOSSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_margins_are_exactly_zero_when_the_policy_is_the_reference(name, dtype):
    g = torch.Generator().manual_seed(0)
    chosen, rejected = -10 * torch.rand(5, generator=g).to(dtype), -10 * torch.rand(5, generator=g).to(dtype)
    tokens = torch.randint(1, 6, (5,), generator=g).to(dtype)
    logps = PairLogps(chosen, rejected, tokens, tokens.flip(0), chosen.clone(), rejected.clone())
    out = dpo_loss(logps, name, beta=0.3)
    assert torch.equal(out.chosen_rewards - out.rejected_rewards, torch.zeros(5, dtype=dtype))
    assert torch.equal(out.chosen_rewards, torch.zeros(5, dtype=dtype))
    # and each loss sits at its value for a zero margin
    at_zero = {"sigmoid": math.log(2), "robust": math.log(2), "hinge": 1.0, "ipo": (1 / 0.6) ** 2}[name]
    assert float(DPO_LOSSES[name](logps, 0.3)) == pytest.approx(at_zero, rel=1e-2 if dtype == torch.bfloat16 else 1e-6)


def test_gradients_push_chosen_up_and_rejected_down():
    logps = pairs(torch.float32)
    chosen, rejected = logps.chosen.clone().requires_grad_(), logps.rejected.clone().requires_grad_()
    for name in DPO_LOSSES:
        dpo_loss(logps._replace(chosen=chosen, rejected=rejected), name, beta=0.5).loss.backward()
        assert (chosen.grad <= 0).all() and (rejected.grad >= 0).all(), name  # descent raises chosen, lowers rejected
        chosen.grad = rejected.grad = None


def test_bad_names_and_weights_are_refused():
    with pytest.raises(ValueError, match="unknown preference loss 'kto'"):
        dpo_loss(pairs(), ["sigmoid", "kto"])
    with pytest.raises(ValueError, match="loss_weights has 1 entries for 2 loss types"):
        dpo_loss(pairs(), ["sigmoid", "ipo"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="needs the reference"):
        dpo_loss(pairs()._replace(ref_chosen=None, ref_rejected=None), "sigmoid")
