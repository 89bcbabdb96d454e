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
from rlhf_lightning.scoring import token_logprobs
from rlhf_lightning.losses import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    RATIO_LEVELS,
    aggregate_loss,
    batch_mean,
    batch_whiten,
    bradley_terry_loss,
    clipped_surrogate,
    compute_advantages,
    drop_truncated,
    entropy_from_logits,
    group_mean,
    group_whiten,
    kl_in_reward,
    kl_k1,
    kl_k3,
    kl_penalty,
    log_importance_ratio,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    pairwise_accuracy,
    rloo,
    seq_mean_token_mean,
    seq_mean_token_sum_norm,
    sequence_log_ratio,
    token_log_ratio,
    token_mean,
)
from rlhf_lightning import losses
from rlhf_lightning.option_groups import LossConfig


def ppo_loss(logp, old, ref, adv, mask, *, beta, kl_estimator="k1", total_tokens=None, total_rows=None, max_new_tokens=None, **loss):
    """`losses.ppo_loss` with the loss group's fields (clip_eps, clip_eps_low/high, clip_c, ratio_level, loss_agg)
    and the counts as keywords, as the hand examples below spell them."""
    counts = None if total_tokens is None and total_rows is None else (total_tokens, total_rows)
    return losses.ppo_loss(logp, old, ref, adv, mask, LossConfig(**loss), counts, beta=beta, kl_estimator=kl_estimator,
                           max_new_tokens=max_new_tokens)

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
    with pytest.raises(ValueError, match=r"number of rewards \(3\) must be a positive multiple of samples_per_prompt \(2\)"):
        compute_advantages(name, t([1.0, 2.0, 3.0]), 2)


def test_small_groups_rejected():
    with pytest.raises(ValueError, match="samples_per_prompt"):
        rloo(t([1.0, 2.0]), 1)
    with pytest.raises(ValueError, match="samples_per_prompt"):
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
    adv = t([[1.0, 1.0, -1.0]])
    obj, r, clipped = clipped_surrogate(torch.log(ratio), adv, 0.2)
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


def test_clipped_surrogate_clip_higher():
    ratio = t([[1.25, 0.75, 1.3]])
    adv = t([[1.0, -1.0, 1.0]])
    obj, _, clipped = clipped_surrogate(torch.log(ratio), adv, 0.2, clip_eps_high=0.28)
    # range [0.8, 1.28]: min(1.25, 1.25) = 1.25, not clipped (1.2 with the symmetric range);
    # min(-0.75, -0.8) = -0.8, clipped below as before; min(1.3, 1.28) = 1.28, clipped
    assert_close(obj, t([[1.25, -0.8, 1.28]]))
    assert clipped.tolist() == [[False, True, True]]
    symmetric, _, clipped = clipped_surrogate(torch.log(ratio), adv, 0.2)
    assert_close(symmetric, t([[1.2, -0.8, 1.2]]))
    assert clipped.tolist() == [[True, True, True]]


def test_clipped_surrogate_dual_clip():
    ratio = t([[4.0, 2.0, 4.0, 0.5]])
    adv = t([[-1.0, -1.0, 1.0, -1.0]])
    log_ratio = torch.log(ratio).requires_grad_(True)
    obj, _, clipped = clipped_surrogate(log_ratio, adv, 0.2, clip_c=3.0)
    # rho 4, A -1:   min(-4, -1.2) = -4 -> max(-4, 3 * -1) = -3 (dual clip binds)
    # rho 2, A -1:   min(-2, -1.2) = -2 -> max(-2, -3) = -2 (nothing binds)
    # rho 4, A +1:   min(4, 1.2) = 1.2 (clipped; the dual clip bounds negative advantages only)
    # rho 0.5, A -1: min(-0.5, -0.8) = -0.8 (clipped) -> max(-0.8, -3) = -0.8
    assert_close(obj, t([[-3.0, -2.0, 1.2, -0.8]]))
    assert clipped.tolist() == [[True, False, True, True]]
    obj.sum().backward()
    # d(rho A) / d log rho = rho A where the unclipped term is the objective, 0 where a bound is
    assert_close(log_ratio.grad, t([[0.0, -2.0, 0.0, 0.0]]))
    without, _, _ = clipped_surrogate(torch.log(ratio), adv, 0.2)
    assert_close(without, t([[-4.0, -2.0, 1.2, -0.8]]))


