"""Pure tensor functions for reward modelling, PPO-style policy optimisation and preference optimisation (DPO).

Conventions: ``B`` batch, ``T`` sequence length, ``V`` vocabulary, ``N`` number of
sampled completions. A token ``mask`` is bool or 0/1 float and marks the valid
completion tokens; masked-out entries never contribute, even if NaN/inf.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "CRITIC_ESTIMATORS",
    "DPO_LOSSES",
    "LOG_RATIO_BOUND",
    "PolicyLossTerms",
    "ROLLOUT_IS_LEVELS",
    "ROLLOUT_IS_MODES",
    "RolloutCorrection",
    "cispo_loss",
    "explained_variance",
    "gae",
    "gmpo_loss",
    "logprob_mismatch",
    "masked_whiten",
    "rollout_is_weights",
    "sapo_loss",
    "token_level_rewards",
    "value_loss",
    "DPOLossOutput",
    "PairLogps",
    "REFERENCE_FREE_LOSSES",
    "chosen_nll",
    "dpo_loss",
    "dpo_robust_loss",
    "dpo_sigmoid_loss",
    "implicit_rewards",
    "ipo_loss",
    "log1mexp",
    "orpo_loss",
    "simpo_loss",
    "slic_hinge_loss",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "LOSS_AGGREGATIONS",
    "PPOLossOutput",
    "RATIO_LEVELS",
    "aggregate_loss",
    "batch_mean",
    "batch_whiten",
    "bradley_terry_loss",
    "clipped_surrogate",
    "compute_advantages",
    "drop_truncated",
    "entropy_from_logits",
    "group_mean",
    "group_whiten",
    "kl_in_reward",
    "kl_k1",
    "kl_k3",
    "kl_penalty",
    "log_importance_ratio",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "pairwise_accuracy",
    "ppo_loss",
    "rloo",
    "seq_mean_token_mean",
    "seq_mean_token_sum_norm",
    "sequence_log_ratio",
    "token_log_ratio",
    "token_mean",
]


# --------------------------------------------------------------------------- masking


def masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``values`` where ``mask`` is set (over ``dim``, or everything).

    >>> masked_sum(torch.tensor([1.0, 2.0, float("nan")]), torch.tensor([1, 1, 0]))
    tensor(3.)
    """
    kept = torch.where(mask.bool(), values, torch.zeros_like(values))  # same shape as values
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(
    values: Tensor,
    mask: Tensor,
    dim: int | None = None,
    total: float | Tensor | None = None,
) -> Tensor:
    """Mean of ``values`` over the masked entries.

    Divides by ``mask.sum()`` (at least 1) or, when given, by ``total`` (e.g. the
    global token count under DDP, so that summing the ranks' results gives the
    global mean).

    >>> masked_mean(torch.tensor([1.0, 2.0, float("inf"), 4.0]), torch.tensor([1, 1, 0, 1]))
    tensor(2.3333)
    >>> masked_mean(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1, 1, 1]), total=7)
    tensor(1.)
    """
    numerator = masked_sum(values, mask, dim)
    if total is None:
        count = mask.bool().sum() if dim is None else mask.bool().sum(dim)
        return numerator / count.clamp(min=1).to(numerator.dtype)
    return numerator / total


def drop_truncated(mask: Tensor, finished: Tensor) -> Tensor:
    """``mask (B, T)`` without the rows that never emitted EOS (``finished (B,)`` False): no loss for them.

    >>> drop_truncated(torch.tensor([[True, True], [True, False]]), torch.tensor([False, True]))
    tensor([[False, False],
            [ True, False]])
    """
    return mask.bool() & finished.bool().unsqueeze(-1)  # (B, T)


# --------------------------------------------------------------------------- log-probs


