"""Policy-loss variants (CISPO, SAPO, GMPO), GAE and the value loss, rollout-mismatch importance weights and the k3
clamp, against hand-worked numbers and against their reference implementations' formulas.

Everything runs in float64. Hand values and same-formula comparisons use 1e-12 (tests/tolerance.py, rule 4): the
inputs are O(1) and each result takes a few dozen float64 operations (rounding ~1e-16 each), so the bound holds on
any IEEE-754 machine and kernel; a wrong formula or convention moves a result by more than 1e-4. Each reference
function below is a short, literal transcription of the public source it names (verl: github.com/volcengine/verl,
TRL: github.com/huggingface/trl); where that source divides a count by ``n + 1e-8`` and ours by ``n``, the
transcription takes that 1e-8 as ``count_eps``: compared with 0 at 1e-12 and with the source's 1e-8 at the bound
that difference implies.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from rlhf_lightning.losses import (
    aggregate_loss,
    cispo_loss,
    explained_variance,
    gae,
    gmpo_loss,
    kl_k3,
    kl_penalty,
    logprob_mismatch,
    masked_whiten,
    rollout_is_weights,
    sapo_loss,
    value_loss,
)

NAN = float("nan")
TOL = dict(rtol=1e-12, atol=1e-12)
#: verl's masked means divide by n + 1e-8: a relative change of 1e-8 / (n + 1e-8) < 1e-8 in each such mean; the
#: results compared at this bound are O(1) compositions of one or two such means.
VERL_COUNT_EPS_TOL = dict(rtol=1e-7, atol=1e-7)


def f64(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def random_batch(seed: int, rows: int = 6, length: int = 7, spread: float = 0.5):
    """Right-padded float64 inputs: (logp, old_logp, advantages (B,), mask (B, T) float 0/1, lengths 1..length)."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(rows, length, generator=g, dtype=torch.float64) * 3.0  # log-probs in (-3, 0]
    old_logp = logp + torch.randn(rows, length, generator=g, dtype=torch.float64) * spread
    advantages = torch.randn(rows, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, length + 1, (rows,), generator=g)
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).to(torch.float64)  # (B, T)
    return logp, old_logp, advantages, mask


# --------------------------------------------------------------------------- references (transcribed)


def verl_masked_mean(values, mask, axis=None, count_eps=1e-8):
    """verl/utils/torch_functional.py: masked_sum, masked_mean."""
    s = (torch.where(mask.bool(), values, 0.0) * mask).sum(axis=axis)
    return s / (mask.sum(axis=axis) + count_eps)


def verl_cispo(old_log_prob, log_prob, advantages, response_mask, clip_ratio_low, clip_ratio_high, count_eps=1e-8):
    """verl/trainer/ppo/core_algos.py: compute_policy_loss_cispo, loss_agg_mode="token-mean" (agg_loss)."""
    negative_approx_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    clipped_ratio = torch.clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
    pg_losses = -clipped_ratio.detach() * advantages * log_prob
    pg_clipfrac = verl_masked_mean((ratio != clipped_ratio).float(), response_mask, count_eps=count_eps)
    pg_loss = (torch.where(response_mask.bool(), pg_losses, 0.0) * response_mask).sum() / response_mask.sum()
    return pg_losses, pg_loss, pg_clipfrac


def trl_cispo(per_token_logps, old_per_token_logps, advantages, epsilon_high):
    """trl/trainer/grpo_trainer.py: _compute_loss, loss_type="cispo", importance_sampling_level="token"."""
    coef_1 = torch.exp(per_token_logps - old_per_token_logps)
    clamped_ratios = torch.clamp(coef_1, max=epsilon_high).detach()
    return -clamped_ratios * advantages * per_token_logps


def verl_sapo(old_log_prob, log_prob, advantages, response_mask, tau_pos, tau_neg, count_eps=1e-8):
    """verl/trainer/ppo/core_algos.py: compute_policy_loss_sapo with agg_loss "seq-mean-token-mean"."""
    tau_pos = torch.as_tensor(tau_pos, dtype=advantages.dtype)
    tau_neg = torch.as_tensor(tau_neg, dtype=advantages.dtype)

    def gate_function(x, tau):
        return torch.sigmoid(tau * (x - 1.0)) * (4.0 / tau)

    ratio = torch.exp(torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0))
    taus = torch.where(condition=advantages > 0, input=tau_pos, other=tau_neg)
    pg_losses = -gate_function(ratio, taus) * advantages
    seq_mask = torch.sum(response_mask, dim=-1)
    seq_losses = torch.sum(pg_losses * response_mask, dim=-1) / (seq_mask + count_eps)
    seq_mask = (seq_mask > 0).float()
    pg_loss = (seq_losses * seq_mask).sum() / seq_mask.sum()
    return pg_losses, pg_loss


