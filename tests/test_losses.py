"""Loss, advantage, KL and KL-controller functions against hand-worked numbers."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from rlhf_lightning.kl_control import (
    AdaptiveKLController,
    FixedKLController,
    make_kl_controller,
)
from rlhf_lightning.losses import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    batch_mean,
    batch_whiten,
    bradley_terry_loss,
    clipped_surrogate,
    compute_advantages,
    entropy_from_logits,
    group_mean,
    group_whiten,
    kl_in_reward,
    kl_k1,
    kl_k3,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    pairwise_accuracy,
    ppo_loss,
    rloo,
    token_logprobs,
)

NAN = float("nan")
INF = float("inf")
LOG3 = math.log(3.0)


def t(x, **kw) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32, **kw)


# --------------------------------------------------------------------------- masking


def test_masked_sum_ignores_nan_outside_mask():
    assert_close(masked_sum(t([1.0, 2.0, NAN, 4.0]), torch.tensor([1, 1, 0, 1])), t(7.0))
    vals = t([[1.0, INF], [3.0, 5.0]])
    mask = torch.tensor([[True, False], [True, True]])
    assert_close(masked_sum(vals, mask, dim=1), t([1.0, 8.0]))


def test_masked_mean_bool_and_float_mask():
    vals = t([1.0, 2.0, NAN, 4.0])
    # (1 + 2 + 4) / 3
    assert_close(masked_mean(vals, torch.tensor([True, True, False, True])), t(7.0 / 3.0))
    assert_close(masked_mean(vals, t([1.0, 1.0, 0.0, 1.0])), t(7.0 / 3.0))


def test_masked_mean_with_total():
    vals = t([1.0, 2.0, NAN, 4.0])
    mask = torch.tensor([1, 1, 0, 1])
    assert_close(masked_mean(vals, mask, total=7), t(1.0))  # 7 / 7
    assert_close(masked_mean(vals, mask, total=t(14.0)), t(0.5))  # 7 / 14


def test_masked_mean_dim_and_empty_row():
    vals = t([[1.0, 2.0], [3.0, NAN]])
    mask = torch.tensor([[1, 1], [0, 0]])
    # row 0: (1 + 2) / 2; row 1 has no valid token -> 0 / max(0, 1) = 0
    assert_close(masked_mean(vals, mask, dim=1), t([1.5, 0.0]))
    # empty mask overall -> 0, not NaN
    assert_close(masked_mean(t([NAN]), torch.tensor([0])), t(0.0))


# --------------------------------------------------------------------------- log-probs


def test_logprobs_from_logits():
    logits = t([[[0.0, LOG3], [0.0, LOG3]]])  # softmax = [0.25, 0.75]
    targets = torch.tensor([[1, 0]])
    assert_close(logprobs_from_logits(logits, targets), t([[-0.2876821, -1.3862944]]))
    # temperature 2: logits [0, log(3)/2] -> softmax [1/(1+sqrt3), sqrt3/(1+sqrt3)]
    assert_close(
        logprobs_from_logits(logits, targets, temperature=2.0), t([[-0.4557464, -1.0050525]])
    )


def test_logprobs_from_logits_bf16_returns_float32():
    out = logprobs_from_logits(t([[[0.0, LOG3]]]).bfloat16(), torch.tensor([[1]]))
    assert out.dtype == torch.float32
    assert_close(out, t([[-0.2876821]]), atol=1e-2, rtol=0)


def test_entropy_from_logits():
    logits = torch.stack([t([0.0, 0.0, 0.0, 0.0]), t([0.0, LOG3, -INF, -INF])])[None]  # (1, 2, 4)
    # uniform over 4 -> log 4; [0.25, 0.75, 0, 0] -> 0.25 log 4 + 0.75 log(4/3)
    assert_close(entropy_from_logits(logits), t([[1.3862944, 0.5623351]]))


class TableModel(nn.Module):
    """Logits at position t depend only on token t: row ``table[token]``."""

    def __init__(self) -> None:
        super().__init__()
        # after token 0: p = [0.25, 0.75]; after token 1: p = [0.5, 0.5]
        self.table = t([[0.0, LOG3], [0.0, 0.0]])
        self.calls = 0
        self.seen_mask = None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.seen_mask = attention_mask
        return self.table[input_ids]  # (B, T, V)


def test_token_logprobs_against_hand_values():
    model = TableModel()
    ids = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 1]])
    attn = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    out = token_logprobs(model, ids, attn)
    expected = t(
        [
            # 0 | p(1|0)=.75 | p(1|1)=.5 | p(0|1)=.5
            [0.0, -0.2876821, -0.6931472, -0.6931472],
            # 0 | p(0|1)=.5 | p(0|0)=.25 | p(1|0)=.75
            [0.0, -0.6931472, -1.3862944, -0.2876821],
        ]
    )
    assert_close(out, expected)
    assert model.calls == 1
    assert torch.equal(model.seen_mask, attn)


# --------------------------------------------------------------------------- reward model


def test_bradley_terry_loss():
    assert_close(bradley_terry_loss(t([1.0, -2.0]), t([1.0, -2.0])), t(0.6931472))  # log 2
    # diff 1: log(1 + e^-1)
    assert_close(bradley_terry_loss(t([1.0]), t([0.0])), t(0.3132617))
    # margin is subtracted: 1 - 0 - 1 = 0 -> log 2 (adding it would give 0.1269)
    assert_close(bradley_terry_loss(t([1.0]), t([0.0]), margin=t([1.0])), t(0.6931472))


def test_pairwise_accuracy_ties_are_wrong():
    assert_close(pairwise_accuracy(t([1.0, 2.0, 3.0]), t([0.0, 2.0, 4.0])), t(1.0 / 3.0))


# --------------------------------------------------------------------------- advantages


def test_batch_mean():
    # mean 0.25
    assert_close(batch_mean(t([1.0, 0.0, 0.0, 0.0]), 2), t([0.75, -0.25, -0.25, -0.25]))


def test_batch_whiten_population_std():
    # mean 0.25, population std sqrt((0.5625 + 3 * 0.0625) / 4) = sqrt(0.1875) = 0.4330127
    assert_close(
        batch_whiten(t([1.0, 0.0, 0.0, 0.0]), 2), t([1.7320508, -0.5773503, -0.5773503, -0.5773503])
    )
    # constant rewards: std 0 -> eps, centred values 0 -> zeros
    assert_close(batch_whiten(t([2.0, 2.0]), 1), t([0.0, 0.0]))
    # eps is a floor on the std, not an offset: std 0.5 < eps 2 -> divide by 2
    assert_close(batch_whiten(t([1.0, 0.0]), 1, eps=2.0), t([0.25, -0.25]))


def test_group_mean():
    assert_close(group_mean(t([1.0, 0.0, 0.0, 1.0]), 2), t([0.5, -0.5, -0.5, 0.5]))
    assert_close(group_mean(t([1.0, 0.0, 0.0, 0.0]), 2), t([0.5, -0.5, 0.0, 0.0]))


def test_group_whiten_unbiased_group_std():
    # group [1, 0]: mean 0.5, unbiased std sqrt(0.5) = 0.7071068 -> 0.5 / (0.7071068 + 1e-6)
    out = group_whiten(t([1.0, 0.0, 0.0, 1.0]), 2)
    assert_close(out, t([0.7071058, -0.7071058, -0.7071058, 0.7071058]))
    assert_close(group_whiten(t([2.0, 2.0]), 2), t([0.0, 0.0]))
    # eps is added to the std: 0.5 / (0.7071068 + 0.5)
    assert_close(group_whiten(t([1.0, 0.0]), 2, eps=0.5), t([0.4142136, -0.4142136]))


def test_rloo():
    assert_close(rloo(t([3.0, 0.0, 0.0]), 3), t([3.0, -1.5, -1.5]))
    # second group [1, 1, 4]: 1 - 2.5, 1 - 2.5, 4 - 1
    assert_close(rloo(t([3.0, 0.0, 0.0, 1.0, 1.0, 4.0]), 3), t([3.0, -1.5, -1.5, -1.5, -1.5, 3.0]))


@pytest.mark.parametrize("name", sorted(ADVANTAGE_ESTIMATORS))
def test_advantages_reject_bad_layout(name):
    with pytest.raises(ValueError):
        compute_advantages(name, t([1.0, 2.0, 3.0]), 2)


def test_small_groups_rejected():
    with pytest.raises(ValueError, match="group_size"):
        rloo(t([1.0, 2.0]), 1)
    with pytest.raises(ValueError, match="group_size"):
        group_whiten(t([1.0, 2.0]), 1)


def test_compute_advantages_registry():
    names = {"batch_mean", "batch_whiten", "group_mean", "group_whiten", "rloo"}
    assert set(ADVANTAGE_ESTIMATORS) == names
    out = compute_advantages("group_mean", t([1.0, 0.0, 0.0, 1.0]), 2)
    assert_close(out, t([0.5, -0.5, -0.5, 0.5]))
    with pytest.raises(ValueError, match="rloo"):
        compute_advantages("nope", t([1.0, 0.0]), 2)


# --------------------------------------------------------------------------- KL


def test_kl_estimators_known_values():
    logp = t([[0.0, 0.6931472, -1.0]])
    ref = t([[0.6931472, 0.0, -1.0]])
    assert_close(kl_k1(logp, ref), t([[-0.6931472, 0.6931472, 0.0]]))
    # k3 = e^(ref-logp) - (ref-logp) - 1: 2 - log2 - 1; 0.5 + log2 - 1; 0
    k3 = kl_k3(logp, ref)
    assert_close(k3, t([[0.3068528, 0.1931472, 0.0]]))
    assert (k3 >= 0).all()
    assert_close(kl_penalty("k3", logp, ref), k3)
    assert set(KL_ESTIMATORS) == {"k1", "k3"}
    with pytest.raises(ValueError, match="k1"):
        kl_penalty("k2x", logp, ref)


def test_kl_in_reward():
    rewards = t([1.0, 2.0])
    kl = t([[0.1, 0.2, NAN], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # 1 - 0.5 * 0.3 = 0.85; 2 - 0.5 * 1.5 = 1.25
    assert_close(kl_in_reward(rewards, kl, mask, beta=0.5), t([0.85, 1.25]))


# --------------------------------------------------------------------------- PPO


def test_clipped_surrogate_token_advantages_and_clip_flags():
    ratio = t([[1.5, 0.5, 0.7]])
    logp, old = torch.log(ratio), torch.zeros(1, 3)
    adv = t([[1.0, 1.0, -1.0]])
    obj, r, clipped = clipped_surrogate(logp, old, adv, 0.2)
    # min(1.5, 1.2) = 1.2 clipped; min(0.5, 0.8) = 0.5 not clipped (|rho-1| > eps but not binding);
    # min(-0.7, -0.8) = -0.8 clipped
    assert_close(obj, t([[1.2, 0.5, -0.8]]))
    assert_close(r, ratio)
    assert clipped.tolist() == [[True, False, True]]


def _ppo_inputs():
    """2x3 batch; token [1, 2] is masked and NaN everywhere."""
    rho = [[1.0, 1.5, 0.5], [1.1, 0.5, NAN]]
    d = [[0.1, 0.2, 0.3], [0.0, -0.1, NAN]]  # logp - ref_logp
    logp = t([[-1.0, -1.0, -1.0], [-1.0, -1.0, NAN]], requires_grad=True)
    old = logp.detach() - torch.log(t(rho))
    ref = logp.detach() - t(d)
    adv = t([1.0, -1.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return logp, old, ref, adv, mask


def test_ppo_loss_hand_example():
    logp, old, ref, adv, mask = _ppo_inputs()
    out = ppo_loss(logp, old, ref, adv, mask, clip_eps=0.2, beta=0.5)
    # Surrogate min(rho*A, clip(rho, 0.8, 1.2)*A) on the 5 valid tokens:
    #   row 0, A=+1: rho 1.0 -> 1.0 | rho 1.5 -> min(1.5, 1.2) = 1.2 (clipped)
    #                | rho 0.5 -> min(0.5, 0.8) = 0.5
    #   row 1, A=-1: rho 1.1 -> -1.1 | rho 0.5 -> min(-0.5, -0.8) = -0.8 (clipped)
    #   sum = 1.0 + 1.2 + 0.5 - 1.1 - 0.8 = 0.8 -> policy_loss = -0.8 / 5 = -0.16
    # k1 KL: (0.1 + 0.2 + 0.3 + 0.0 - 0.1) / 5 = 0.1
    # loss = -0.16 + 0.5 * 0.1 = -0.11
    # clipfrac = 2 / 5 = 0.4
    # approx_kl = mean of (rho-1) - log rho:
    #   0 + (0.5 - log 1.5) + (-0.5 + log 2) + (0.1 - log 1.1) + (-0.5 + log 2)
    #   = 0 + 0.0945349 + 0.1931472 + 0.0046898 + 0.1931472 = 0.4855191 -> / 5 = 0.0971038
    assert_close(out.policy_loss, t(-0.16))
    assert_close(out.kl, t(0.1))
    assert_close(out.loss, t(-0.11))
    assert_close(out.clipfrac, t(0.4))
    assert_close(out.approx_kl, t(0.0971038))


def test_ppo_loss_gradients_clean_and_zero_where_clipped():
    logp, old, ref, adv, mask = _ppo_inputs()
    ppo_loss(logp, old, ref, adv, mask, clip_eps=0.2, beta=0.0).loss.backward()
    # d(-rho*A/5)/dlogp = -rho*A/5 on unclipped tokens, 0 on clipped and masked ones
    expected = t([[-0.2, 0.0, -0.1], [0.22, 0.0, 0.0]])
    assert_close(logp.grad, expected)


def test_ppo_loss_beta_zero_still_reports_kl_and_total_tokens():
    logp, old, ref, adv, mask = _ppo_inputs()
    out = ppo_loss(logp, old, ref, adv, mask, clip_eps=0.2, beta=0.0)
    assert_close(out.kl, t(0.1))
    assert_close(out.loss, t(-0.16))
    # divide by a global token count of 10 instead of the local 5
    out = ppo_loss(logp, old, ref, adv, mask, clip_eps=0.2, beta=0.5, total_tokens=10)
    assert_close(out.policy_loss, t(-0.08))  # -0.8 / 10
    assert_close(out.kl, t(0.05))  # 0.5 / 10
    assert_close(out.clipfrac, t(0.2))  # 2 / 10


def test_ppo_loss_k3_estimator():
    logp, old, ref, adv, mask = _ppo_inputs()
    out = ppo_loss(logp, old, ref, adv, mask, clip_eps=0.2, beta=1.0, kl_estimator="k3")
    # k3 = e^-d + d - 1 for d = 0.1, 0.2, 0.3, 0.0, -0.1:
    #   0.0048374 + 0.0187308 + 0.0408182 + 0 + 0.0051709 = 0.0695573 -> / 5 = 0.0139115
    assert_close(out.kl, t(0.0139115))
    assert_close(out.loss, t(-0.16 + 0.0139115))


# --------------------------------------------------------------------------- KL control


def test_fixed_controller():
    ctl = FixedKLController(0.1)
    ctl.update(100.0, 1000)
    assert ctl.beta == 0.1
    other = FixedKLController(0.5)
    other.load_state_dict(ctl.state_dict())
    assert other.beta == 0.1


def test_adaptive_controller_moves_beta():
    up = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    up.update(12.0, 100)  # err = clip(12/6 - 1) = 0.2 -> 0.1 * (1 + 0.2 * 0.01) = 0.1002
    assert up.beta == pytest.approx(0.1002)
    small = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    small.update(6.6, 100)  # err = 0.1 -> 0.1 * 1.001 = 0.1001
    assert small.beta == pytest.approx(0.1001)
    down = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    down.update(3.0, 100)  # err = clip(-0.5) = -0.2 -> 0.1 * 0.998 = 0.0998
    assert down.beta == pytest.approx(0.0998)


def test_adaptive_controller_state_round_trip_weights_only():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(12.0, 100)
    buf = io.BytesIO()
    torch.save({"kl_ctl": ctl.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)["kl_ctl"]
    assert all(type(v) is float for v in state.values())
    restored = AdaptiveKLController(1.0, target=1.0, horizon=1)
    restored.load_state_dict(state)
    assert restored.state_dict() == ctl.state_dict()
    restored.update(3.0, 100)
    assert restored.beta == pytest.approx(0.1002 * 0.998)


def test_make_kl_controller():
    assert isinstance(make_kl_controller(0.05), FixedKLController)
    ctl = make_kl_controller(0.05, target_kl=6.0, horizon=500)
    assert isinstance(ctl, AdaptiveKLController)
    assert (ctl.beta, ctl.target, ctl.horizon) == (0.05, 6.0, 500.0)