def logprobs_from_logits(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """``log_softmax(logits / temperature)`` at ``targets``, in float32.

    >>> logits = torch.tensor([[[0.0, 1.0986123]]])  # softmax = [0.25, 0.75]
    >>> logprobs_from_logits(logits, torch.tensor([[1]]))  # log 0.75
    tensor([[-0.2877]])
    """
    logits = logits.float() / temperature  # (B, T, V)
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return picked - torch.logsumexp(logits, dim=-1)  # (B, T)


class _TokenLogprobs(torch.autograd.Function):
    """`logprobs_from_logits` (and, if asked, the entropy) in chunks along the first dimension, keeping only the
    logits as they came (any float dtype, any strides) and one log-normalizer per row for backward: no float32
    (B, T, V) copy is saved, each chunk's float32 temporaries hold about `chunk` elements, and the softmax is
    recomputed chunk by chunk in backward. The same values and gradients as the plain formula (tested bitwise)."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, temperature: float, chunk: int, with_entropy: bool):
        lead = max(1, chunk // max(1, logits[:1].numel()))  # first-dimension entries a chunk
        logprobs = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
        lse = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
        entropy = torch.empty(targets.shape if with_entropy else (0,), dtype=torch.float32, device=logits.device)
        for s in range(0, logits.size(0), lead):
            x = logits[s : s + lead].float() / temperature  # (b, ..., V) float32, this chunk only
            lse[s : s + lead] = torch.logsumexp(x, dim=-1)
            logprobs[s : s + lead] = x.gather(-1, targets[s : s + lead].unsqueeze(-1)).squeeze(-1) - lse[s : s + lead]
            if with_entropy:
                probs = (x - lse[s : s + lead].unsqueeze(-1)).exp_()
                entropy[s : s + lead] = torch.special.entr(probs).sum(-1)
        ctx.save_for_backward(logits, targets, lse)
        ctx.temperature, ctx.lead = temperature, lead
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logprobs: Tensor, grad_entropy: Tensor):
        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        lead = ctx.lead
        for s in range(0, logits.size(0), lead):
            x = logits[s : s + lead].float() / ctx.temperature
            g = grad_logprobs[s : s + lead].float().unsqueeze(-1)  # (b, ..., 1)
            d = -(g * (x - lse[s : s + lead].unsqueeze(-1)).exp())  # d/dx of -logsumexp: -g softmax(x)
            d.scatter_add_(-1, targets[s : s + lead].unsqueeze(-1), g)  # + g at the target (the gather's gradient)
            grad[s : s + lead] = d / ctx.temperature
        return grad, None, None, None, None


def token_logprobs_and_entropy(
    logits: Tensor, targets: Tensor, temperature: float = 1.0, *, with_entropy: bool = True, chunk_elements: int = 1 << 24
) -> tuple[Tensor, Tensor | None]:
    """(``logprobs_from_logits(logits, targets, temperature)``, the entropy of ``softmax(logits / temperature)``
    (no gradient; None without `with_entropy`)), both (B, T) float32, from one pass over the logits (B, T, V).

    Differentiable once in the log-probs, with the plain formula's gradient; backward keeps the logits in their
    own dtype and strides plus one float per row, never a float32 (B, T, V) copy, and works on chunks of the
    first dimension of about `chunk_elements` logits (64 MB of float32 temporaries).

    >>> lp, ent = token_logprobs_and_entropy(torch.tensor([[[0.0, 1.0986123]]]), torch.tensor([[1]]))
    >>> lp, ent  # log 0.75; entropy of [0.25, 0.75]
    (tensor([[-0.2877]]), tensor([[0.5623]]))
    """
    logprobs, entropy = _TokenLogprobs.apply(logits, targets, temperature, chunk_elements, with_entropy)
    return logprobs, (entropy if with_entropy else None)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of ``softmax(logits)`` over the last axis, in float32.

    >>> entropy_from_logits(torch.zeros(1, 1, 4))  # uniform over 4 -> log 4
    tensor([[1.3863]])
    """
    probs = torch.softmax(logits.float(), dim=-1)  # (B, T, V)
    return torch.special.entr(probs).sum(-1)  # (B, T); entr(0) = 0 handles -inf logits


# --------------------------------------------------------------------------- reward model


def bradley_terry_loss(
    r_chosen: Tensor, r_rejected: Tensor, margin: Tensor | None = None
) -> Tensor:
    """Mean of ``-logsigmoid(r_chosen - r_rejected - margin)``.

    >>> bradley_terry_loss(torch.tensor([1.0]), torch.tensor([1.0]))  # log 2
    tensor(0.6931)
    """
    diff = r_chosen - r_rejected  # (B,)
    if margin is not None:
        diff = diff - margin  # (B,)
    return -F.logsigmoid(diff).mean()


def pairwise_accuracy(r_chosen: Tensor, r_rejected: Tensor) -> Tensor:
    """Fraction of pairs with ``r_chosen > r_rejected``; ties count as wrong.

    >>> pairwise_accuracy(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 2.0]))
    tensor(0.5000)
    """
    return (r_chosen > r_rejected).float().mean()


# --------------------------------------------------------------------------- advantages


def _groups(rewards: Tensor, samples_per_prompt: int) -> Tensor:
    """View ``rewards (N,)`` as ``(N // samples_per_prompt, samples_per_prompt)``; validate the layout."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D, got shape {tuple(rewards.shape)}")
    if samples_per_prompt < 1 or rewards.numel() % samples_per_prompt != 0:
        raise ValueError(
            f"number of rewards ({rewards.numel()}) must be a positive multiple of "
            f"samples_per_prompt ({samples_per_prompt})"
        )
    return rewards.view(-1, samples_per_prompt)  # (G, K)


def batch_mean(rewards: Tensor, samples_per_prompt: int, eps: float = 1e-6) -> Tensor:
    """``R - mean(R)`` over the whole batch.

    >>> batch_mean(torch.tensor([1.0, 0.0, 0.0, 0.0]), samples_per_prompt=2)
    tensor([ 0.7500, -0.2500, -0.2500, -0.2500])
    """
    _groups(rewards, samples_per_prompt)
    return rewards - rewards.mean()  # (N,)


def batch_whiten(rewards: Tensor, samples_per_prompt: int, eps: float = 1e-6) -> Tensor:
    """``(R - mean(R)) / max(std(R), eps)`` with the population std over the batch.

    >>> batch_whiten(torch.tensor([1.0, 0.0]), samples_per_prompt=1)
    tensor([ 1., -1.])
    """
    _groups(rewards, samples_per_prompt)
    std = rewards.std(unbiased=False).clamp(min=eps)  # ()
    return (rewards - rewards.mean()) / std  # (N,)


def group_mean(rewards: Tensor, samples_per_prompt: int, eps: float = 1e-6) -> Tensor:
    """``R - mean`` of the reward's own prompt group.

    >>> group_mean(torch.tensor([1.0, 0.0, 0.0, 1.0]), samples_per_prompt=2)
    tensor([ 0.5000, -0.5000, -0.5000,  0.5000])
    """
    grouped = _groups(rewards, samples_per_prompt)  # (G, K)
    return (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)  # (N,)


def group_whiten(rewards: Tensor, samples_per_prompt: int, eps: float = 1e-6) -> Tensor:
    """``(R - group mean) / (group std + eps)``, unbiased std within each group (GRPO).

    >>> group_whiten(torch.tensor([1.0, 0.0]), samples_per_prompt=2, eps=0.0)  # std = sqrt(0.5)
    tensor([ 0.7071, -0.7071])
    """
    if samples_per_prompt < 2:
        raise ValueError(f"group_whiten needs samples_per_prompt >= 2 for a group std, got {samples_per_prompt}")
    grouped = _groups(rewards, samples_per_prompt)  # (G, K)
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # (G, K)
    return (centred / (grouped.std(dim=1, keepdim=True) + eps)).reshape(-1)  # (N,)


def rloo(rewards: Tensor, samples_per_prompt: int, eps: float = 1e-6) -> Tensor:
    """Leave-one-out: ``R_i`` minus the mean of the other ``K - 1`` rewards of its group.

    Equal to ``K / (K - 1) * (R_i - group mean)``.

    >>> rloo(torch.tensor([3.0, 0.0, 0.0]), samples_per_prompt=3)
    tensor([ 3.0000, -1.5000, -1.5000])
    """
    if samples_per_prompt < 2:
        raise ValueError(
            f"rloo needs at least 2 samples per prompt (samples_per_prompt >= 2), got {samples_per_prompt}"
        )
    grouped = _groups(rewards, samples_per_prompt)  # (G, K)
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # (G, K)
    return (centred * samples_per_prompt / (samples_per_prompt - 1)).reshape(-1)  # (N,)


AdvantageFn = Callable[[Tensor, int, float], Tensor]

ADVANTAGE_ESTIMATORS: dict[str, AdvantageFn] = {
    "batch_mean": batch_mean,
    "batch_whiten": batch_whiten,
    "group_mean": group_mean,
    "group_whiten": group_whiten,
    "rloo": rloo,
}

#: The estimators whose baseline is the prompt's own group of K samples (a group whose K rewards are all
#: equal gets zero advantage under them: what dynamic sampling filters out).
GROUP_ESTIMATORS: frozenset[str] = frozenset({"group_mean", "group_whiten", "rloo"})

#: The estimators that need a learned value function (per-token advantages from a critic, `gae`), beside the
#: critic-free ones of `ADVANTAGE_ESTIMATORS`.
CRITIC_ESTIMATORS: tuple[str, ...] = ("gae",)


def compute_advantages(
    name: str, rewards: Tensor, samples_per_prompt: int, eps: float = 1e-6
) -> Tensor:
    """Per-sequence advantages ``(N,)`` with the estimator registered under ``name``.

    >>> compute_advantages("rloo", torch.tensor([3.0, 0.0, 0.0]), 3)
    tensor([ 3.0000, -1.5000, -1.5000])
    """
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(
            f"unknown advantage estimator {name!r}; valid: {sorted(ADVANTAGE_ESTIMATORS)}"
        )
    return ADVANTAGE_ESTIMATORS[name](rewards, samples_per_prompt, eps)


# --------------------------------------------------------------------------- KL


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token ``logp - ref_logp`` (unbiased, can be negative).

    >>> kl_k1(torch.tensor([[0.0]]), torch.tensor([[-1.0]]))
    tensor([[1.]])
    """
    return logp - ref_logp  # (B, T)


#: verl's bound on a log-ratio before it is exponentiated (``SAFETY_BOUND``; e^20 = 4.9e8): no inf in the forward
#: pass, no inf * 0 = NaN in the backward pass.
LOG_RATIO_BOUND = 20.0


def kl_k3(logp: Tensor, ref_logp: Tensor, clamp: float | None = 10.0) -> Tensor:
    """Per-token ``exp(ref - logp) - (ref - logp) - 1`` (Schulman's k3, "Approximating KL divergence", 2020; >= 0),
    clamped to ``[-clamp, clamp]``.

    With a ``clamp`` (default 10) it is verl's ``low_var_kl`` (``verl/trainer/ppo/core_algos.py``,
    ``kl_penalty_forward``): the log-ratio ``ref - logp`` is first clamped to [-20, 20], then the estimate to
    [-10, 10], so one token the policy made far less likely than the reference does cannot dominate the batch's KL;
    where a clamp binds the token's gradient is 0. ``clamp=None``: the raw estimate, unbounded.

    >>> kl_k3(torch.tensor([[0.0]]), torch.tensor([[0.6931472]]))  # 2 - log 2 - 1
    tensor([[0.3069]])
    >>> kl_k3(torch.tensor([[-15.0]]), torch.tensor([[0.0]]))  # e^15 - 15 - 1 = 3269001.3, clamped to 10
    tensor([[10.]])
    """
    log_ratio = ref_logp - logp  # (B, T)
    if clamp is None:
        return torch.expm1(log_ratio) - log_ratio  # (B, T)
    log_ratio = log_ratio.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)  # (B, T)
    return (torch.expm1(log_ratio) - log_ratio).clamp(-clamp, clamp)  # (B, T)


KLFn = Callable[[Tensor, Tensor], Tensor]

KL_ESTIMATORS: dict[str, KLFn] = {"k1": kl_k1, "k3": kl_k3}


def kl_penalty(name: str, logp: Tensor, ref_logp: Tensor, clamp: float | None = 10.0) -> Tensor:
    """Per-token KL ``(B, T)`` with the estimator registered under ``name``; ``clamp`` bounds k3 (``kl_k3``; k1 is
    linear in the log-ratio and left as it is, as verl does).

    >>> kl_penalty("k1", torch.tensor([[0.0]]), torch.tensor([[-1.0]]))
    tensor([[1.]])
    """
    if name not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {name!r}; valid: {sorted(KL_ESTIMATORS)}")
    return kl_k3(logp, ref_logp, clamp) if name == "k3" else KL_ESTIMATORS[name](logp, ref_logp)


def kl_in_reward(rewards: Tensor, kl_tokens: Tensor, mask: Tensor, beta: float) -> Tensor:
    """``rewards - beta * sum of KL over each sequence's valid tokens`` (pass detached KL).

    >>> kl_in_reward(torch.tensor([1.0]), torch.tensor([[0.1, 0.2, 9.0]]),
    ...              torch.tensor([[1, 1, 0]]), beta=0.5)
    tensor([0.8500])
    """
    return rewards - beta * masked_sum(kl_tokens, mask, dim=-1)  # (B,)