def trl_sapo(per_token_logps, old_per_token_logps, advantages, sapo_temperature_pos, sapo_temperature_neg):
    """trl/trainer/grpo_trainer.py: _compute_loss, loss_type="sapo"."""
    coef_1 = torch.exp(per_token_logps - old_per_token_logps)
    temperatures = torch.where(advantages > 0, sapo_temperature_pos, sapo_temperature_neg)
    soft_coef_1 = torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures
    return -soft_coef_1 * advantages


def verl_geo_mean(old_log_prob, log_prob, advantages, response_mask, cliprange_low, cliprange_high, count_eps=1e-8):
    """verl/trainer/ppo/core_algos.py: compute_policy_loss_geo_mean (advantages (B, T))."""
    negative_approx_kl = log_prob - old_log_prob
    sgn_advantage = torch.sign(advantages)
    negative_approx_kl_clamp = torch.clamp(negative_approx_kl, -cliprange_low, cliprange_high)
    negative_approx_kl_min = torch.min(sgn_advantage * negative_approx_kl, sgn_advantage * negative_approx_kl_clamp)
    negative_approx_kl_min = sgn_advantage * negative_approx_kl_min
    response_mask_sum = response_mask.sum(dim=-1)
    ratio = torch.exp((negative_approx_kl_min * response_mask).sum(dim=-1) / (response_mask_sum + count_eps))
    advantage = (advantages * response_mask).sum(dim=-1) / (response_mask_sum + count_eps)
    pg_loss = torch.mean(-advantage * ratio)
    clipped = torch.ne(negative_approx_kl, negative_approx_kl_clamp)
    pg_clipfrac = verl_masked_mean((clipped * (advantages > 0)).float(), response_mask, count_eps=count_eps)
    pg_clipfrac_lower = verl_masked_mean((clipped * (advantages < 0)).float(), response_mask, count_eps=count_eps)
    return pg_loss, pg_clipfrac, pg_clipfrac_lower


def verl_gae(token_level_rewards, values, response_mask, gamma, lam):
    """verl/trainer/ppo/core_algos.py: compute_gae_advantage_return, before its masked_whiten."""
    nextvalues = 0
    lastgaelam = 0
    advantages_reversed = []
    for t in reversed(range(token_level_rewards.shape[-1])):
        delta = token_level_rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam_ = delta + gamma * lam * lastgaelam
        nextvalues = values[:, t] * response_mask[:, t] + (1 - response_mask[:, t]) * nextvalues
        lastgaelam = lastgaelam_ * response_mask[:, t] + (1 - response_mask[:, t]) * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages, advantages + values


def verl_masked_whiten(values, mask, shift_mean=True, count_eps=1e-8):
    """verl/utils/torch_functional.py: masked_var (unbiased), masked_whiten."""
    mean = verl_masked_mean(values, mask, count_eps=count_eps)
    variance = verl_masked_mean((values - mean) ** 2, mask, count_eps=count_eps)
    mask_sum = mask.sum()
    variance = variance * (mask_sum / (mask_sum - 1))
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def trl_masked_whiten(values, mask, shift_mean=True):
    """trl/experimental/ppo/ppo_trainer.py: masked_mean, masked_var (unbiased), masked_whiten."""
    mean = (values * mask).sum() / mask.sum()
    variance = ((values - mean) ** 2 * mask).sum() / mask.sum()
    mask_sum = mask.sum()
    variance = variance * (mask_sum / (mask_sum - 1))
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def verl_value_loss(vpreds, returns, values, response_mask, cliprange_value, count_eps=1e-8):
    """verl/trainer/ppo/core_algos.py: compute_value_loss, loss_agg_mode="token-mean"."""
    vpredclipped = torch.clamp(vpreds, values - cliprange_value, values + cliprange_value)  # clip_by_value
    vf_losses1 = (vpreds - returns) ** 2
    vf_losses2 = (vpredclipped - returns) ** 2
    clipped_vf_losses = torch.max(vf_losses1, vf_losses2)
    masked = torch.where(response_mask.bool(), clipped_vf_losses, 0.0) * response_mask
    vf_loss = 0.5 * (masked.sum() / response_mask.sum())
    vf_clipfrac = verl_masked_mean(torch.gt(vf_losses2, vf_losses1).float(), response_mask, count_eps=count_eps)
    return vf_loss, vf_clipfrac


def verl_explained_var(values, returns, response_mask):
    """verl/trainer/ppo/metric_utils.py: compute_data_metrics, "critic/vf_explained_var"."""
    valid_returns = torch.masked_select(returns, response_mask.bool())
    valid_values = torch.masked_select(values, response_mask.bool())
    return 1.0 - torch.var(valid_returns - valid_values) / (torch.var(valid_returns) + 1e-5)


def verl_low_var_kl(logprob, ref_logprob):
    """verl/trainer/ppo/core_algos.py: kl_penalty_forward, "low_var_kl"."""
    kl = torch.clamp(ref_logprob - logprob, min=-20, max=20)
    return torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)


