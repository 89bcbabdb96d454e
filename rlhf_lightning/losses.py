"""Pure tensor functions for reward modelling and PPO-style policy optimisation.

Conventions: ``B`` batch, ``T`` sequence length, ``V`` vocabulary, ``N`` number of
sampled completions. A token ``mask`` is bool or 0/1 float and marks the valid
completion tokens; masked-out entries never contribute, even if NaN/inf.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "KL_ESTIMATORS",
    "PPOLossOutput",
    "batch_mean",
    "batch_whiten",
    "bradley_terry_loss",
    "clipped_surrogate",
    "compute_advantages",
    "entropy_from_logits",
    "group_mean",
    "group_whiten",
    "kl_in_reward",
    "kl_k1",
    "kl_k3",
    "kl_penalty",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "pairwise_accuracy",
    "ppo_loss",
    "rloo",
    "token_logprobs",
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


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of ``softmax(logits)`` over the last axis, in float32.

    >>> entropy_from_logits(torch.zeros(1, 1, 4))  # uniform over 4 -> log 4
    tensor([[1.3863]])
    """
    probs = torch.softmax(logits.float(), dim=-1)  # (B, T, V)
    return torch.special.entr(probs).sum(-1)  # (B, T); entr(0) = 0 handles -inf logits


def token_logprobs(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    temperature: float = 1.0,
) -> Tensor:
    """Teacher-forced log-probs of each token given its prefix, from one forward.

    Entry ``[:, t]`` is ``log p(input_ids[:, t] | input_ids[:, :t])`` for ``t >= 1``;
    entry ``[:, 0]`` has no prefix and is 0.0.

    >>> # model whose logits after token 0 are [0, log 3] -> p(1 | 0) = 0.75
    >>> # token_logprobs(model, tensor([[0, 1]]), ones) -> [[0.0, log 0.75]] = [[0.0, -0.2877]]
    """
    logits = model(input_ids, attention_mask)  # (B, T, V)
    shifted = logprobs_from_logits(logits[:, :-1], input_ids[:, 1:], temperature)  # (B, T-1)
    return F.pad(shifted, (1, 0), value=0.0)  # (B, T)


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


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    """View ``rewards (N,)`` as ``(N // group_size, group_size)``; validate the layout."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D, got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"number of rewards ({rewards.numel()}) must be a positive multiple of "
            f"group_size ({group_size})"
        )
    return rewards.view(-1, group_size)  # (G, K)


def batch_mean(rewards: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """``R - mean(R)`` over the whole batch.

    >>> batch_mean(torch.tensor([1.0, 0.0, 0.0, 0.0]), group_size=2)
    tensor([ 0.7500, -0.2500, -0.2500, -0.2500])
    """
    _groups(rewards, group_size)
    return rewards - rewards.mean()  # (N,)


def batch_whiten(rewards: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """``(R - mean(R)) / max(std(R), eps)`` with the population std over the batch.

    >>> batch_whiten(torch.tensor([1.0, 0.0]), group_size=1)
    tensor([ 1., -1.])
    """
    _groups(rewards, group_size)
    std = rewards.std(unbiased=False).clamp(min=eps)  # ()
    return (rewards - rewards.mean()) / std  # (N,)


def group_mean(rewards: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """``R - mean`` of the reward's own prompt group.

    >>> group_mean(torch.tensor([1.0, 0.0, 0.0, 1.0]), group_size=2)
    tensor([ 0.5000, -0.5000, -0.5000,  0.5000])
    """
    grouped = _groups(rewards, group_size)  # (G, K)
    return (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)  # (N,)


def group_whiten(rewards: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """``(R - group mean) / (group std + eps)``, unbiased std within each group (GRPO).

    >>> group_whiten(torch.tensor([1.0, 0.0]), group_size=2, eps=0.0)  # std = sqrt(0.5)
    tensor([ 0.7071, -0.7071])
    """
    if group_size < 2:
        raise ValueError(f"group_whiten needs group_size >= 2 for a group std, got {group_size}")
    grouped = _groups(rewards, group_size)  # (G, K)
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # (G, K)
    return (centred / (grouped.std(dim=1, keepdim=True) + eps)).reshape(-1)  # (N,)


def rloo(rewards: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """Leave-one-out: ``R_i`` minus the mean of the other ``K - 1`` rewards of its group.

    Equal to ``K / (K - 1) * (R_i - group mean)``.

    >>> rloo(torch.tensor([3.0, 0.0, 0.0]), group_size=3)
    tensor([ 3.0000, -1.5000, -1.5000])
    """
    if group_size < 2:
        raise ValueError(
            f"rloo needs at least 2 samples per prompt (group_size >= 2), got {group_size}"
        )
    grouped = _groups(rewards, group_size)  # (G, K)
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # (G, K)
    return (centred * group_size / (group_size - 1)).reshape(-1)  # (N,)


AdvantageFn = Callable[[Tensor, int, float], Tensor]

ADVANTAGE_ESTIMATORS: dict[str, AdvantageFn] = {
    "batch_mean": batch_mean,
    "batch_whiten": batch_whiten,
    "group_mean": group_mean,
    "group_whiten": group_whiten,
    "rloo": rloo,
}


def compute_advantages(
    name: str, rewards: Tensor, group_size: int, eps: float = 1e-6
) -> Tensor:
    """Per-sequence advantages ``(N,)`` with the estimator registered under ``name``.

    >>> compute_advantages("rloo", torch.tensor([3.0, 0.0, 0.0]), 3)
    tensor([ 3.0000, -1.5000, -1.5000])
    """
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(
            f"unknown advantage estimator {name!r}; valid: {sorted(ADVANTAGE_ESTIMATORS)}"
        )
    return ADVANTAGE_ESTIMATORS[name](rewards, group_size, eps)


# --------------------------------------------------------------------------- KL


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token ``logp - ref_logp`` (unbiased, can be negative).

    >>> kl_k1(torch.tensor([[0.0]]), torch.tensor([[-1.0]]))
    tensor([[1.]])
    """
    return logp - ref_logp  # (B, T)


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token ``exp(ref - logp) - (ref - logp) - 1`` (Schulman's k3, always >= 0).

    >>> kl_k3(torch.tensor([[0.0]]), torch.tensor([[0.6931472]]))  # 2 - log 2 - 1
    tensor([[0.3069]])
    """
    log_ratio = ref_logp - logp  # (B, T)
    return torch.expm1(log_ratio) - log_ratio  # (B, T)


KLFn = Callable[[Tensor, Tensor], Tensor]

KL_ESTIMATORS: dict[str, KLFn] = {"k1": kl_k1, "k3": kl_k3}


def kl_penalty(name: str, logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token KL ``(B, T)`` with the estimator registered under ``name``.

    >>> kl_penalty("k1", torch.tensor([[0.0]]), torch.tensor([[-1.0]]))
    tensor([[1.]])
    """
    if name not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {name!r}; valid: {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[name](logp, ref_logp)


def kl_in_reward(rewards: Tensor, kl_tokens: Tensor, mask: Tensor, beta: float) -> Tensor:
    """``rewards - beta * sum of KL over each sequence's valid tokens`` (pass detached KL).

    >>> kl_in_reward(torch.tensor([1.0]), torch.tensor([[0.1, 0.2, 9.0]]),
    ...              torch.tensor([[1, 1, 0]]), beta=0.5)
    tensor([0.8500])
    """
    return rewards - beta * masked_sum(kl_tokens, mask, dim=-1)  # (B,)


# --------------------------------------------------------------------------- PPO


def clipped_surrogate(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, clip_eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO clipped objective per token: ``min(rho * A, clip(rho, 1-eps, 1+eps) * A)``.

    ``advantages`` is per sequence ``(B,)`` (broadcast to tokens) or per token
    ``(B, T)``. Returns ``(objective, ratio, clipped)``, all ``(B, T)``. ``clipped``
    follows the TRL definition of clipfrac: the clipped term is strictly smaller
    than the unclipped one, i.e. the token's gradient is cut off. Unlike
    ``|rho - 1| > eps`` it ignores clipping on the side that does not bind.

    >>> obj, ratio, clipped = clipped_surrogate(
    ...     torch.log(torch.tensor([[1.5, 0.5]])), torch.zeros(1, 2), torch.tensor([1.0]), 0.2)
    >>> obj, clipped  # min(1.5, 1.2) = 1.2 (clipped); min(0.5, 0.8) = 0.5 (not)
    (tensor([[1.2000, 0.5000]]), tensor([[ True, False]]))
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)  # (B, 1)
    ratio = torch.exp(logp - old_logp)  # (B, T)
    unclipped = ratio * advantages  # (B, T)
    clipped_obj = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages  # (B, T)
    objective = torch.minimum(unclipped, clipped_obj)  # (B, T)
    clipped = clipped_obj < unclipped  # (B, T)
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
    clip_eps: float,
    beta: float,
    kl_estimator: str = "k1",
    total_tokens: float | Tensor | None = None,
) -> PPOLossOutput:
    """``-token_mean(min(rho A, clip(rho) A)) + beta * token_mean(KL)``.

    Token means run over the valid tokens of the whole batch (or divide by
    ``total_tokens``). ``kl`` is always reported, also with ``beta=0`` (which is
    what the caller passes when the KL is placed in the reward instead).
    ``approx_kl`` is the k3 estimate of KL(old || new): mean of ``(rho-1) - log rho``.

    >>> # one token, rho = 1, A = 2, logp - ref = 0.1, beta = 0.5:
    >>> # loss = -(1 * 2) + 0.5 * 0.1 = -1.95
    """
    valid = mask.bool()  # (B, T)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    # Zero out masked positions first so NaN/inf there cannot leak into gradients.
    logp = torch.where(valid, logp, zero)  # (B, T)
    old_logp = torch.where(valid, old_logp, zero)  # (B, T)
    ref_logp = torch.where(valid, ref_logp, zero)  # (B, T)
    if advantages.dim() == 2:
        advantages = torch.where(valid, advantages, zero)  # (B, T)

    objective, ratio, clipped = clipped_surrogate(logp, old_logp, advantages, clip_eps)
    policy_loss = -masked_mean(objective, valid, total=total_tokens)
    kl = masked_mean(kl_penalty(kl_estimator, logp, ref_logp), valid, total=total_tokens)
    loss = policy_loss + beta * kl

    with torch.no_grad():
        log_ratio = logp - old_logp  # (B, T)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, valid, total=total_tokens)
        clipfrac = masked_mean(clipped.float(), valid, total=total_tokens)

    return PPOLossOutput(
        loss=loss,
        policy_loss=policy_loss.detach(),
        kl=kl.detach(),
        clipfrac=clipfrac,
        approx_kl=approx_kl,
    )