# --------------------------------------------------------------------------- loss aggregation
#
# How per-token terms (B, T) become one number. Under DDP every rank passes the minibatch's counts over all
# ranks (`tokens`: valid tokens; `rows`: sequences with at least one valid token), so that the ranks' results
# sum to the value on the global batch.


def _row_count(mask: Tensor) -> Tensor:
    """Number of rows of ``mask (B, T)`` with at least one valid token, at least 1."""
    return mask.bool().any(-1).sum().clamp(min=1)  # ()


def token_mean(
    values: Tensor,
    mask: Tensor,
    tokens: float | Tensor | None = None,
    rows: float | Tensor | None = None,
    max_new_tokens: int | None = None,
) -> Tensor:
    """Mean over every valid token of the batch: ``sum of values / tokens`` (the default ``loss_agg``).

    >>> token_mean(torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]]), torch.tensor([[1, 1, 1], [1, 0, 0]]))
    tensor(2.5000)
    """
    return masked_mean(values, mask, total=tokens)  # (); (1 + 2 + 3 + 4) / 4 above


def seq_mean_token_mean(
    values: Tensor,
    mask: Tensor,
    tokens: float | Tensor | None = None,
    rows: float | Tensor | None = None,
    max_new_tokens: int | None = None,
) -> Tensor:
    """Mean over sequences of each sequence's token mean; a sequence without valid tokens does not count.

    >>> seq_mean_token_mean(torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]]), torch.tensor([[1, 1, 1], [1, 0, 0]]))
    tensor(3.)
    """
    per_row = masked_mean(values, mask, dim=-1)  # (B,) each sequence's token mean, 0 for an empty row
    return per_row.sum() / (_row_count(mask) if rows is None else rows)  # (); (2 + 4) / 2 above


def seq_mean_token_sum_norm(
    values: Tensor,
    mask: Tensor,
    tokens: float | Tensor | None = None,
    rows: float | Tensor | None = None,
    max_new_tokens: int | None = None,
) -> Tensor:
    """Each sequence's token sum divided by the constant ``max_new_tokens``, then the mean over sequences.

    The divisor does not depend on the sequence's length (Dr. GRPO), so a long wrong answer is not pushed
    down less per token than a short one.

    >>> seq_mean_token_sum_norm(torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]]),
    ...                         torch.tensor([[1, 1, 1], [1, 0, 0]]), max_new_tokens=4)
    tensor(1.2500)
    """
    if max_new_tokens is None or max_new_tokens < 1:
        raise ValueError(f"seq_mean_token_sum_norm needs max_new_tokens >= 1, got {max_new_tokens}")
    per_row = masked_sum(values, mask, dim=-1) / max_new_tokens  # (B,)
    return per_row.sum() / (_row_count(mask) if rows is None else rows)  # (); (6/4 + 4/4) / 2 above


LossAggFn = Callable[..., Tensor]

LOSS_AGGREGATIONS: dict[str, LossAggFn] = {
    "token_mean": token_mean,
    "seq_mean_token_mean": seq_mean_token_mean,
    "seq_mean_token_sum_norm": seq_mean_token_sum_norm,
}


def aggregate_loss(
    name: str,
    values: Tensor,
    mask: Tensor,
    tokens: float | Tensor | None = None,
    rows: float | Tensor | None = None,
    max_new_tokens: int | None = None,
) -> Tensor:
    """Scalar of ``values (B, T)`` over ``mask`` with the aggregation registered under ``name``.

    >>> aggregate_loss("seq_mean_token_mean", torch.tensor([[1.0, 3.0], [5.0, 0.0]]), torch.tensor([[1, 1], [1, 0]]))
    tensor(3.5000)
    """
    if name not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {name!r}; valid: {sorted(LOSS_AGGREGATIONS)}")
    return LOSS_AGGREGATIONS[name](values, mask, tokens, rows, max_new_tokens)


# --------------------------------------------------------------------------- PPO


def token_log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """Per-token ``log rho_t = logp_t - old_logp_t`` (B, T): the ratio of PPO.

    >>> token_log_ratio(torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]]), torch.ones(1, 2))
    tensor([[ 0.5000, -1.0000]])
    """
    return logp - old_logp  # (B, T)


def sequence_log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """Each sequence's ``log s_i = mean over its valid tokens of (logp - old_logp)``, broadcast to (B, T) (GSPO).

    ``s_i`` is the geometric mean of the sequence's token ratios. Its gradient reaches every valid token
    of the sequence as ``s_i / |y_i| * grad logp_t``; ``old_logp`` is detached.

    >>> sequence_log_ratio(torch.tensor([[-1.0, -2.0, 7.0]]), torch.tensor([[-1.5, -1.0, 0.0]]),
    ...                    torch.tensor([[1, 1, 0]]))  # (0.5 - 1.0) / 2, the third token masked
    tensor([[-0.2500, -0.2500, -0.2500]])
    """
    per_row = masked_mean(logp - old_logp.detach(), mask, dim=-1)  # (B,)
    return per_row.unsqueeze(-1).expand_as(logp)  # (B, T)


RatioFn = Callable[[Tensor, Tensor, Tensor], Tensor]

RATIO_LEVELS: dict[str, RatioFn] = {"token": token_log_ratio, "sequence": sequence_log_ratio}


def log_importance_ratio(level: str, logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """Log importance ratio (B, T) at the level registered under ``level`` ("token" or "sequence").

    >>> log_importance_ratio("sequence", torch.tensor([[0.0, 1.0]]), torch.zeros(1, 2), torch.ones(1, 2))
    tensor([[0.5000, 0.5000]])
    """
    if level not in RATIO_LEVELS:
        raise ValueError(f"unknown ratio level {level!r}; valid: {sorted(RATIO_LEVELS)}")
    return RATIO_LEVELS[level](logp, old_logp, mask)


def clipped_surrogate(
    log_ratio: Tensor,
    advantages: Tensor,
    clip_eps: float,
    clip_eps_high: float | None = None,
    clip_c: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO clipped objective per token: ``min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A)``.

    ``rho = exp(log_ratio)``; ``clip_eps`` is the lower range and, unless ``clip_eps_high`` is given, the
    upper one too (clip-higher, DAPO). ``clip_c`` (> 1, dual clip) bounds the objective of negative
    advantages from below: ``max(min(...), clip_c * A)`` where ``A < 0``, so a huge ratio on a bad sample
    cannot give an unbounded push.

    ``advantages`` is per sequence ``(B,)`` (broadcast to tokens) or per token ``(B, T)``. Returns
    ``(objective, ratio, clipped)``, all ``(B, T)``. ``clipped`` follows the TRL definition of clipfrac: the
    token's objective is a clipped term strictly below the unclipped one, i.e. its gradient is cut off.
    Unlike ``|rho - 1| > eps`` it ignores clipping on the side that does not bind.

    >>> obj, ratio, clipped = clipped_surrogate(torch.log(torch.tensor([[1.5, 0.5]])), torch.tensor([1.0]), 0.2)
    >>> obj, clipped  # min(1.5, 1.2) = 1.2 (clipped); min(0.5, 0.8) = 0.5 (not)
    (tensor([[1.2000, 0.5000]]), tensor([[ True, False]]))
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)  # (B, 1)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp(log_ratio)  # (B, T)
    unclipped = ratio * advantages  # (B, T)
    clipped_obj = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high) * advantages  # (B, T)
    objective = torch.minimum(unclipped, clipped_obj)  # (B, T)
    clipped = clipped_obj < unclipped  # (B, T)
    if clip_c is not None:
        floor = clip_c * advantages  # (B, 1) or (B, T)
        dual = (advantages < 0) & (floor > objective)  # (B, T)
        objective = torch.where(dual, floor, objective)  # (B, T)
        clipped = clipped | dual  # (B, T)
    return objective, ratio, clipped


class PPOLossOutput(NamedTuple):
    """``loss`` carries the graph; the other fields are detached, for logging."""

    loss: Tensor
    policy_loss: Tensor
    kl: Tensor
    clipfrac: Tensor
    approx_kl: Tensor