def verl_rollout_is(log_ratio, response_mask, rollout_is, rollout_is_threshold):
    """verl/trainer/ppo/rollout_corr_helper.py: compute_rollout_correction_weights (no batch normalization)."""
    if rollout_is == "token":
        weights = torch.exp(torch.clamp(log_ratio, min=-20.0, max=20.0))
    else:
        log_ratio_sum = (torch.where(response_mask.bool(), log_ratio, 0.0) * response_mask).sum(-1).unsqueeze(-1)
        weights = torch.exp(torch.clamp(log_ratio_sum, min=-20.0, max=20.0)).expand_as(log_ratio)
    weights = weights * response_mask
    return weights.clamp(max=rollout_is_threshold).detach()


def trl_vllm_is(old_per_token_logps, sampling_per_token_logps, mask, mode, clip_min, clip_max):
    """trl/trainer/grpo_trainer.py: _generate_and_score_completions, vllm_importance_sampling_mode."""
    per_token_logps_diff = (old_per_token_logps - sampling_per_token_logps) * mask
    if mode in ["sequence_mask", "sequence_truncate"]:
        logps_diff = per_token_logps_diff.sum(dim=-1, keepdim=True)
    else:
        logps_diff = per_token_logps_diff
    ratio = torch.exp(logps_diff)
    if mode in ["sequence_truncate", "token_truncate"]:
        ratio = torch.clamp(ratio, min=clip_min, max=clip_max)
    else:
        min_val = clip_min if clip_min is not None else -math.inf
        max_val = clip_max if clip_max is not None else math.inf
        ratio = ratio.masked_fill((ratio < min_val) | (ratio > max_val), value=0.0)
    return ratio


# --------------------------------------------------------------------------- k3 clamp


def test_kl_k3_clamp_hand_values():
    logp = f64([[0.0, -15.0, 0.0, 0.0]])
    ref = f64([[math.log(2.0), 0.0, -25.0, -0.5]])
    # ref - logp = log 2: 2 - log 2 - 1 = 0.3068528; 15: e^15 - 16 = 3269001.37 -> 10;
    # -25: clamped to -20 first, e^-20 + 20 - 1 = 19.000000002 -> 10; -0.5: e^-0.5 + 0.5 - 1 = 0.1065307
    expected = f64([[1.0 - math.log(2.0), 10.0, 10.0, math.exp(-0.5) - 0.5]])
    assert_close(kl_k3(logp, ref), expected, **TOL)
    assert_close(kl_penalty("k3", logp, ref), expected, **TOL)  # the registered estimator clamps too
    unclamped = f64([[1.0 - math.log(2.0), math.expm1(15.0) - 15.0, math.expm1(-25.0) + 25.0, math.exp(-0.5) - 0.5]])
    assert_close(kl_k3(logp, ref, clamp=None), unclamped, **TOL)
    assert_close(kl_k3(logp, ref, clamp=0.2), f64([[0.2, 0.2, 0.2, math.exp(-0.5) - 0.5]]), **TOL)


def test_kl_k3_clamp_gradient_is_zero_where_it_binds_and_never_nan():
    logp = f64([[0.0, -15.0, -1000.0, 1000.0]]).requires_grad_(True)
    ref = torch.zeros(1, 4, dtype=torch.float64)
    kl_k3(logp, ref).sum().backward()
    # d/dlogp (e^x - x - 1), x = ref - logp: 1 - e^x; 1 - 1 = 0 at x = 0; the clamp binds on the other three
    assert_close(logp.grad, f64([[0.0, 0.0, 0.0, 0.0]]), **TOL)
    logp = f64([[0.5]]).requires_grad_(True)
    kl_k3(logp, f64([[0.0]])).sum().backward()
    assert_close(logp.grad, f64([[1.0 - math.exp(-0.5)]]), **TOL)


def test_kl_k3_matches_verl_low_var_kl():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(8, 9, generator=g, dtype=torch.float64) * 8.0  # log-ratios up to ~30: both clamps bind
    ref = torch.randn(8, 9, generator=g, dtype=torch.float64) * 8.0
    ours = kl_k3(logp, ref)
    assert (ours == 10.0).any() and (ours < 10.0).any()
    assert_close(ours, verl_low_var_kl(logp, ref), **TOL)


# --------------------------------------------------------------------------- CISPO


