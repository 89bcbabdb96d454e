"""PPO's update over plain models: `ppo_epochs` passes of shuffled minibatches over a rollout, each minibatch one
optimizer step, its micro-batches' gradients summed before it.

`ppo_update(policy, optimizer, rollout, cfg, beta, generator, backward, clip)` takes the backward and the
clipping as functions, so `PPOModule` passes Lightning's (`manual_backward`, its precision-aware clipping) and a
test passes `Tensor.backward` and a plain norm clip.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from rlhf_lightning.distributed import max_over_ranks, sum_over_ranks, world_size
from rlhf_lightning.losses import PPOLossOutput, drop_truncated, masked_mean, ppo_loss, value_loss
from rlhf_lightning.option_groups import CriticConfig, KLConfig, LossConfig, RolloutConfig, UpdateConfig
from rlhf_lightning.rl.critic import completion_values
from rlhf_lightning.rl.rollout import Rollout, row_slices

__all__ = [
    "CriticUpdate", "PPOConfig", "agreed_micro_batches", "clip_and_check", "critic_minibatch_loss", "loss_counts", "loss_mask", "masked_abs_max",
    "minibatch_loss", "ppo_update",
]

METRICS = ("ppo/loss", "ppo/policy_loss", "ppo/kl", "ppo/clipfrac", "ppo/approx_kl")  # `PPOLossOutput`'s fields, named


@dataclass(frozen=True)
class PPOConfig:
    """The option groups a PPO rollout and update read."""

    rollout: RolloutConfig
    loss: LossConfig
    kl: KLConfig
    update: UpdateConfig


@dataclass
class CriticUpdate:
    """The critic's side of an update: its model, its own optimizer, options and clipping (`clip(loss)`, as the
    policy's)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    cfg: CriticConfig
    clip: Callable[[torch.Tensor], None]


def masked_abs_max(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The largest |value| where `mask` is set (0 where none is).

    >>> masked_abs_max(torch.tensor([0.5, -2.0, 9.0]), torch.tensor([True, True, False]))
    tensor(2.)
    """
    return torch.where(mask, values.abs(), torch.zeros_like(values)).max()


def loss_mask(mb: Rollout, cfg: LossConfig) -> torch.Tensor:
    """(B, N) bool: the tokens that get a loss (with `mask_truncated`, none of a completion without EOS)."""
    return drop_truncated(mb.completion_mask, mb.finished) if cfg.mask_truncated else mb.completion_mask


def loss_counts(mb: Rollout, cfg: LossConfig) -> torch.Tensor:
    """(valid tokens, sequences with a valid token) of a minibatch over all ranks, each at least 1: what its loss
    divides by."""
    mask = loss_mask(mb, cfg)
    return sum_over_ranks(torch.stack([mask.sum(), mask.any(-1).sum()]).float()).clamp(min=1)


def agreed_micro_batches(
    rows: int, chunks: int, most: int, micro_batch_size: int | None, device: torch.device | None = None
) -> list[list[slice]]:
    """The row slices of each minibatch of an update over this rank's `rows` (`chunks` shuffled parts, at most
    `most`), `micro_batch_size` rows a forward, padded with empty slices to what every rank runs.

    Each part's `loss_counts` is a collective under any data parallelism, and each forward and backward is one under
    FSDP2 (the blocks' all-gather and reduce-scatter), so every rank must run as many minibatches and micro-batches.
    Ranks hold different numbers of rows when dynamic sampling keeps different numbers of groups: a rank with fewer
    makes forwards of no rows (a zero gradient, its part of the collectives). The same slices as `row_slices` in one
    process; one all-reduce of `most` counts otherwise.

    >>> agreed_micro_batches(5, 2, 4, 2)
    [[slice(0, 2, None), slice(2, 3, None)], [slice(0, 2, None)]]
    """
    sizes = [len(part) for part in torch.arange(rows).chunk(chunks)]  # the parts' sizes: `ppo_update`'s chunking
    own = [row_slices(size, micro_batch_size) if size else [] for size in sizes]
    if world_size() == 1:
        return own
    counts = torch.zeros(most, dtype=torch.long, device=device)  # on the collectives' device (nccl: the GPU)
    counts[: len(own)] = torch.tensor([len(s) for s in own])
    agreed = max_over_ranks(counts).tolist()  # (most,) micro-batches of each part, 0 past the last part
    return [
        (own[k] if k < len(own) else []) + [slice(0, 0)] * (n - (len(own[k]) if k < len(own) else 0))
        for k, n in enumerate(agreed) if n
    ]


def minibatch_loss(
    policy: nn.Module, mb: Rollout, cfg: PPOConfig, beta: float, counts: torch.Tensor | None = None
) -> tuple[PPOLossOutput, torch.Tensor, torch.Tensor]:
    """(loss output, new log-probs (B, N), entropy) of a minibatch, from one policy forward.

    The loss divides by `counts` (`loss_counts` of the minibatch this is part of; None: of `mb` itself) and is
    scaled by the world size because DDP averages gradients, so summing the parts' gradients (over micro-batches
    and ranks) gives the gradient of the loss on the global minibatch. With `mask_truncated`, completions without
    EOS have no valid token."""
    mask = loss_mask(mb, cfg.loss)  # (B, N)
    counts = loss_counts(mb, cfg.loss) if counts is None else counts
    logprobs, entropy = mb.logprobs(policy, cfg.rollout.temperature, return_entropy=True)  # (B, N), (B, N) no gradient
    out = ppo_loss(
        logprobs, mb.old_logprobs, mb.ref_logprobs, mb.advantages, mask, cfg.loss, counts,
        beta=0.0 if cfg.kl.in_reward else beta, kl_estimator=cfg.kl.estimator, max_new_tokens=cfg.rollout.max_new_tokens,
        kl_clamp=cfg.kl.clamp, is_weights=mb.is_weights,
    )
    world = world_size()
    if world > 1:
        out = PPOLossOutput(*(v * world for v in out))
    with torch.no_grad():
        entropy = masked_mean(entropy, mask, total=counts[0]) * world
    return out, logprobs, entropy


def critic_minibatch_loss(critic: nn.Module, mb: Rollout, cliprange_value: float | None, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(value loss, clip fraction) of a minibatch (`losses.value_loss`, token mean over its completion tokens), from
    one critic forward. It divides by `tokens`, the global minibatch's completion tokens, and is scaled by the world
    size (DDP averages gradients), as the policy's."""
    values = completion_values(critic, mb.input_ids, mb.attention_mask, mb.completion_ids.size(1))  # (B, N)
    loss, clipfrac = value_loss(values, mb.values, mb.returns, mb.completion_mask, cliprange_value, counts=(tokens, None))
    return loss * world_size(), clipfrac * world_size()