def ppo_loss(
    logp: Tensor,
    old_logp: Tensor,
    ref_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cfg: Any = None,
    counts: Tensor | tuple[float, float] | None = None,
    *,
    beta: float = 0.0,
    kl_estimator: str = "k1",
    max_new_tokens: int | None = None,
    kl_clamp: float | None = 10.0,
    is_weights: Tensor | None = None,
) -> PPOLossOutput:
    """``-agg(min(rho A, clip(rho) A)) + beta * agg(KL)``, ``agg`` a registered loss aggregation.

    ``cfg`` is the loss's option group (`option_groups.LossConfig`: ``clip_range``, ``clip_c``, ``ratio_level``,
    ``loss_agg``, ``policy_loss``; None: its defaults, the plain clipped surrogate: the token mean over the valid tokens
    of the whole batch, the per-token ratio, the symmetric clip 0.2). ``policy_loss`` other than ``"ppo"`` replaces the
    clipped surrogate by that variant's per-token terms (``POLICY_LOSSES``: CISPO, SAPO, GMPO), aggregated the same way.
    ``is_weights`` (B, T), if given, multiply the policy's per-token terms (``rollout_is_weights``: the correction
    for a rollout engine whose log-probs differ from the trainer's; 0 drops a token). ``kl_clamp`` bounds k3
    (``kl_penalty``). ``counts`` = (tokens, rows) the aggregation divides by (the
    global minibatch's, under data parallelism; None: this batch's own), ``max_new_tokens`` the constant of
    ``seq_mean_token_sum_norm`` (see ``LOSS_AGGREGATIONS``), ``clip_range`` and ``clip_c`` the clipping
    (``clipped_surrogate``). ``kl`` is always reported, also with ``beta=0`` (which is what the caller passes when
    the KL is placed in the reward instead). ``clipfrac`` (fraction of valid tokens whose objective was clipped)
    and ``approx_kl`` (k3 estimate of KL(old || new) per token: mean of ``(rho-1) - log rho`` with the token
    ratio) are token means whatever the aggregation.

    >>> # one token, rho = 1, A = 2, logp - ref = 0.1, beta = 0.5:
    >>> # loss = -(1 * 2) + 0.5 * 0.1 = -1.95
    """
    clip_low, clip_high = cfg.clip_range if cfg is not None else (0.2, 0.2)
    clip_c = cfg.clip_c if cfg is not None else None
    ratio_level = cfg.ratio_level if cfg is not None else "token"
    loss_agg = cfg.loss_agg if cfg is not None else "token_mean"
    total_tokens, total_rows = (None, None) if counts is None else counts
    valid = mask.bool()  # (B, T)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    # Zero out masked positions first so NaN/inf there cannot leak into gradients.
    logp = torch.where(valid, logp, zero)  # (B, T)
    old_logp = torch.where(valid, old_logp, zero)  # (B, T)
    ref_logp = torch.where(valid, ref_logp, zero)  # (B, T)
    if advantages.dim() == 2:
        advantages = torch.where(valid, advantages, zero)  # (B, T)

    name = cfg.policy_loss if cfg is not None else "ppo"
    if name == "ppo":
        log_ratio = log_importance_ratio(ratio_level, logp, old_logp, valid).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)  # (B, T)
        objective, ratio, clipped = clipped_surrogate(log_ratio, advantages, clip_low, clip_high, clip_c)
        terms = None
    else:
        terms, ratio, clipped = POLICY_LOSSES[name](logp, old_logp, advantages, valid, **cfg.policy_loss_options)
    if is_weights is not None:
        if terms is None:
            objective = objective * is_weights
        else:
            terms = terms * is_weights
    counts = (total_tokens, total_rows, max_new_tokens)
    policy_loss = -aggregate_loss(loss_agg, objective, valid, *counts) if terms is None else aggregate_loss(loss_agg, terms, valid, *counts)
    kl = aggregate_loss(loss_agg, kl_penalty(kl_estimator, logp, ref_logp, kl_clamp), valid, *counts)
    loss = policy_loss + beta * kl

    with torch.no_grad():
        token_ratio = logp - old_logp  # (B, T)
        approx_kl = masked_mean(torch.expm1(token_ratio) - token_ratio, valid, total=total_tokens)
        clipfrac = masked_mean(clipped.float(), valid, total=total_tokens)

    return PPOLossOutput(
        loss=loss,
        policy_loss=policy_loss.detach(),
        kl=kl.detach(),
        clipfrac=clipfrac,
        approx_kl=approx_kl,
    )


# --------------------------------------------------------------------------- policy-loss variants
#
# Beside the clipped surrogate: each function returns the per-token terms of a loss to minimize (B, T), 0 at masked
# tokens, for `aggregate_loss` to reduce, with the ratio and the clip flags its metrics need. ``advantages`` is per
# sequence (B,) or per token (B, T); ``old_logp`` is data (detached). Masked entries (and the advantage of a row
# without valid tokens) may hold NaN/inf: they reach neither a value nor a gradient.


class PolicyLossTerms(NamedTuple):
    """The per-token terms of a policy loss and what its metrics read, all (B, T)."""

    loss: Tensor  # (B, T) per-token loss to minimize, with the graph; 0 at masked tokens
    ratio: Tensor  # (B, T) the importance ratio the loss used, detached (GMPO: the sequence's, on every token)
    clipped: Tensor  # (B, T) bool: valid tokens whose ratio a clip changed (False at masked tokens)