def test_cispo_hand_values_and_clipped_mask():
    logp = f64([[-0.5, -2.0, NAN], [NAN, NAN, NAN]])
    old = f64([[-1.0, -1.0, NAN], [NAN, NAN, NAN]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    adv = f64([1.0, NAN])  # the second row has no valid token
    out = cispo_loss(logp, old, adv, mask, clip_low=None, clip_high=0.2)
    # rho = e^0.5 = 1.6487 -> 1.2: -1.2 * 1 * -0.5 = 0.6; rho = e^-1 kept (no lower bound): -e^-1 * -2 = 0.7358
    assert_close(out.loss[0], f64([0.6, 2.0 * math.exp(-1.0), 0.0]), **TOL)
    assert torch.equal(out.clipped, torch.tensor([[True, False, False], [False, False, False]]))
    assert_close(out.ratio[0, :2], f64([math.exp(0.5), math.exp(-1.0)]), **TOL)
    # with a lower bound 1 - 0.2 = 0.8: -0.8 * -2 = 1.6, and the second token counts as clipped
    low = cispo_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    assert_close(low.loss[0], f64([0.6, 1.6, 0.0]), **TOL)
    assert torch.equal(low.clipped[0], torch.tensor([True, True, False]))
    # token mean over the 2 valid tokens; the NaN row and column reach nothing
    assert_close(aggregate_loss("token_mean", out.loss, mask), f64((0.6 + 2.0 * math.exp(-1.0)) / 2.0), **TOL)
    assert not out.loss.isnan().any()


def test_cispo_weight_carries_no_gradient():
    logp = f64([[-0.5, -2.0, -0.7, NAN]]).requires_grad_(True)
    old = f64([[-1.0, -1.0, -0.6, NAN]]).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 0]])
    adv = f64([[1.5, -2.0, 0.5, NAN]])  # per token
    out = cispo_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    out.loss.sum().backward()
    # d loss_t / d logp_t = -clip(rho_t) * A_t: -1.2 * 1.5; -0.8 * -2; rho = e^-0.1 = 0.9048 inside: -0.9048 * 0.5.
    # Through an undetached weight the third token would add -A * logp * rho = -0.5 * -0.7 * 0.9048 = +0.3167.
    assert_close(logp.grad, f64([[-1.8, 1.6, -0.5 * math.exp(-0.1), 0.0]]), **TOL)
    assert old.grad is None  # old_logp is data: no path to it at all


def test_cispo_matches_verl():
    logp, old, adv, mask = random_batch(seed=1, spread=0.4)
    logp.requires_grad_(True)
    out = cispo_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    assert out.clipped[mask.bool()].any() and not out.clipped[mask.bool()].all()
    adv_tokens = adv.unsqueeze(-1).expand_as(mask)  # verl's advantages are (B, T)
    ref_losses, ref_loss, ref_clipfrac = verl_cispo(old, logp, adv_tokens, mask, 0.2, 0.28, count_eps=0.0)
    valid = mask.bool()
    assert_close(out.loss[valid], ref_losses[valid], **TOL)
    loss = aggregate_loss("token_mean", out.loss, mask)
    assert_close(loss, ref_loss, **TOL)
    clipfrac = out.clipped.double().sum() / mask.sum()
    assert_close(clipfrac, ref_clipfrac, **TOL)
    _, _, verl_clipfrac = verl_cispo(old, logp, adv_tokens, mask, 0.2, 0.28)  # verl's own 1e-8
    assert_close(clipfrac, verl_clipfrac, **VERL_COUNT_EPS_TOL)
    (grad,) = torch.autograd.grad(loss, logp)
    (ref_grad,) = torch.autograd.grad(ref_loss, logp)
    assert_close(grad, ref_grad, **TOL)


def test_cispo_without_lower_bound_matches_trl():
    logp, old, adv, mask = random_batch(seed=2, spread=1.5)  # ratios up to e^4: some above TRL's cap 5
    out = cispo_loss(logp, old, adv, mask, clip_low=None, clip_high=4.0)  # TRL's epsilon_high = 1 + 4.0 = 5.0
    assert out.clipped.any()
    ref = trl_cispo(logp, old, adv.unsqueeze(-1), epsilon_high=5.0)
    valid = mask.bool()
    assert_close(out.loss[valid], ref[valid], **TOL)


# --------------------------------------------------------------------------- SAPO


def test_sapo_hand_values_and_gradient():
    logp = f64([[0.5, 0.0], [0.0, NAN]]).requires_grad_(True)
    old = torch.zeros(2, 2, dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 0]])
    adv = f64([2.0, -1.0])
    out = sapo_loss(logp, old, adv, mask, tau_pos=1.0, tau_neg=1.05)
    # row 0, A = 2 > 0, tau = 1: rho = e^0.5, s = sigmoid(e^0.5 - 1) = sigmoid(0.6487) = 0.6567, f = 4 s,
    # loss = -2 * 4 s; rho = 1: f = 4 * 1/2 = 2, loss = -4. Row 1, A = -1, tau = 1.05: f = 2 / 1.05, loss = +1.9048
    s = 1.0 / (1.0 + math.exp(-(math.exp(0.5) - 1.0)))
    assert_close(out.loss, f64([[-8.0 * s, -4.0], [2.0 / 1.05, 0.0]]), **TOL)
    assert not out.clipped.any()
    out.loss.sum().backward()
    # d/dlogp (-A * 4/tau * sigmoid(tau (rho - 1))) = -A * 4 s (1 - s) * rho: at rho = 1, s = 1/2, just -A
    assert_close(logp.grad, f64([[-2.0 * 4.0 * s * (1.0 - s) * math.exp(0.5), -2.0], [1.0, 0.0]]), **TOL)


