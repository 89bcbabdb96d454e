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
    "DPO_LOSSES",
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
) -> PPOLossOutput:
    """``-agg(min(rho A, clip(rho) A)) + beta * agg(KL)``, ``agg`` a registered loss aggregation.

    ``cfg`` is the loss's option group (`option_groups.LossConfig`: ``clip_range``, ``clip_c``, ``ratio_level``,
    ``loss_agg``; None: its defaults, the plain clipped surrogate: the token mean over the valid tokens of the whole
    batch, the per-token ratio, the symmetric clip 0.2). ``counts`` = (tokens, rows) the aggregation divides by (the
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

    log_ratio = log_importance_ratio(ratio_level, logp, old_logp, valid)  # (B, T)
    objective, ratio, clipped = clipped_surrogate(log_ratio, advantages, clip_low, clip_high, clip_c)
    counts = (total_tokens, total_rows, max_new_tokens)
    policy_loss = -aggregate_loss(loss_agg, objective, valid, *counts)
    kl = aggregate_loss(loss_agg, kl_penalty(kl_estimator, logp, ref_logp), valid, *counts)
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