def _masked_inputs(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(valid, logp, old_logp, advantages)``: masked entries zeroed, old_logp detached, advantages (B, 1) or (B, T)."""
    valid = mask.bool()  # (B, T)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    logp = torch.where(valid, logp, zero)  # (B, T)
    old_logp = torch.where(valid, old_logp.detach(), zero)  # (B, T)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)  # (B, 1)
    else:
        advantages = torch.where(valid, advantages, zero)  # (B, T)
    return valid, logp, old_logp, advantages


def cispo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float | None = None,
    clip_high: float = 0.2,
) -> PolicyLossTerms:
    """CISPO (MiniMax, "MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention", 2025,
    arXiv 2506.13585): REINFORCE weighted by the clipped importance ratio, with a stop-gradient on the weight,
    per token ``-sg(clip(rho, 1 - clip_low, 1 + clip_high)) * A * logp``, ``rho = exp(logp - old_logp)``.

    PPO's clip zeroes the gradient of a token whose ratio left the range; here every token keeps its gradient,
    ``-clip(rho) * A * grad logp``, only its weight is capped. verl's convention (``verl/trainer/ppo/core_algos.py``,
    ``compute_policy_loss_cispo``): a range around 1, the log-ratio clamped to [-20, 20] before exp, ``clipped`` =
    ``rho != clip(rho)`` (verl's ``pg_clipfrac`` is its mean over valid tokens). ``clip_low=None`` puts no lower bound
    on the weight (the paper's choice; verl's example gets it with ``clip_ratio_low=10``, the same values since
    rho > 0). With ``clip_low=None`` it is also TRL's ``loss_type="cispo"`` (``trl/trainer/grpo_trainer.py``,
    ``_compute_loss``), whose ``epsilon_high`` is the absolute cap ``1 + clip_high`` on rho (TRL recommends 5.0, i.e.
    ``clip_high=4.0``) and which does not clamp the log-ratio (only a ratio below e^-20 differs).
    verl reduces it with its ``loss_agg_mode`` (token mean by default), TRL with the token mean.

    >>> # rho = e^0.5 = 1.6487 capped at 1.2, rho = e^-1 = 0.3679 kept; A = 1
    >>> out = cispo_loss(torch.tensor([[-0.5, -2.0]]), torch.tensor([[-1.0, -1.0]]), torch.tensor([1.0]), torch.ones(1, 2))
    >>> out.loss, out.clipped  # -1.2 * -0.5; -0.3679 * -2
    (tensor([[0.6000, 0.7358]]), tensor([[ True, False]]))
    """
    valid, logp, old_logp, advantages = _masked_inputs(logp, old_logp, advantages, mask)
    log_ratio = (logp.detach() - old_logp).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T) no graph: the weight is a constant
    weight = ratio.clamp(min=None if clip_low is None else 1.0 - clip_low, max=1.0 + clip_high)  # (B, T)
    loss = torch.where(valid, -weight * advantages * logp, 0.0)  # (B, T) the gradient reaches logp only
    return PolicyLossTerms(loss=loss, ratio=ratio, clipped=(ratio != weight) & valid)


def sapo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
) -> PolicyLossTerms:
    """SAPO (Qwen, "Soft Adaptive Policy Optimization", 2025, arXiv 2511.20347): PPO's hard clip replaced by a
    smooth gate, per token ``-f(rho) * A`` with ``f(rho) = 4 / tau * sigmoid(tau (rho - 1))``, ``tau = tau_pos`` where
    ``A > 0`` and ``tau_neg`` elsewhere.

    ``f'(rho) = 4 s (1 - s)``, ``s = sigmoid(tau (rho - 1))``: 1 at rho = 1 (on policy, the plain policy gradient),
    decaying smoothly as rho leaves 1 instead of dropping to 0 at a clip edge; a larger ``tau_neg`` makes
    negative-advantage tokens' gradient decay faster (the paper's asymmetric temperatures). The same formula as
    verl's ``compute_policy_loss_sapo`` (``verl/trainer/ppo/core_algos.py``; its log-ratio clamp to [-20, 20] kept)
    and TRL's ``loss_type="sapo"`` (``trl/trainer/grpo_trainer.py``, ``_compute_loss``), with both's defaults
    (``tau_pos`` 1.0, ``tau_neg`` 1.05). Both reduce it with ``"seq_mean_token_mean"``. Nothing is clipped:
    ``clipped`` is all False (verl reports a clip fraction of 0).

    >>> # rho = 1 on both tokens: f = 4 / tau * 1/2; A = 1 (tau 1) and A = -1 (tau 1.05)
    >>> sapo_loss(torch.zeros(2, 1), torch.zeros(2, 1), torch.tensor([1.0, -1.0]), torch.ones(2, 1)).loss  # -2; 2 / 1.05
    tensor([[-2.0000],
            [ 1.9048]])
    """
    valid, logp, old_logp, advantages = _masked_inputs(logp, old_logp, advantages, mask)
    ratio = torch.exp((logp - old_logp).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))  # (B, T) with the graph
    as_t = lambda x: torch.tensor(x, dtype=logp.dtype, device=logp.device)  # noqa: E731 (1.05 in float64, not float32)
    tau = torch.where(advantages > 0, as_t(tau_pos), as_t(tau_neg))  # (B, 1) or (B, T)
    gate = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)  # (B, T)
    loss = torch.where(valid, -gate * advantages, 0.0)  # (B, T)
    return PolicyLossTerms(loss=loss, ratio=ratio.detach(), clipped=torch.zeros_like(valid))


def gmpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float = 0.4,
    clip_high: float = 0.4,
) -> PolicyLossTerms:
    """GMPO (Zhao et al., "Geometric-Mean Policy Optimization", 2025, arXiv 2507.20673): per sequence
    ``-A * (prod_t clip(rho_t))^(1/|y|) = -A * exp(mean_t c_t)``, the geometric mean of its token ratios, with each
    token's log-ratio ``x_t = logp_t - old_logp_t`` clipped in log space on the side that binds for the sign of A:
    ``c_t = sgn(A) * min(sgn(A) x_t, sgn(A) clip(x_t, -clip_low, clip_high))`` (capped at ``clip_high`` where
    A > 0, floored at ``-clip_low`` where A < 0; the paper's range (-0.4, 0.4), i.e. rho in [e^-0.4, e^0.4]).

    verl's ``compute_policy_loss_geo_mean`` (``verl/trainer/ppo/core_algos.py``), with two differences of
    convention: its token means divide by ``|y| + 1e-8`` where these divide by ``|y|`` (a relative difference of
    1e-8 / |y|), and a per-sequence A (B,) is used as given where verl averages the broadcast (B, T) one. A per-token
    A (B, T) is averaged over the sequence's valid tokens, as verl does, and its sign taken per token. Each sequence's
    term is broadcast to its valid tokens, so ``aggregate_loss("seq_mean_token_mean", ...)`` gives verl's (and the
    paper's) mean over sequences (verl also counts rows without valid tokens, as 0; that aggregation skips them).
    ``ratio`` is the sequence's clipped geometric-mean ratio; ``clipped`` marks valid tokens with ``x_t`` outside
    [-clip_low, clip_high] on either side (verl's ``pg_clipfrac`` is the mean of ``clipped & (A > 0)``,
    ``pg_clipfrac_lower`` of ``clipped & (A < 0)``).

    >>> # log-ratios 0.6 and -0.2. A = 1: 0.6 capped at 0.4, mean 0.1. A = -1: no cap above, mean 0.2
    >>> out = gmpo_loss(torch.tensor([[0.6, -0.2], [0.6, -0.2]]), torch.zeros(2, 2), torch.tensor([1.0, -1.0]), torch.ones(2, 2))
    >>> out.loss  # -e^0.1; +e^0.2
    tensor([[-1.1052, -1.1052],
            [ 1.2214,  1.2214]])
    """
    per_token_advantages = advantages.dim() == 2
    valid, logp, old_logp, advantages = _masked_inputs(logp, old_logp, advantages, mask)
    log_ratio = logp - old_logp  # (B, T)
    sign = torch.sign(advantages)  # (B, 1) or (B, T)
    log_ratio_clipped = log_ratio.clamp(-clip_low, clip_high)  # (B, T)
    bound = sign * torch.minimum(sign * log_ratio, sign * log_ratio_clipped)  # (B, T)
    seq_log_ratio = masked_mean(bound, valid, dim=-1)  # (B,) log of the geometric mean
    if per_token_advantages:
        seq_advantage = masked_mean(advantages, valid, dim=-1)  # (B,)
    else:
        seq_advantage = advantages.squeeze(-1)  # (B,)
    ratio = torch.exp(seq_log_ratio)  # (B,)
    loss = torch.where(valid, (-seq_advantage * ratio).unsqueeze(-1), 0.0)  # (B, T) the sequence's term on each token
    clipped = (log_ratio != log_ratio_clipped) & valid  # (B, T)
    return PolicyLossTerms(loss=loss, ratio=ratio.detach().unsqueeze(-1).expand_as(loss), clipped=clipped)


#: The policy losses by name (`LossConfig.policy_loss`); "ppo" is `clipped_surrogate`, the rest return `PolicyLossTerms`.
POLICY_LOSSES: dict[str, Callable[..., PolicyLossTerms] | None] = {"ppo": None, "cispo": cispo_loss, "sapo": sapo_loss, "gmpo": gmpo_loss}


# --------------------------------------------------------------------------- value function (PPO with a critic)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation (Schulman et al., "High-Dimensional Continuous Control Using Generalized
    Advantage Estimation", 2016, arXiv 1506.02438): ``(advantages, returns)``, both (B, T), detached.

    Backward over the valid tokens, ``delta_t = r_t + gamma V_next - V_t``, ``A_t = delta_t + gamma lam A_next``,
    ``R_t = A_t + V_t``, where "next" is the next valid token and the value past the last valid token is 0 (the
    episode ends there). ``rewards (B, T)`` are per token: the sequence's score on its last valid token, plus any
    per-token ``-beta * KL``. A masked token inside a sequence (an observation in a multi-turn rollout) is skipped,
    neither taking a value nor breaking the recursion. verl's ``compute_gae_advantage_return``
    (``verl/trainer/ppo/core_algos.py``) on every valid token, with one difference: verl returns the advantages
    whitened; these are raw, and the caller whitens them (``masked_whiten(advantages, mask)``, as verl does), so
    the returns, the critic's targets, stay unwhitened either way. Both outputs are 0 at masked tokens.
    ``gamma`` and ``lam`` default to TRL's ``PPOConfig``'s (verl's: 1.0, 1.0).

    >>> # one sequence, 2 valid tokens, V = (0.5, 1.0), score 1 on the last; gamma = 1, lam = 0.5
    >>> # t=1: delta = 1 + 0 - 1 = 0, A = 0; t=0: delta = 0 + 1.0 - 0.5 = 0.5, A = 0.5 + 0.5 * 0 = 0.5
    >>> gae(torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([[0.5, 1.0, 7.0]]), torch.tensor([[1, 1, 0]]), 1.0, 0.5)
    (tensor([[0.5000, 0.0000, 0.0000]]), tensor([[1., 1., 0.]]))
    """
    valid = mask.bool()  # (B, T)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    rewards = torch.where(valid, rewards.detach(), zero)  # (B, T)
    values = torch.where(valid, values.detach(), zero)  # (B, T)
    next_value = torch.zeros_like(values[:, 0])  # (B,) the value of the next valid token; 0 past the end
    next_advantage = torch.zeros_like(values[:, 0])  # (B,)
    reversed_advantages = []
    for t in reversed(range(values.size(-1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        advantage = delta + gamma * lam * next_advantage  # (B,)
        next_value = torch.where(valid[:, t], values[:, t], next_value)  # (B,) a masked token passes them on
        next_advantage = torch.where(valid[:, t], advantage, next_advantage)  # (B,)
        reversed_advantages.append(next_advantage)
    advantages = torch.where(valid, torch.stack(reversed_advantages[::-1], dim=-1), zero)  # (B, T)
    returns = torch.where(valid, advantages + values, zero)  # (B, T)
    return advantages, returns


def token_level_rewards(scores: Tensor, mask: Tensor, kl_tokens: Tensor | None = None, beta: float = 0.0) -> Tensor:
    """Per-token rewards (B, T) for `gae`: each sequence's score (B,) on its last valid token, minus ``beta`` times
    the per-token KL estimate (B, T) on every valid token when the KL is in the reward (InstructGPT; TRL's and
    verl's ``token_level_rewards``). 0 at masked tokens and on rows without a valid token.

    >>> token_level_rewards(torch.tensor([1.0, 2.0]), torch.tensor([[1, 1, 0], [1, 0, 0]]), torch.tensor([[0.5, 1.0, 9.0], [2.0, 9.0, 9.0]]), 0.1)
    tensor([[-0.0500,  0.9000,  0.0000],
            [ 1.8000,  0.0000,  0.0000]])
    """
    valid = mask.bool()  # (B, T)
    T = valid.size(-1)
    last = torch.where(valid, torch.arange(T, device=valid.device), -1).amax(-1)  # (B,) -1: no valid token
    at_last = torch.arange(T, device=valid.device)[None, :] == last[:, None]  # (B, T)
    rewards = torch.where(at_last, scores.float()[:, None], 0.0)  # (B, T)
    if kl_tokens is not None and beta:
        rewards = rewards - beta * torch.where(valid, kl_tokens, 0.0)
    return torch.where(valid, rewards, 0.0)


def _masked_var(values: Tensor, valid: Tensor, mean: Tensor) -> Tensor:
    """Unbiased variance of ``values`` over the ``valid`` entries around ``mean``: ``sum (x - mean)^2 / (n - 1)``."""
    centred = torch.where(valid, values - mean, torch.zeros((), dtype=values.dtype, device=values.device))
    return centred.square().sum() / (valid.sum() - 1).to(values.dtype)  # (); n = 1: 0 / 0 = NaN


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """``(x - mean) / sqrt(var + 1e-8)`` with the mean and the unbiased variance over the valid entries of the
    whole tensor; ``shift_mean=False`` adds the mean back (scaled, not centred). 0 at masked entries.

    TRL's ``masked_whiten`` (``trl/experimental/ppo/ppo_trainer.py``) on the valid entries; verl's
    (``verl/utils/torch_functional.py``) differs only in dividing its means by ``n + 1e-8``. Raises with fewer than 2
    valid entries, as both do (the unbiased variance needs two; the count is read on the host); a row without valid
    tokens is fine, its entries stay 0.

    >>> masked_whiten(torch.tensor([[1.0, 3.0, 99.0]]), torch.tensor([[1, 1, 0]]))  # mean 2, var (1 + 1) / 1
    tensor([[-0.7071,  0.7071,  0.0000]])
    """
    valid = mask.bool()  # (B, T)
    count = int(valid.sum())
    if count < 2:
        raise ValueError(f"masked_whiten needs at least 2 valid entries for an unbiased variance, got {count}")
    mean = masked_mean(values, valid)  # ()
    whitened = (values - mean) * torch.rsqrt(_masked_var(values, valid, mean) + 1e-8)  # (B, T)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(valid, whitened, torch.zeros((), dtype=values.dtype, device=values.device))


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    cliprange_value: float | None = 0.5,
    agg: str = "token_mean",
    counts: tuple[float | Tensor | None, float | Tensor | None] | None = None,
    max_new_tokens: int | None = None,
) -> tuple[Tensor, Tensor]:
    """PPO's clipped value loss ``0.5 * agg(max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2))`` and its clip
    fraction (Schulman et al. 2017, "Proximal Policy Optimization Algorithms", as in OpenAI's baselines).

    ``values`` are the critic's new predictions (with the graph), ``old_values`` the rollout's, ``returns`` the GAE
    targets. verl's ``compute_value_loss`` (``verl/trainer/ppo/core_algos.py``): the 0.5 applied after the
    aggregation (the same, every aggregation being linear), ``clipfrac`` the fraction of valid tokens whose clipped
    error is strictly the larger, and ``cliprange_value`` its default (verl's ``critic.cliprange_value``; TRL's is
    0.2); verl's ``masked_mean`` divides the clip fraction by ``n + 1e-8``, this one by ``n``. ``None`` does not clip.
    ``agg`` names a registered loss aggregation, with ``counts`` = (tokens, rows) and ``max_new_tokens`` as in
    ``ppo_loss``. Returns ``(loss, clipfrac)``, ``clipfrac`` detached.

    >>> # V = 1.5 (old 1.0, clipped to 1.2), R = 2: max(0.25, 0.64) = 0.64; V = 0, R = 0: 0. Token mean 0.32, x 0.5
    >>> value_loss(torch.tensor([[1.5, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 0.0]]), torch.ones(1, 2), 0.2)
    (tensor(0.1600), tensor(0.5000))
    """
    valid = mask.bool()  # (B, T)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    values = torch.where(valid, values, zero)  # (B, T)
    old_values = torch.where(valid, old_values.detach(), zero)  # (B, T)
    returns = torch.where(valid, returns.detach(), zero)  # (B, T)
    unclipped = (values - returns).square()  # (B, T)
    if cliprange_value is None:
        clipped = unclipped
    else:
        values_clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)  # (B, T)
        clipped = (values_clipped - returns).square()  # (B, T)
    tokens, rows = (None, None) if counts is None else counts
    loss = 0.5 * aggregate_loss(agg, torch.maximum(unclipped, clipped), valid, tokens, rows, max_new_tokens)
    clipfrac = masked_mean((clipped > unclipped).to(values.dtype), valid, total=tokens).detach()
    return loss, clipfrac


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor, eps: float = 1e-5) -> Tensor:
    """``1 - Var(R - V) / (Var(R) + eps)`` over the valid tokens, unbiased variances: how much of the returns' variance
    the critic explains (1: all, 0: no better than their mean, < 0: worse). NaN with fewer than 2 valid tokens.

    verl's ``critic/vf_explained_var`` (``verl/trainer/ppo/metric_utils.py``, ``compute_data_metrics``), eps included.

    >>> explained_variance(torch.tensor([[1.0, 2.0, 9.0]]), torch.tensor([[1.0, 3.0, 0.0]]), torch.tensor([[1, 1, 0]]))
    tensor(0.7500)
    """
    with torch.no_grad():
        valid = mask.bool()  # (B, T)
        errors = returns - values  # (B, T)
        error_var = _masked_var(errors, valid, masked_mean(errors, valid))  # ()
        return_var = _masked_var(returns, valid, masked_mean(returns, valid))  # ()
        explained = 1.0 - error_var / (return_var + eps)  # ()
        return torch.where(valid.sum() >= 2, explained, torch.full_like(explained, float("nan")))


# --------------------------------------------------------------------------- rollout/training mismatch
#
# The rollout engine (vLLM, bf16 kernels) and the trainer compute slightly different log-probs of the same tokens,
# so the samples come from a policy a little off the one being trained. Importance weights pi_train / pi_rollout
# correct for it; truncating or masking them bounds their variance.


class RolloutCorrection(NamedTuple):
    """Importance weights for the rollout/training mismatch, both (B, T), and the share of tokens they changed."""

    weights: Tensor  # (B, T) detached; 0 at masked (and, for "mis", rejected) tokens. Multiply the per-token loss.
    mask: Tensor  # (B, T) bool: the valid tokens, less those "mis" rejected
    affected: Tensor  # () fraction of valid tokens whose weight was truncated ("tis") or that were rejected ("mis")


ROLLOUT_IS_MODES: frozenset[str] = frozenset({"tis", "mis"})
ROLLOUT_IS_LEVELS: frozenset[str] = frozenset({"token", "sequence"})


def rollout_is_weights(
    old_logp: Tensor,
    rollout_logp: Tensor,
    mask: Tensor,
    mode: str = "tis",
    level: str = "token",
    threshold_low: float | None = None,
    threshold_high: float | None = 2.0,
) -> RolloutCorrection:
    """Importance weights ``rho = pi_old / pi_rollout`` for the mismatch between the trainer's log-probs of the
    sampled tokens (``old_logp``, before the update) and the rollout engine's (``rollout_logp``).

    ``level="token"``: each token's ``rho_t = exp(old_logp_t - rollout_logp_t)``; ``"sequence"``: the sequence's
    ``exp(sum over its valid tokens of the log-ratios)`` on every token. ``mode="tis"`` (truncated IS; Yao et al.
    2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training", fengyao.notion.site/off-policy-rl):
    ``clip(rho, threshold_low, threshold_high)``, None meaning no bound on that side; ``"mis"`` (masked IS; "When
    Speed Kills Stability: Demystifying RL Collapse from the Training-Inference Mismatch", 2025,
    richardli.xyz/rl-collapse): rho where it lies within [threshold_low, threshold_high], else weight 0 and the token
    (or the whole sequence) leaves ``mask``.
    TRL's ``vllm_importance_sampling_mode`` (``trl/trainer/grpo_trainer.py``, ``_generate_and_score_completions``;
    ``token_truncate``, ``sequence_truncate``, ``token_mask``, ``sequence_mask`` with ``clip_min`` and ``clip_max``)
    on the valid tokens; ``"tis"`` with ``threshold_low=None`` is verl's ``rollout_is`` weights
    (``verl/trainer/ppo/rollout_corr_helper.py``, ``compute_rollout_correction_weights``, threshold 2.0 its default),
    which clamp the log-ratio to [-20, 20] first (only a ratio below e^-20 differs). The weights carry no gradient.

    >>> # token ratios 3 and 1/2: "tis" caps 3 at 2; "mis" rejects it
    >>> lp, lq = torch.tensor([[1.0986123, -0.6931472]]), torch.zeros(1, 2)
    >>> rollout_is_weights(lp, lq, torch.ones(1, 2), "tis").weights
    tensor([[2.0000, 0.5000]])
    >>> rollout_is_weights(lp, lq, torch.ones(1, 2), "mis")
    RolloutCorrection(weights=tensor([[0.0000, 0.5000]]), mask=tensor([[False,  True]]), affected=tensor(0.5000))
    """
    if mode not in ROLLOUT_IS_MODES:
        raise ValueError(f"unknown rollout IS mode {mode!r}; valid: {sorted(ROLLOUT_IS_MODES)}")
    if level not in ROLLOUT_IS_LEVELS:
        raise ValueError(f"unknown rollout IS level {level!r}; valid: {sorted(ROLLOUT_IS_LEVELS)}")
    with torch.no_grad():
        valid = mask.bool()  # (B, T)
        zero = torch.zeros((), dtype=old_logp.dtype, device=old_logp.device)
        log_ratio = torch.where(valid, old_logp - rollout_logp, zero)  # (B, T)
        if level == "sequence":
            log_ratio = log_ratio.sum(-1, keepdim=True).expand_as(log_ratio)  # (B, T)
        ratio = torch.exp(log_ratio)  # (B, T)
        if mode == "tis":
            unbounded = threshold_low is None and threshold_high is None
            weights = ratio if unbounded else ratio.clamp(min=threshold_low, max=threshold_high)  # (B, T)
            kept = valid  # (B, T)
            affected = (weights != ratio) & valid  # (B, T)
        else:
            inside = torch.ones_like(valid)  # (B, T)
            if threshold_low is not None:
                inside = inside & (ratio >= threshold_low)
            if threshold_high is not None:
                inside = inside & (ratio <= threshold_high)
            weights = torch.where(inside, ratio, zero)  # (B, T)
            kept = valid & inside  # (B, T)
            affected = valid & ~inside  # (B, T)
        weights = torch.where(valid, weights, zero)  # (B, T)
        return RolloutCorrection(weights=weights, mask=kept, affected=masked_mean(affected.to(ratio.dtype), valid))


def logprob_mismatch(logp_a: Tensor, logp_b: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(mean |a - b|, max exp|a - b|)`` over the valid tokens: how far two computations of the same tokens'
    log-probs (the rollout engine's and the trainer's) lie apart, on average and at worst as a probability ratio.
    With no valid token: (0, 1).

    >>> logprob_mismatch(torch.tensor([[0.0, -1.0, 5.0]]), torch.tensor([[-0.5, -1.0, 0.0]]), torch.tensor([[1, 1, 0]]))
    (tensor(0.2500), tensor(1.6487))
    """
    with torch.no_grad():
        valid = mask.bool()  # (B, T)
        gap = torch.where(valid, (logp_a - logp_b).abs(), torch.zeros((), dtype=logp_a.dtype, device=logp_a.device))
        return masked_mean(gap, valid), torch.exp(gap.amax())


# --------------------------------------------------------------------------- preference optimization (DPO family)
#
# Every loss here reads one `PairLogps`: each completion's log-probs summed over its completion tokens (prompt
# and padding excluded), its token count, and, for the losses that need a reference, the frozen reference's
# summed log-probs of the same tokens. Each returns the batch's loss, a scalar: the mean over pairs of a
# per-pair loss (TRL's `per_sequence_loss.mean()`), or for ORPO that mean plus a token-mean NLL, as TRL's
# trainers compute it. The numbers match TRL's on the same log-probs (checked formula by formula against TRL's
# DPOTrainer, CPOTrainer and ORPOTrainer; the names in brackets are TRL's `loss_type`).


class PairLogps(NamedTuple):
    """The log-probs of a batch of preference pairs, each (B,)."""

    chosen: Tensor  # (B,) policy log-probs of the chosen completion, summed over its tokens
    rejected: Tensor  # (B,)
    chosen_tokens: Tensor  # (B,) completion tokens counted in `chosen` (EOS included when it ended)
    rejected_tokens: Tensor  # (B,)
    ref_chosen: Tensor | None = None  # (B,) the frozen reference's, None for reference-free losses
    ref_rejected: Tensor | None = None  # (B,)


def _pair(chosen, rejected, ref_chosen=None, ref_rejected=None, chosen_tokens=(1.0,), rejected_tokens=(1.0,)) -> PairLogps:
    """A one-pair (or few-pair) `PairLogps` from numbers: the doctests' shorthand."""
    as_t = lambda x: None if x is None else torch.as_tensor(x, dtype=torch.float32).reshape(-1)  # noqa: E731
    return PairLogps(as_t(chosen), as_t(rejected), as_t(chosen_tokens), as_t(rejected_tokens), as_t(ref_chosen), as_t(ref_rejected))


def _log_ratio_margin(logps: PairLogps) -> Tensor:
    """``(chosen - ref_chosen) - (rejected - ref_rejected)`` (B,): DPO's implicit reward margin over beta."""
    if logps.ref_chosen is None or logps.ref_rejected is None:
        raise ValueError("this loss needs the reference's log-probs (ref_chosen, ref_rejected)")
    return (logps.chosen - logps.ref_chosen) - (logps.rejected - logps.ref_rejected)  # (B,)


def dpo_sigmoid_loss(logps: PairLogps, beta: float, label_smoothing: float = 0.0, gamma: float = 0.0) -> Tensor:
    """DPO (Rafailov et al. 2023, "Direct Preference Optimization"; TRL ``sigmoid``), with conservative label
    smoothing eps (cDPO, Mitchell 2023): mean of ``-(1 - eps) logsigmoid(beta h) - eps logsigmoid(-beta h)``,
    ``h = (chosen - ref_chosen) - (rejected - ref_rejected)``. With eps = 0 (the default) it is TRL's ``sigmoid``;
    the eps form is TRL's ``sigmoid`` before 1.0, which applied `label_smoothing` this way.

    >>> dpo_sigmoid_loss(_pair(-1.0, -3.0, -2.0, -2.0), beta=0.5)  # h = 1 - (-1) = 2: -logsigmoid(1)
    tensor(0.3133)
    >>> dpo_sigmoid_loss(_pair(-1.0, -3.0, -2.0, -2.0), beta=0.5, label_smoothing=0.1)  # 0.9 * 0.3133 + 0.1 * 1.3133
    tensor(0.4133)
    """
    h = beta * _log_ratio_margin(logps)  # (B,)
    return (-(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)).mean()


def dpo_robust_loss(logps: PairLogps, beta: float, label_smoothing: float = 0.0, gamma: float = 0.0) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO"; TRL ``robust``): the unbiased loss under labels
    flipped with probability eps, mean of ``(-(1 - eps) logsigmoid(beta h) + eps logsigmoid(-beta h)) / (1 - 2 eps)``.
    Unlike cDPO's smoothing (`dpo_sigmoid_loss`), the flipped term enters with a minus sign. 0 <= eps < 0.5.

    >>> dpo_robust_loss(_pair(-1.0, -3.0, -2.0, -2.0), beta=0.5, label_smoothing=0.1)  # (0.9 * 0.3133 - 0.1 * 1.3133) / 0.8
    tensor(0.1883)
    """
    h = beta * _log_ratio_margin(logps)  # (B,)
    clean = -(1 - label_smoothing) * F.logsigmoid(h)  # (B,)
    flipped = -label_smoothing * F.logsigmoid(-h)  # (B,)
    return ((clean - flipped) / (1 - 2 * label_smoothing)).mean()


def ipo_loss(logps: PairLogps, beta: float, label_smoothing: float = 0.0, gamma: float = 0.0) -> Tensor:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences", eq. 17;
    TRL ``ipo``): mean of ``(h_avg - 1 / (2 beta))^2`` where each completion's log-ratio to the reference is averaged
    over its tokens first, ``h_avg = (chosen - ref_chosen) / n_chosen - (rejected - ref_rejected) / n_rejected``
    (beta is the paper's tau).

    >>> ipo_loss(_pair(-1.0, -3.0, -2.0, -2.0, chosen_tokens=2, rejected_tokens=4), beta=1.0)  # (0.5 + 0.25 - 0.5)^2
    tensor(0.0625)
    """
    if logps.ref_chosen is None or logps.ref_rejected is None:
        raise ValueError("ipo needs the reference's log-probs (ref_chosen, ref_rejected)")
    chosen = (logps.chosen - logps.ref_chosen) / logps.chosen_tokens.clamp(min=1)  # (B,)
    rejected = (logps.rejected - logps.ref_rejected) / logps.rejected_tokens.clamp(min=1)  # (B,)
    return ((chosen - rejected - 1 / (2 * beta)) ** 2).mean()


def slic_hinge_loss(logps: PairLogps, beta: float, label_smoothing: float = 0.0, gamma: float = 0.0) -> Tensor:
    """SLiC's calibration hinge (Zhao et al. 2023, "SLiC-HF") on DPO's log-ratios (TRL ``hinge``):
    mean of ``max(0, 1 - beta h)``.

    >>> slic_hinge_loss(_pair(-1.0, -3.0, -2.0, -2.0), beta=0.25)  # h = 2: 1 - 0.5
    tensor(0.5000)
    """
    return torch.relu(1 - beta * _log_ratio_margin(logps)).mean()


def simpo_loss(logps: PairLogps, beta: float, label_smoothing: float = 0.0, gamma: float = 0.5) -> Tensor:
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward"; TRL
    CPOTrainer's ``simpo``): reference-free, on length-normalized log-probs with a target margin gamma:
    mean of ``-(1 - eps) logsigmoid(z) - eps logsigmoid(-z)``, ``z = beta (chosen / n_chosen - rejected / n_rejected) - gamma``.

    >>> simpo_loss(_pair(-2.0, -6.0, chosen_tokens=2, rejected_tokens=3), beta=2.0, gamma=1.0)  # z = 2 (-1 + 2) - 1 = 1
    tensor(0.3133)
    """
    z = beta * (logps.chosen / logps.chosen_tokens.clamp(min=1) - logps.rejected / logps.rejected_tokens.clamp(min=1)) - gamma  # (B,)
    return (-(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)).mean()


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for x <= 0 without cancellation (branch at -log 2, Maechler 2012).

    >>> log1mexp(torch.tensor([-0.6931472, -5.0]))  # log 0.5; log(1 - e^-5)
    tensor([-0.6931, -0.0068])
    """
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(logps: PairLogps, beta: float, label_smoothing: float = 0.0, gamma: float = 0.0, nll: bool = True) -> Tensor:
    """ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model"; TRL's
    ORPOTrainer): reference-free; the chosen completions' NLL (token mean over the batch) plus beta times the odds
    ratio loss, ``-mean logsigmoid(log odds(chosen) - log odds(rejected))``, on length-normalized log-probs
    ``l = logp / n`` with ``log odds = l - log(1 - exp(l))``. ``nll=False``: the odds ratio term alone (`dpo_loss`
    weighs the NLL, a per-token mean, apart from the per-pair terms).

    >>> # chosen: l = log 0.5 (odds 1), 2 tokens summing to 2 log 0.5; rejected: l = log 0.2 (odds 1/4)
    >>> orpo_loss(_pair(2 * -0.6931472, -1.6094379, chosen_tokens=2), beta=1.0)  # NLL 0.6931 - logsigmoid(log 4) 0.2231
    tensor(0.9163)
    """
    chosen = logps.chosen.float() / logps.chosen_tokens.clamp(min=1)  # (B,) length-normalized
    rejected = logps.rejected.float() / logps.rejected_tokens.clamp(min=1)  # (B,)
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))  # (B,)
    odds = -beta * F.logsigmoid(log_odds).mean()
    return chosen_nll(logps) + odds if nll else odds