def test_sapo_matches_verl_and_trl():
    logp, old, adv, mask = random_batch(seed=3, spread=0.8)
    adv[0] = 0.0  # A = 0 takes tau_neg in both
    logp.requires_grad_(True)
    adv_tokens = adv.unsqueeze(-1).expand_as(mask)
    valid = mask.bool()
    out = sapo_loss(logp, old, adv, mask, tau_pos=1.0, tau_neg=1.05)
    ref_losses, ref_loss = verl_sapo(old, logp, adv_tokens, mask, 1.0, 1.05, count_eps=0.0)
    assert_close(out.loss[valid], ref_losses[valid], **TOL)
    loss = aggregate_loss("seq_mean_token_mean", out.loss, mask)  # verl's (and TRL's) reduction for SAPO
    assert_close(loss, ref_loss, **TOL)
    assert_close(loss, verl_sapo(old, logp, adv_tokens, mask, 1.0, 1.05)[1], **VERL_COUNT_EPS_TOL)
    assert_close(torch.autograd.grad(loss, logp)[0], torch.autograd.grad(ref_loss, logp)[0], **TOL)
    # TRL builds its temperatures with torch.where on Python floats, a float32 tensor: temperatures exact in
    # float32 (1.0, 1.25) keep that rounding out of a float64 comparison
    out = sapo_loss(logp, old, adv, mask, tau_pos=1.0, tau_neg=1.25)
    assert_close(out.loss[valid], trl_sapo(logp, old, adv.unsqueeze(-1), 1.0, 1.25)[valid], **TOL)


# --------------------------------------------------------------------------- GMPO


def test_gmpo_hand_values_gradient_and_masks():
    logp = f64([[0.6, -0.2, NAN], [0.6, -0.2, NAN], [NAN, NAN, NAN]]).requires_grad_(True)
    old = torch.zeros(3, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 0]])
    adv = f64([1.0, -1.0, 5.0])
    out = gmpo_loss(logp, old, adv, mask, clip_low=0.4, clip_high=0.4)
    # A = 1: log-ratios (0.6, -0.2), 0.6 capped at 0.4, mean 0.1: loss -e^0.1 on both valid tokens.
    # A = -1: only the floor -0.4 binds, nothing here: mean 0.2, loss +e^0.2. The empty row: 0.
    e1, e2 = math.exp(0.1), math.exp(0.2)
    assert_close(out.loss, f64([[-e1, -e1, 0.0], [e2, e2, 0.0], [0.0, 0.0, 0.0]]), **TOL)
    assert_close(out.ratio[:2, 0], f64([e1, e2]), **TOL)
    # the 0.6 token lies outside [-0.4, 0.4] in both rows (verl counts it as clipped whatever side binds)
    assert torch.equal(out.clipped, torch.tensor([[True, False, False], [True, False, False], [False] * 3]))
    # seq_mean_token_mean: the mean over the two sequences with tokens of each sequence's term
    loss = aggregate_loss("seq_mean_token_mean", out.loss, mask)
    assert_close(loss, f64((-e1 + e2) / 2.0), **TOL)
    loss.backward()
    # d/dx_t (-A e^{mean c}) = -A e^{mean c} / 2 where x_t is not clipped, 0 where the cap binds; then / 2 sequences
    assert_close(logp.grad, f64([[0.0, -e1 / 4.0, 0.0], [e2 / 4.0, e2 / 4.0, 0.0], [0.0, 0.0, 0.0]]), **TOL)