def test_ppo_loss_seq_mean_token_mean_hand_example():
    logp, old, ref, adv, mask = _ppo_inputs()
    out = ppo_loss(logp, old, ref, adv, mask, clip_eps=0.2, beta=0.5, loss_agg="seq_mean_token_mean")
    # per-token objectives as in the token-mean example: row 0 [1.0, 1.2, 0.5], row 1 [-1.1, -0.8]
    # token means: row 0 2.7 / 3 = 0.9, row 1 -1.9 / 2 = -0.95 -> policy_loss = -(0.9 - 0.95) / 2 = 0.025
    # k1 token means: row 0 0.6 / 3 = 0.2, row 1 -0.1 / 2 = -0.05 -> kl = 0.15 / 2 = 0.075
    # loss = 0.025 + 0.5 * 0.075 = 0.0625; clipfrac and approx_kl stay token means (0.4, 0.0971038)
    assert_close(out.policy_loss, t(0.025))
    assert_close(out.kl, t(0.075))
    assert_close(out.loss, t(0.0625))
    assert_close(out.clipfrac, t(0.4))
    assert_close(out.approx_kl, t(0.0971038))
    out.loss.backward()
    # d/dlogp = (-rho A [unclipped tokens only] + beta) / (2 sequences * n_i tokens of the row):
    #   row 0 (n 3): (-1 + 0.5) / 6, (0 + 0.5) / 6, (-0.5 + 0.5) / 6; row 1 (n 2): (1.1 + 0.5) / 4, (0 + 0.5) / 4
    assert_close(logp.grad, t([[-1 / 12, 1 / 12, 0.0], [0.4, 0.125, 0.0]]))
    # a DDP rank's share: divide by the global number of sequences, 4: -(-0.05) / 4, 0.15 / 4
    out = ppo_loss(logp, old, ref, adv, mask, clip_eps=0.2, beta=0.5, loss_agg="seq_mean_token_mean", total_rows=4)
    assert_close(out.policy_loss, t(0.0125))
    assert_close(out.kl, t(0.0375))


def test_ppo_loss_seq_mean_token_sum_norm_hand_example():
    logp, old, ref, adv, mask = _ppo_inputs()
    kwargs = dict(clip_eps=0.2, beta=0.5, loss_agg="seq_mean_token_sum_norm", max_new_tokens=4)
    out = ppo_loss(logp, old, ref, adv, mask, **kwargs)
    # token sums / 4: row 0 2.7 / 4 = 0.675, row 1 -1.9 / 4 = -0.475 -> policy_loss = -(0.675 - 0.475) / 2 = -0.1
    # k1 sums / 4: 0.6 / 4 = 0.15, -0.1 / 4 = -0.025 -> kl = 0.125 / 2 = 0.0625; loss = -0.1 + 0.03125 = -0.06875
    assert_close(out.policy_loss, t(-0.1))
    assert_close(out.kl, t(0.0625))
    assert_close(out.loss, t(-0.06875))
    out.loss.backward()
    # every valid token's weight is 1 / (2 * 4), whatever its row's length: (-rho A + beta) / 8
    assert_close(logp.grad, t([[-0.5 / 8, 0.5 / 8, 0.0], [1.6 / 8, 0.5 / 8, 0.0]]))
    out = ppo_loss(logp, old, ref, adv, mask, total_rows=4, **kwargs)
    assert_close(out.policy_loss, t(-0.05))  # -0.2 / 4


def test_ppo_loss_sequence_ratio_hand_example():
    logp, old, ref, adv, mask = _ppo_inputs()
    out = ppo_loss(logp, old, ref, adv, mask, clip_eps=0.2, beta=0.0, ratio_level="sequence")
    # s_0 = (1.0 * 1.5 * 0.5) ** (1/3) = 0.9085603, inside [0.8, 1.2]: objective 0.9085603 on its 3 tokens
    # s_1 = (1.1 * 0.5) ** (1/2) = 0.7416198 < 0.8 with A = -1: min(-0.7416198, -0.8) = -0.8 (clipped), 2 tokens
    # token mean: (3 * 0.9085603 - 2 * 0.8) / 5 = 0.2251362; clipfrac = the 2 tokens of row 1 / 5 = 0.4
    assert_close(out.policy_loss, t(-0.2251362))
    assert_close(out.clipfrac, t(0.4))
    assert_close(out.approx_kl, t(0.0971038))  # still the per-token estimate
    out.loss.backward()
    # d s_0 / d logp_t = s_0 / 3 on each token of row 0, and s_0 is the objective of its 3 tokens:
    # d loss / d logp_t = -(3 * s_0 / 3) / 5 = -0.1817121 on all three (token level cuts off the clipped middle one)
    assert_close(logp.grad, t([[-0.1817121] * 3, [0.0, 0.0, 0.0]]))