def chosen_nll(logps: PairLogps) -> Tensor:
    """The chosen completions' NLL per token over the batch, ``-sum(chosen) / sum(n_chosen)``: a cross-entropy over
    every chosen completion token (RPO's term, Pang et al. 2024, "Iterative Reasoning Preference Optimization",
    TRL's ``rpo_alpha`` and ``sft`` loss; ORPO's NLL).

    >>> chosen_nll(_pair([-1.0, -3.0], [0.0, 0.0], chosen_tokens=[1, 3]))  # 4 / 4
    tensor(1.)
    """
    return -logps.chosen.sum() / logps.chosen_tokens.sum().clamp(min=1)


PreferenceLossFn = Callable[..., Tensor]

#: Preference losses by name (TRL's `loss_type` names; "orpo" is TRL's ORPOTrainer).
DPO_LOSSES: dict[str, PreferenceLossFn] = {
    "sigmoid": dpo_sigmoid_loss,
    "robust": dpo_robust_loss,
    "ipo": ipo_loss,
    "hinge": slic_hinge_loss,
    "simpo": simpo_loss,
    "orpo": orpo_loss,
}

#: The losses that read no reference log-probs: a run with only these loads no reference model.
REFERENCE_FREE_LOSSES: frozenset[str] = frozenset({"simpo", "orpo"})