def test_gmpo_matches_verl():
    logp, old, adv, mask = random_batch(seed=4, spread=0.5)
    logp.requires_grad_(True)
    adv_tokens = adv.unsqueeze(-1).expand_as(mask)
    out = gmpo_loss(logp, old, adv, mask, clip_low=0.4, clip_high=0.4)
    loss = aggregate_loss("seq_mean_token_mean", out.loss, mask)  # no empty row here, as verl's mean counts them
    ref_loss, ref_clipfrac, ref_clipfrac_lower = verl_geo_mean(old, logp, adv_tokens, mask, 0.4, 0.4, count_eps=0.0)
    assert out.clipped.any()
    assert_close(loss, ref_loss, **TOL)
    assert_close(torch.autograd.grad(loss, logp)[0], torch.autograd.grad(ref_loss, logp)[0], **TOL)
    positive = adv_tokens > 0
    assert_close((out.clipped & positive).double().sum() / mask.sum(), ref_clipfrac, **TOL)
    assert_close((out.clipped & (adv_tokens < 0)).double().sum() / mask.sum(), ref_clipfrac_lower, **TOL)
    assert_close(loss, verl_geo_mean(old, logp, adv_tokens, mask, 0.4, 0.4)[0], **VERL_COUNT_EPS_TOL)
    # per-token advantages: verl averages them over the sequence and takes each token's sign
    adv_per_token = torch.randn(mask.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out = gmpo_loss(logp, old, adv_per_token, mask, clip_low=0.3, clip_high=0.5)
    loss = aggregate_loss("seq_mean_token_mean", out.loss, mask)
    assert_close(loss, verl_geo_mean(old, logp, adv_per_token, mask, 0.3, 0.5, count_eps=0.0)[0], **TOL)


# --------------------------------------------------------------------------- GAE


def test_gae_hand_values():
    rewards = f64([[0.0, 0.0, 1.0], [0.5, NAN, NAN], [NAN, NAN, NAN]])
    values = f64([[0.2, 0.4, 0.6], [0.3, NAN, NAN], [NAN, NAN, NAN]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)  # gamma * lam = 0.72
    # row 0: t=2 delta = 1 + 0.9 * 0 - 0.6 = 0.4, A = 0.4
    #        t=1 delta = 0 + 0.9 * 0.6 - 0.4 = 0.14, A = 0.14 + 0.72 * 0.4 = 0.428
    #        t=0 delta = 0 + 0.9 * 0.4 - 0.2 = 0.16, A = 0.16 + 0.72 * 0.428 = 0.46816
    # row 1: one token, A = 0.5 - 0.3 = 0.2 (the value past it is 0); row 2: nothing. R = A + V
    assert_close(advantages, f64([[0.46816, 0.428, 0.4], [0.2, 0.0, 0.0], [0.0, 0.0, 0.0]]), **TOL)
    assert_close(returns, f64([[0.66816, 0.828, 1.0], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0]]), **TOL)


def test_gae_skips_a_masked_token_inside_the_sequence():
    rewards = f64([[0.0, 9.0, 1.0]])
    values = f64([[0.2, 9.0, 0.6]])
    mask = torch.tensor([[1, 0, 1]])  # the middle token is an observation, not the policy's
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # t=2: A = 1 - 0.6 = 0.4; t=0: next valid value 0.6, delta = 0.9 * 0.6 - 0.2 = 0.34, A = 0.34 + 0.72 * 0.4 = 0.628
    assert_close(advantages, f64([[0.628, 0.0, 0.4]]), **TOL)
    assert_close(returns, f64([[0.828, 0.0, 1.0]]), **TOL)


def test_gae_matches_verl_and_whitening_is_separate():
    g = torch.Generator().manual_seed(6)
    _, _, _, mask = random_batch(seed=6, rows=5, length=8)
    mask[1, 2] = 0.0  # a hole, as a multi-turn rollout has
    rewards = torch.randn(5, 8, generator=g, dtype=torch.float64) * 0.1  # per-token -beta KL ...
    rewards[torch.arange(5), mask.cumsum(-1).argmax(-1)] += 1.0  # ... plus the score on the last valid token
    values = torch.randn(5, 8, generator=g, dtype=torch.float64)
    advantages, returns = gae(rewards, values, mask, gamma=0.99, lam=0.95)
    ref_advantages, ref_returns = verl_gae(rewards, values, mask, 0.99, 0.95)
    valid = mask.bool()
    assert_close(advantages[valid], ref_advantages[valid], **TOL)
    assert_close(returns[valid], ref_returns[valid], **TOL)
    assert (advantages[~valid] == 0).all() and (returns[~valid] == 0).all()
    # verl's advantages are masked_whiten of these (its returns are not whitened)
    whitened = masked_whiten(advantages, mask)
    assert_close(whitened[valid], verl_masked_whiten(ref_advantages, mask, count_eps=0.0)[valid], **TOL)


# --------------------------------------------------------------------------- whitening, value loss, explained variance


def test_masked_whiten_hand_values_and_edge_cases():
    values = f64([[1.0, 3.0, NAN], [5.0, NAN, NAN], [NAN, NAN, NAN]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    # valid (1, 3, 5): mean 3, unbiased var (4 + 0 + 4) / 2 = 4; (x - 3) / sqrt(4 + 1e-8)
    s = math.sqrt(4.0 + 1e-8)
    assert_close(masked_whiten(values, mask), f64([[-2 / s, 0.0, 0.0], [2 / s, 0.0, 0.0], [0.0] * 3]), **TOL)
    assert_close(masked_whiten(values, mask, shift_mean=False), f64([[3 - 2 / s, 3.0, 0.0], [3 + 2 / s, 0.0, 0.0], [0.0] * 3]), **TOL)
    with pytest.raises(ValueError, match="at least 2"):
        masked_whiten(values, torch.tensor([[1, 0, 0], [0, 0, 0], [0, 0, 0]]))


def test_masked_whiten_matches_trl_and_verl():
    g = torch.Generator().manual_seed(7)
    _, _, _, mask = random_batch(seed=7)
    values = torch.randn(mask.shape, generator=g, dtype=torch.float64) * 2.0 + 1.0
    valid = mask.bool()
    for shift_mean in (True, False):
        ours = masked_whiten(values, mask, shift_mean)[valid]
        assert_close(ours, trl_masked_whiten(values, mask, shift_mean)[valid], **TOL)
        assert_close(ours, verl_masked_whiten(values, mask, shift_mean, count_eps=0.0)[valid], **TOL)
        assert_close(ours, verl_masked_whiten(values, mask, shift_mean)[valid], **VERL_COUNT_EPS_TOL)


def test_value_loss_hand_values_and_gradient():
    values = f64([[1.5, 0.7, 0.9, NAN], [NAN, NAN, NAN, NAN]]).requires_grad_(True)
    old = f64([[1.0, 1.0, 1.0, NAN], [NAN, NAN, NAN, NAN]])
    returns = f64([[2.0, 1.5, 1.0, NAN], [NAN, NAN, NAN, NAN]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]])
    loss, clipfrac = value_loss(values, old, returns, mask, cliprange_value=0.2)
    # V_old +- 0.2 = [0.8, 1.2]. Token 0: V 1.5 -> 1.2: max((1.5 - 2)^2, (1.2 - 2)^2) = max(0.25, 0.64) = 0.64, clipped.
    # Token 1: V 0.7 -> 0.8: max((0.7 - 1.5)^2, (0.8 - 1.5)^2) = max(0.64, 0.49) = 0.64. Token 2: inside, 0.01.
    # 0.5 * (0.64 + 0.64 + 0.01) / 3 = 0.215; clipfrac 1/3
    assert_close(loss, f64(0.215), **TOL)
    assert_close(clipfrac, f64(1.0 / 3.0), **TOL)
    loss.backward()
    # d/dV 0.5 (V - R)^2 / 3 = (V - R) / 3 where the unclipped error is used; 0 where the clipped (V outside) is
    assert_close(values.grad, f64([[0.0, (0.7 - 1.5) / 3.0, (0.9 - 1.0) / 3.0, 0.0], [0.0] * 4]), **TOL)
    # no clipping: 0.5 * (0.25 + 0.64 + 0.01) / 3 = 0.15; per sequence then over the one non-empty row: the same
    assert_close(value_loss(values, old, returns, mask, cliprange_value=None)[0], f64(0.15), **TOL)
    assert_close(value_loss(values, old, returns, mask, None, agg="seq_mean_token_mean")[0], f64(0.15), **TOL)


def test_value_loss_matches_verl():
    g = torch.Generator().manual_seed(8)
    _, _, _, mask = random_batch(seed=8)
    old = torch.randn(mask.shape, generator=g, dtype=torch.float64)
    values = (old + torch.randn(mask.shape, generator=g, dtype=torch.float64) * 0.5).requires_grad_(True)
    returns = torch.randn(mask.shape, generator=g, dtype=torch.float64)
    loss, clipfrac = value_loss(values, old, returns, mask, cliprange_value=0.3)
    ref_loss, ref_clipfrac = verl_value_loss(values, returns, old, mask, 0.3, count_eps=0.0)
    assert 0.0 < clipfrac < 1.0
    assert_close(loss, ref_loss, **TOL)
    assert_close(clipfrac, ref_clipfrac, **TOL)
    assert_close(clipfrac, verl_value_loss(values, returns, old, mask, 0.3)[1], **VERL_COUNT_EPS_TOL)
    assert_close(torch.autograd.grad(loss, values)[0], torch.autograd.grad(ref_loss, values)[0], **TOL)


def test_explained_variance_hand_values_and_edge_cases():
    values = f64([[1.0, 2.0, 3.0, NAN]])
    returns = f64([[1.0, 3.0, 2.0, NAN]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # R - V = (0, 1, -1): mean 0, unbiased var 2 / 2 = 1; R = (1, 3, 2): mean 2, var 2 / 2 = 1
    assert_close(explained_variance(values, returns, mask), f64(1.0 - 1.0 / (1.0 + 1e-5)), **TOL)
    assert_close(explained_variance(returns, returns, mask), f64(1.0), **TOL)  # a perfect critic
    assert explained_variance(values, returns, torch.tensor([[1, 0, 0, 0]])).isnan()
    assert explained_variance(values, returns, torch.zeros(1, 4)).isnan()


def test_explained_variance_matches_verl():
    g = torch.Generator().manual_seed(9)
    _, _, _, mask = random_batch(seed=9)
    returns = torch.randn(mask.shape, generator=g, dtype=torch.float64)
    values = returns + torch.randn(mask.shape, generator=g, dtype=torch.float64) * 0.5
    assert_close(explained_variance(values, returns, mask), verl_explained_var(values, returns, mask), **TOL)


# --------------------------------------------------------------------------- rollout correction


def _mismatch_inputs():
    # old - rollout log-ratios: row 0 (3, 1/2) as ratios, a padded NaN; row 1 (0.2, 1.25, 0.8); row 2 empty
    old = f64([[math.log(3.0), math.log(0.5), NAN], [math.log(0.2), math.log(1.25), math.log(0.8)], [NAN] * 3])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    return old, torch.zeros(3, 3, dtype=torch.float64), mask


def test_rollout_is_token_level_hand_values():
    old, rollout, mask = _mismatch_inputs()
    out = rollout_is_weights(old, rollout, mask, "tis", "token", threshold_high=2.0)
    # truncated at 2: 3 -> 2; one of the 5 valid tokens changed
    assert_close(out.weights, f64([[2.0, 0.5, 0.0], [0.2, 1.25, 0.8], [0.0] * 3]), **TOL)
    assert torch.equal(out.mask, mask.bool())
    assert_close(out.affected, f64(0.2), **TOL)
    out = rollout_is_weights(old, rollout, mask, "tis", "token", threshold_low=0.25, threshold_high=2.0)
    assert_close(out.weights, f64([[2.0, 0.5, 0.0], [0.25, 1.25, 0.8], [0.0] * 3]), **TOL)
    assert_close(out.affected, f64(0.4), **TOL)
    out = rollout_is_weights(old, rollout, mask, "mis", "token", threshold_low=0.25, threshold_high=2.0)
    # outside [0.25, 2]: 3 and 0.2 get weight 0 and leave the mask
    assert_close(out.weights, f64([[0.0, 0.5, 0.0], [0.0, 1.25, 0.8], [0.0] * 3]), **TOL)
    assert torch.equal(out.mask, torch.tensor([[False, True, False], [False, True, True], [False] * 3]))
    assert_close(out.affected, f64(0.4), **TOL)


def test_rollout_is_sequence_level_hand_values():
    old, rollout, mask = _mismatch_inputs()
    # sequence ratios: row 0 3 * 0.5 = 1.5, row 1 0.2 * 1.25 * 0.8 = 0.2 (exp of the summed log-ratios)
    out = rollout_is_weights(old, rollout, mask, "tis", "sequence", threshold_high=2.0)
    assert_close(out.weights, f64([[1.5, 1.5, 0.0], [0.2, 0.2, 0.2], [0.0] * 3]), **TOL)
    assert_close(out.affected, f64(0.0), **TOL)
    out = rollout_is_weights(old, rollout, mask, "mis", "sequence", threshold_low=0.25, threshold_high=2.0)
    # row 1 (0.2 < 0.25) is rejected whole: 3 of the 5 valid tokens
    assert_close(out.weights, f64([[1.5, 1.5, 0.0], [0.0] * 3, [0.0] * 3]), **TOL)
    assert torch.equal(out.mask, torch.tensor([[True, True, False], [False] * 3, [False] * 3]))
    assert_close(out.affected, f64(0.6), **TOL)


def test_rollout_is_weights_carry_no_gradient_and_check_names():
    old, rollout, mask = _mismatch_inputs()
    out = rollout_is_weights(old.requires_grad_(True), rollout, mask)
    assert not out.weights.requires_grad
    # no bound at all: the plain ratios
    out = rollout_is_weights(old, rollout, mask, "tis", threshold_low=None, threshold_high=None)
    assert_close(out.weights[0, :2], f64([3.0, 0.5]), **TOL)
    assert_close(out.affected, f64(0.0), **TOL)
    with pytest.raises(ValueError, match="tis"):
        rollout_is_weights(old, rollout, mask, mode="clip")
    with pytest.raises(ValueError, match="sequence"):
        rollout_is_weights(old, rollout, mask, level="group")


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_rollout_is_matches_trl(mode):
    old, rollout, _, mask = random_batch(seed=10, spread=0.6)
    level, how = mode.split("_")
    out = rollout_is_weights(old, rollout, mask, "tis" if how == "truncate" else "mis", level, 0.5, 2.0)
    ref = trl_vllm_is(old, rollout, mask, mode, 0.5, 2.0).expand_as(mask)
    valid = mask.bool()
    assert_close(out.weights[valid], ref[valid], **TOL)
    assert 0 < out.affected < 1  # both bounds bind somewhere: 8 of the 17 valid tokens (10 in sequences) here
    if how == "mask":
        assert torch.equal(out.mask, valid & (ref > 0))


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_rollout_is_truncated_matches_verl(level):
    old, rollout, _, mask = random_batch(seed=11, spread=1.0)
    out = rollout_is_weights(old, rollout, mask, "tis", level, threshold_high=2.0)
    assert_close(out.weights, verl_rollout_is(old - rollout, mask, level, 2.0), **TOL)
    assert out.affected > 0


def test_logprob_mismatch():
    a = f64([[0.0, -1.0, NAN], [-2.0, -0.25, 0.0]])
    b = f64([[-0.5, -1.0, 3.0], [-1.0, -0.5, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    mean, max_ratio = logprob_mismatch(a, b, mask)
    # |a - b| on valid tokens: 0.5, 0, 1, 0.25: mean 1.75 / 4; the largest, 1, as a ratio e^1
    assert_close(mean, f64(0.4375), **TOL)
    assert_close(max_ratio, f64(math.e), **TOL)
    mean, max_ratio = logprob_mismatch(a, b, torch.zeros(2, 3))
    assert mean == 0.0 and max_ratio == 1.0