def _seed_ppo_loss(logp, old, ref, adv, mask, eps, beta):
    """The loss as the project wrote it before its options existed: per-token ratio, symmetric clip, token means."""
    valid = mask.bool()
    zero = torch.zeros(())
    logp, old, ref = (torch.where(valid, x, zero) for x in (logp, old, ref))
    ratio = torch.exp(logp - old)
    a = adv.unsqueeze(-1)
    objective = torch.minimum(ratio * a, torch.clamp(ratio, 1.0 - eps, 1.0 + eps) * a)
    count = valid.sum().clamp(min=1).float()
    policy = -(torch.where(valid, objective, zero).sum() / count)
    kl = torch.where(valid, logp - ref, zero).sum() / count
    return policy + beta * kl, policy, kl


def test_ppo_loss_defaults_are_bitwise_the_seed_formula():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    old = base + 0.3 * torch.randn(6, 5, generator=g)
    ref = base + 0.3 * torch.randn(6, 5, generator=g)
    mask = torch.rand(6, 5, generator=g) > 0.3
    adv = torch.randn(6, generator=g)
    new_logp, seed_logp = base.clone().requires_grad_(True), base.clone().requires_grad_(True)
    out = ppo_loss(new_logp, old, ref, adv, mask, clip_eps=0.2, beta=0.3)
    loss, policy, kl = _seed_ppo_loss(seed_logp, old, ref, adv, mask, 0.2, 0.3)
    assert 0 < out.clipfrac < 1  # both sides of the clip are exercised
    assert torch.equal(out.loss, loss) and torch.equal(out.policy_loss, policy) and torch.equal(out.kl, kl)
    out.loss.backward()
    loss.backward()
    assert torch.equal(new_logp.grad, seed_logp.grad)


# --------------------------------------------------------------------------- loss aggregation, ratio levels

# row 0: 3 valid tokens, row 1: 1, row 2: none (a truncated completion whose tokens were dropped); junk where masked
AGG = ([[1.0, 2.0, 3.0], [4.0, NAN, INF], [NAN, 5.0, 6.0]], [[1, 1, 1], [1, 0, 0], [0, 0, 0]])