class DPOLossOutput(NamedTuple):
    """``loss`` carries the graph; the rest are detached, for logging (`dpo/...`)."""

    loss: Tensor  # ()
    chosen_rewards: Tensor  # (B,) implicit rewards (see `implicit_rewards`)
    rejected_rewards: Tensor  # (B,)
    nll: Tensor  # () the chosen completions' NLL per token
    pair_loss: Tensor | None = None  # () with the graph: the per-pair terms, a mean over the pairs
    nll_weight: float = 0.0  # the NLL's weight in `loss` (nll_alpha, plus each orpo loss's weight)


def implicit_rewards(logps: PairLogps, beta: float, reference_free: bool) -> tuple[Tensor, Tensor]:
    """Each completion's implicit reward (B,) twice, detached: ``beta (logp - ref_logp)`` (DPO), or without a
    reference ``beta * logp / n`` (the length-normalized log-prob SimPO and ORPO score by, TRL's CPO and ORPO
    `rewards`). Exactly 0 when the policy's log-probs are the reference's.

    >>> implicit_rewards(_pair(-1.0, -3.0, -2.0, -2.0), beta=0.5, reference_free=False)
    (tensor([0.5000]), tensor([-0.5000]))
    """
    if reference_free:
        return (beta * logps.chosen / logps.chosen_tokens.clamp(min=1)).detach(), (beta * logps.rejected / logps.rejected_tokens.clamp(min=1)).detach()
    return (beta * (logps.chosen - logps.ref_chosen)).detach(), (beta * (logps.rejected - logps.ref_rejected)).detach()