def ppo_update(
    policy: nn.Module,
    optimizer: torch.optim.Optimizer,
    rollout: Rollout,
    cfg: PPOConfig,
    beta: float,
    generator: torch.Generator,
    backward: Callable[[torch.Tensor], None],
    clip: Callable[[torch.Tensor], None],
    scheduler=None,
    critic: CriticUpdate | None = None,
    update_policy: bool = True,
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """`ppo_epochs` x shuffled minibatches of backward / clip / step: (mean metrics over the optimizer steps, the
    largest |ratio - 1| of the first minibatch before any step: 0 when the update's log-probs are generation's;
    None when the policy did not train).

    `backward(loss)` back-propagates one micro-batch's loss; `clip(loss)` clips the minibatch's summed gradients
    (and may refuse a non-finite loss or norm) before `optimizer.step()`; `scheduler`, if any, steps after it.
    The minibatches' order comes from `generator`. With `critic`, each minibatch also takes one step of the
    critic's optimizer on the clipped value loss toward the rollout's returns (`critic/value_loss`,
    `critic/vf_clipfrac`); without `update_policy` (the critic's warm-up) only the critic trains."""
    B = rollout.completion_ids.size(0)
    chunks = max(1, min(cfg.update.num_minibatches, B))
    micro_batches = agreed_micro_batches(B, chunks, cfg.update.num_minibatches, cfg.rollout.micro_batch_size, rollout.completion_ids.device)
    sums: dict[str, torch.Tensor] = {}
    first_ratio_error = None
    gap_sum = gap_tokens = gap_max = None  # the first minibatch's |trainer - rollout| log-prob gaps, before any step
    steps = 0
    for _ in range(cfg.update.ppo_epochs):
        perm = torch.randperm(B, generator=generator, device=rollout.completion_ids.device)
        parts = list(perm.chunk(chunks))  # at most `chunks` parts (5 rows in 4 chunks: 3 parts)
        parts += [perm[:0]] * (len(micro_batches) - len(parts))  # in step with ranks that have more parts: empty ones
        steps += len(parts)
        for idx, slices in zip(parts, micro_batches):
            mb = rollout.select(idx)
            step: dict[str, torch.Tensor] = {}
            if critic is not None:
                step.update(_critic_step(critic, mb, backward, slices))
            if not update_policy:
                for name, value in step.items():
                    sums[name] = sums.get(name, 0.0) + value
                continue
            counts = loss_counts(mb, cfg.loss)
            optimizer.zero_grad()
            ratio_error = None
            for rows in slices:
                micro = mb.select(rows)
                out, logprobs, entropy = minibatch_loss(policy, micro, cfg, beta, counts)
                if first_ratio_error is None and micro.completion_ids.size(0):  # before any step: must be 1 (same log-probs as generation)
                    error = masked_abs_max(torch.exp(logprobs.detach() - micro.old_logprobs) - 1, micro.completion_mask)
                    ratio_error = error if ratio_error is None else torch.maximum(ratio_error, error)
                    sampled = micro.old_logprobs if micro.rollout_logprobs is None else micro.rollout_logprobs
                    gap = torch.where(micro.completion_mask, (logprobs.detach() - sampled).abs(), 0.0)  # (b, N)
                    gap_sum = gap.sum() if gap_sum is None else gap_sum + gap.sum()
                    gap_tokens = micro.completion_mask.sum() if gap_tokens is None else gap_tokens + micro.completion_mask.sum()
                    gap_max = gap.amax() if gap_max is None else torch.maximum(gap_max, gap.amax())
                backward(out.loss)
                for name, value in zip(METRICS, out):
                    step[name] = step.get(name, 0.0) + value.detach()
                step["ppo/entropy"] = step.get("ppo/entropy", 0.0) + entropy
            if first_ratio_error is None:  # a rank without rows in the first minibatch measured nothing
                first_ratio_error = ratio_error if ratio_error is not None else torch.zeros((), device=rollout.completion_ids.device)
            clip(step["ppo/loss"])
            optimizer.step()
            if scheduler is not None:  # manual optimization: the warm-up is stepped here
                scheduler.step()
            for name, value in step.items():
                sums[name] = sums.get(name, 0.0) + value
    metrics = {k: v / steps for k, v in sums.items()}  # means over the optimizer steps taken
    if not update_policy:
        return metrics, None
    # how far the trainer's log-probs of the sampled tokens lie from the rollout's (`losses.logprob_mismatch`)
    if gap_sum is None:  # this rank had no row in the first minibatch (dynamic sampling kept fewer groups here)
        gap_sum = gap_tokens = gap_max = torch.zeros((), device=rollout.completion_ids.device)
    metrics["rollout/logprob_mismatch"] = gap_sum / gap_tokens.clamp(min=1)
    metrics["rollout/logprob_mismatch_max_ratio"] = torch.exp(gap_max)
    if rollout.is_affected is not None:
        metrics["rollout/is_affected_frac"] = rollout.is_affected
    if rollout.kl is None:  # no reference forward (beta = 0): the loss's KL term measured nothing
        metrics.pop("ppo/kl")
    return metrics, first_ratio_error


def _critic_step(critic: CriticUpdate, mb: Rollout, backward: Callable[[torch.Tensor], None], slices: list[slice]) -> dict[str, torch.Tensor]:
    """One optimizer step of the critic on minibatch `mb`, its micro-batches' (`slices`) gradients summed: its metrics."""
    tokens = sum_over_ranks(mb.completion_mask.sum().float()).clamp(min=1)
    critic.optimizer.zero_grad()
    loss_sum = clipfrac_sum = None
    for rows in slices:
        loss, clipfrac = critic_minibatch_loss(critic.model, mb.select(rows), critic.cfg.cliprange_value, tokens)
        backward(loss)
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        clipfrac_sum = clipfrac if clipfrac_sum is None else clipfrac_sum + clipfrac
    critic.clip(loss_sum)
    critic.optimizer.step()
    return {"critic/value_loss": loss_sum, "critic/vf_clipfrac": clipfrac_sum}


def clip_and_check(params: list[torch.Tensor], loss: torch.Tensor, max_norm: float | None, clip: Callable[[float], None] | None = None, where: str = "") -> None:
    """Clip the (already synchronized) gradients of `params` to norm `max_norm` (None: no clipping) and raise
    `FloatingPointError` before the optimizer step if the loss or the norm is not finite.

    `clip(max_norm)`, if given, clips instead of `clip_grad_norm_` after the check (Lightning's, which owns a mixed-precision
    gradient scaler); otherwise the clip's own norm is the one checked: one norm over the gradients, not two."""
    if max_norm is not None and clip is None:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
    if hasattr(norm, "full_tensor"):  # sharded (DTensor) gradients: the norm over every rank's shards
        norm = norm.full_tensor()
    if not (torch.isfinite(loss) and torch.isfinite(norm)):
        raise FloatingPointError(
            f"PPO loss {float(loss)} / gradient norm {float(norm)} is not finite{where}: stopping before the optimizer "
            "step (no checkpoint of these weights is written); lower lr or check the reward"
        )
    if max_norm is not None and clip is not None:
        clip(max_norm)