def test_token_mean():
    vals, mask = t(AGG[0], requires_grad=True), torch.tensor(AGG[1])
    # (1 + 2 + 3 + 4) / 4 valid tokens = 2.5
    out = token_mean(vals, mask)
    assert_close(out, t(2.5))
    out.backward()
    assert_close(vals.grad, t([[0.25, 0.25, 0.25], [0.25, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    # a DDP rank's share of a global count of 8 tokens: 10 / 8; `rows` does not concern it
    assert_close(token_mean(vals, mask, tokens=8, rows=100), t(1.25))


def test_seq_mean_token_mean_skips_rows_without_tokens():
    vals, mask = t(AGG[0], requires_grad=True), torch.tensor(AGG[1])
    # token means: row 0 (1 + 2 + 3) / 3 = 2, row 1 4 / 1 = 4, row 2 has none and does not count: (2 + 4) / 2 = 3
    out = seq_mean_token_mean(vals, mask)
    assert_close(out, t(3.0))
    out.backward()
    # weight 1 / (2 sequences * n_i): a token of the short row weighs three times one of the long row
    assert_close(vals.grad, t([[1 / 6, 1 / 6, 1 / 6], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    assert_close(seq_mean_token_mean(vals, mask, tokens=100, rows=4), t(1.5))  # 6 / 4 global sequences


def test_seq_mean_token_sum_norm_divides_by_a_constant():
    vals, mask = t(AGG[0], requires_grad=True), torch.tensor(AGG[1])
    # token sums / 5: row 0 6 / 5 = 1.2, row 1 4 / 5 = 0.8; mean over the 2 sequences with tokens: 1.0
    out = seq_mean_token_sum_norm(vals, mask, max_new_tokens=5)
    assert_close(out, t(1.0))
    out.backward()
    assert_close(vals.grad, t([[0.1, 0.1, 0.1], [0.1, 0.0, 0.0], [0.0, 0.0, 0.0]]))  # 1 / (2 * 5), any length
    assert_close(seq_mean_token_sum_norm(vals, mask, rows=4, max_new_tokens=5), t(0.5))  # (1.2 + 0.8) / 4
    with pytest.raises(ValueError, match="max_new_tokens"):
        seq_mean_token_sum_norm(vals, mask)


def test_loss_aggregation_registry():
    assert set(LOSS_AGGREGATIONS) == {"token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"}
    vals, mask = t(AGG[0]), torch.tensor(AGG[1])
    assert_close(aggregate_loss("seq_mean_token_sum_norm", vals, mask, max_new_tokens=5), t(1.0))
    assert_close(aggregate_loss("token_mean", vals, mask, 8), t(1.25))
    with pytest.raises(ValueError, match="seq_mean_token_mean"):
        aggregate_loss("token_sum", vals, mask)


def test_drop_truncated():
    mask = torch.tensor([[True, True, False], [True, True, True], [True, False, False]])
    finished = torch.tensor([True, False, True])  # row 1 used the whole budget without EOS
    assert drop_truncated(mask, finished).tolist() == [[True, True, False], [False, False, False], [True, False, False]]


def test_token_and_sequence_log_ratios():
    logp = t([[-1.0, -2.0, -0.5], [-1.0, 0.0, 0.0]], requires_grad=True)
    old = t([[-1.5, -1.0, -0.5], [-1.3, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert_close(token_log_ratio(logp, old, mask), t([[0.5, -1.0, 0.0], [0.3, 0.0, 0.0]]))
    # row 0: (0.5 - 1.0 + 0.0) / 3 = -1/6; row 1: 0.3 / 1; broadcast to every position of the row
    seq = sequence_log_ratio(logp, old, mask)
    assert_close(seq, t([[-1 / 6] * 3, [0.3] * 3]))
    seq[:, 0].sum().backward()
    # d log s_i / d logp_t = 1 / n_i on the row's valid tokens; the old log-probs get no gradient
    assert_close(logp.grad, t([[1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0]]))
    assert old.grad is None
    assert set(RATIO_LEVELS) == {"token", "sequence"}
    assert_close(log_importance_ratio("sequence", logp, old, mask), seq)
    with pytest.raises(ValueError, match="sequence"):
        log_importance_ratio("group", logp, old, mask)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("sliced", [False, True])  # the update's logits are a view: the completion positions of (B, T, V)
def test_chunked_logprobs_equal_the_plain_formula_bitwise_and_save_no_float32_copy(dtype, temperature, sliced):
    from rlhf_lightning.losses import entropy_from_logits, token_logprobs_and_entropy

    torch.manual_seed(0)
    full = (torch.randn(3, 7, 11) * 3).to(dtype)
    targets, upstream = torch.randint(0, 11, (3, 5)), torch.randn(3, 5)
    plain, chunked = full.clone().requires_grad_(), full.clone().requires_grad_()

    def view(t):
        return t[:, 1:-1] if sliced else t[:, :5]

    expected = logprobs_from_logits(view(plain), targets, temperature)
    (expected * upstream).sum().backward()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        got, entropy = token_logprobs_and_entropy(view(chunked), targets, temperature, chunk_elements=2 * 5 * 11)  # 2 rows a chunk
    (got * upstream).sum().backward()
    assert torch.equal(got, expected) and got.dtype == torch.float32
    assert torch.equal(chunked.grad, plain.grad) and chunked.grad.dtype == dtype
    torch.testing.assert_close(entropy, entropy_from_logits(view(full).float() / temperature), atol=1e-6, rtol=0)
    assert not entropy.requires_grad
    # kept for backward: the logits as they came (the view), the targets, one float per row; no float32 (B, T, V) copy
    big = [t for t in saved if t.dim() == 3]
    assert len(big) == 1 and big[0].dtype == dtype and big[0].data_ptr() == view(chunked).data_ptr()
    assert sum(t.numel() for t in saved if t.dim() < 3) == 2 * 15


def test_chunked_logprobs_refuse_a_second_derivative():
    from rlhf_lightning.losses import token_logprobs_and_entropy

    logits = torch.randn(2, 3, 5, requires_grad=True)
    logprobs, _ = token_logprobs_and_entropy(logits, torch.zeros(2, 3, dtype=torch.long))
    weights = torch.ones(2, 3, requires_grad=True)  # a gradient that itself depends on something differentiable
    (grad,) = torch.autograd.grad(logprobs, logits, weights, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice a function that was marked with @once_differentiable"):
        grad.sum().backward()