def dpo_loss(
    logps: PairLogps,
    loss_type: str | list[str] = "sigmoid",
    beta: float = 0.1,
    loss_weights: list[float] | None = None,
    label_smoothing: float = 0.0,
    gamma: float = 0.5,
    nll_alpha: float = 0.0,
) -> DPOLossOutput:
    """``sum_i w_i DPO_LOSSES[loss_type_i](logps) + nll_alpha * chosen_nll(logps)`` (weights default to 1: TRL's
    `loss_weights`; `nll_alpha` is RPO's alpha). `gamma` is SimPO's target margin; `label_smoothing` the eps of
    cDPO, robust DPO and SimPO. Rewards are DPO's implicit ones when any loss uses the reference.

    >>> out = dpo_loss(_pair(-1.0, -3.0, -2.0, -2.0), ["sigmoid", "hinge"], beta=0.25, loss_weights=[1.0, 2.0])
    >>> out.loss  # -logsigmoid(0.5) + 2 * (1 - 0.5)
    tensor(1.4741)
    """
    names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = [1.0] * len(names) if loss_weights is None else list(loss_weights)
    if len(weights) != len(names):
        raise ValueError(f"loss_weights has {len(weights)} entries for {len(names)} loss types")
    unknown = [n for n in names if n not in DPO_LOSSES]
    if unknown:
        raise ValueError(f"unknown preference loss {unknown[0]!r}; valid: {sorted(DPO_LOSSES)}")
    # the per-pair terms (a mean over pairs) apart from the NLL (a mean over chosen tokens, ORPO's included), so a
    # caller can weigh each by its own count under data parallelism (`DPOModule.training_step`)
    pair_loss = sum(
        w * (orpo_loss(logps, beta, nll=False) if n == "orpo" else DPO_LOSSES[n](logps, beta, label_smoothing, gamma))
        for n, w in zip(names, weights)
    )
    nll_weight = nll_alpha + sum(w for n, w in zip(names, weights) if n == "orpo")
    nll = chosen_nll(logps)
    loss = pair_loss + nll_weight * nll if nll_weight else pair_loss
    chosen, rejected = implicit_rewards(logps, beta, reference_free=all(n in REFERENCE_FREE_LOSSES for n in names))
    return DPOLossOutput(loss, chosen, rejected, nll.detach(), pair_loss, nll_weight)
