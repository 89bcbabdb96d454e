"""A PPO rollout over plain models: sample K completions per prompt, score them, take the reference's log-probs,
compute advantages over every rank's rewards.

Nothing here knows Lightning: `RolloutCollector` holds the policy, the frozen reference, the tokenizer, a scoring
function and the option groups (`option_groups`), and `collect(batch, generator, beta)` returns the step's
`Rollout` and what was drawn for its metrics. `PPOModule` builds one and calls it once per training step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from rlhf_lightning.distributed import gather_rows, gather_uneven_rows, max_over_ranks, sum_over_ranks
from rlhf_lightning.generation import Generation
from rlhf_lightning.losses import compute_advantages, kl_in_reward, kl_penalty, masked_sum, rollout_is_weights
from rlhf_lightning.option_groups import CriticConfig, KLConfig, RolloutConfig
from rlhf_lightning.padding import pad_columns
from rlhf_lightning.completions import complete
from rlhf_lightning.rl.critic import completion_values, critic_advantages
from rlhf_lightning.scoring import token_logprobs
from rlhf_lightning.sharding import in_lockstep
from rlhf_lightning.tokenizer import Tokenizer

__all__ = ["Drawn", "Rollout", "RolloutCollector", "Samples", "global_advantages", "informative_groups", "row_slices"]

#: (prompts, completions, EOS flags (B,), gold answers) -> rewards (B,), validated, penalties included
ScoreFn = Callable[[list[str], list[str], torch.Tensor, list[str | None]], torch.Tensor]


@dataclass
class Rollout:
    """One rollout's tensors; rows are prompts repeated K times consecutively (a prompt's group is contiguous)."""

    input_ids: torch.Tensor  # (B, P + N) left-padded prompt ++ right-padded completion
    attention_mask: torch.Tensor  # (B, P + N) bool: prompt_mask ++ completion_mask
    completion_ids: torch.Tensor  # (B, N)
    completion_mask: torch.Tensor  # (B, N) bool, True up to and including EOS
    old_logprobs: torch.Tensor  # (B, N) generation's log-probs (temperature-scaled softmax); the trainer's with `rollout_is`
    ref_logprobs: torch.Tensor  # (B, N) frozen reference, same temperature (the old log-probs when beta = 0: unused)
    rewards: torch.Tensor  # (B,) from the reward source (penalty included, before any KL shaping)
    advantages: torch.Tensor  # (B,) per sequence, broadcast to tokens
    finished: torch.Tensor | None = None  # (B,) bool, True where the completion emitted EOS
    kl: torch.Tensor | None = None  # (B,) summed per-token KL estimate to the reference (None: not computed, beta = 0)
    rollout_logprobs: torch.Tensor | None = None  # (B, N) generation's log-probs, when the old ones are the trainer's
    is_weights: torch.Tensor | None = None  # (B, N) `rollout_is` weights on the policy loss (None: off)
    is_affected: torch.Tensor | None = None  # () share of tokens whose weight was truncated or masked
    values: torch.Tensor | None = None  # (B, N) the critic's values at sampling (`advantage: gae`; None: no critic)
    returns: torch.Tensor | None = None  # (B, N) GAE's returns, the critic's targets

    def logprobs(self, model: nn.Module, temperature: float, return_entropy: bool = False):
        """`model`'s log-probs (B, N) of the completion tokens at `temperature` (and each position's entropy (B, N)
        with `return_entropy`), from one forward and one pass over its logits (`scoring.token_logprobs`)."""
        return token_logprobs(model, self.input_ids, self.attention_mask, temperature, self.completion_ids.size(1), return_entropy=return_entropy)

    def select(self, idx: torch.Tensor | slice) -> "Rollout":
        return Rollout(**{k: v if v is None or k == "is_affected" else v[idx] for k, v in self.__dict__.items()})


@dataclass
class Samples:
    """Completions sampled for a batch of prompts (K consecutive rows per prompt) and their rewards."""

    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P) bool
    gen: Generation  # completions (B, N), their log-probs, lengths, EOS flags
    rewards: torch.Tensor  # (B,)
    prompts: list[str]
    completions: list[str]
    golds: list[str | None]

    def select(self, idx: torch.Tensor) -> "Samples":
        rows = idx.tolist()
        gen = Generation(*(getattr(self.gen, f)[idx] for f in Generation.__dataclass_fields__))
        pick = lambda xs: [xs[i] for i in rows]  # noqa: E731
        return Samples(self.prompt_ids[idx], self.prompt_mask[idx], gen, self.rewards[idx], pick(self.prompts), pick(self.completions), pick(self.golds))

    def select_groups(self, keep: torch.Tensor, samples_per_prompt: int) -> "Samples":
        """The rows of the groups where `keep` (G,) is True."""
        rows = keep.repeat_interleave(samples_per_prompt).nonzero().squeeze(-1)
        return self.select(rows)

    @staticmethod
    def cat(parts: list["Samples"], pad_id: int) -> "Samples":
        """Rows of every part in order; prompts re-padded on the left, completions on the right."""
        if len(parts) == 1:
            return parts[0]
        P = max(p.prompt_ids.size(1) for p in parts)
        return Samples(
            torch.cat([pad_columns(p.prompt_ids, P, pad_id, left=True) for p in parts]),
            torch.cat([pad_columns(p.prompt_mask, P, False, left=True) for p in parts]),
            Generation.cat([p.gen for p in parts], pad_id),
            torch.cat([p.rewards for p in parts]),
            [x for p in parts for x in p.prompts],
            [x for p in parts for x in p.completions],
            [x for p in parts for x in p.golds],
        )


@dataclass
class Drawn:
    """What a step sampled, for its `rollout/*` metrics: every round's samples, the rounds run, the groups kept
    (dynamic sampling; None without it)."""

    samples: list[Samples]
    rounds: int = 1
    kept_groups: int | None = None


def informative_groups(rewards: torch.Tensor, samples_per_prompt: int) -> torch.Tensor:
    """(G,) bool: groups of `samples_per_prompt` consecutive rewards that are not all equal (they carry a signal
    under group baselines). [1, 1, 0, 1] with group size 2 -> [False, True]."""
    groups = rewards.view(-1, samples_per_prompt)  # (G, K)
    return (groups.max(1).values - groups.min(1).values) > 1e-6


def global_advantages(rewards: torch.Tensor, estimator: str, samples_per_prompt: int) -> torch.Tensor:
    """Advantages (B,) of this rank's rows, computed with the statistics of every rank's rewards (ranks may hold
    different numbers of rows: dynamic sampling keeps each rank's informative groups)."""
    every, own = gather_uneven_rows(rewards)  # (B_global,)
    return compute_advantages(estimator, every, samples_per_prompt)[own]


def row_slices(rows: int, size: int | None) -> list[slice]:
    """Consecutive slices of at most `size` rows covering `rows` (one slice when `size` is None).

    >>> row_slices(5, 2)
    [slice(0, 2, None), slice(2, 4, None), slice(4, 5, None)]
    """
    step = size or max(rows, 1)
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


class RolloutCollector:
    """Samples, scores and turns a batch of prompts into a `Rollout`, on plain models.

    Args:
        policy: the model that samples (its log-probs at sampling are the old log-probs).
        reference: the frozen reference (read when `collect` is told to: the KL term is zero with beta = 0).
        tokenizer: the policy's.
        score: rewards of decoded completions, validated and with penalties (`PPOModule.score`).
        rollout: the rollout's options; kl: where the KL goes and its estimator.
        draw_prompts: n -> a further batch of prompts (dynamic sampling's extra rounds; `PromptDataModule`).
        critic: the value model of `advantage: gae` (`rl.critic`) and its options; None without a critic.
    """

    def __init__(
        self,
        policy: nn.Module,
        reference: nn.Module | None,
        tokenizer: Tokenizer,
        score: ScoreFn,
        rollout: RolloutConfig,
        kl: KLConfig,
        draw_prompts: Callable[[int], dict] | None = None,
        critic: tuple[nn.Module, CriticConfig] | None = None,
    ) -> None:
        self.policy, self.reference, self.tokenizer, self.score = policy, reference, tokenizer, score
        self.cfg, self.kl = rollout, kl
        self.draw_prompts = draw_prompts
        self.critic = critic

    @torch.no_grad()
    def sample(self, batch: dict, generator: torch.Generator) -> Samples:
        """K completions per prompt of `batch` (consecutive rows: a prompt's group stays contiguous), scored."""
        cfg = self.cfg
        K = cfg.samples_per_prompt
        prompt_ids = batch["prompt_ids"].repeat_interleave(K, 0)  # (B, P)
        prompt_mask = batch["prompt_mask"].bool().repeat_interleave(K, 0)  # (B, P)
        prompts = [p for p in batch["prompts"] for _ in range(K)]
        golds = [g for g in batch["golds"] for _ in range(K)]
        device = batch["prompt_ids"].device.type
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16"):  # a lower-precision engine
            completions, gen = complete(  # each prompt's forward once, its K samples from it
                self.policy, self.tokenizer, batch["prompt_ids"], batch["prompt_mask"], cfg.max_new_tokens, temperature=cfg.temperature,
                generator=generator, batch_size=cfg.generation_batch_size, samples_per_prompt=K, compile=cfg.compile,
            )
        gen.logprobs = gen.logprobs.float()
        rewards = self.score(prompts, completions, gen.finished, golds)  # (B,) text in, penalty included
        return Samples(prompt_ids, prompt_mask, gen, rewards, prompts, completions, golds)

    @torch.no_grad()
    def collect(self, batch: dict, generator: torch.Generator, beta: float, use_reference: bool = True) -> tuple[Rollout | None, Drawn]:
        """Sample, score and compute advantages for one batch of prompts: (rollout, what was drawn).

        With `filter_groups`, groups whose K rewards are all equal are dropped and further prompts are drawn
        (`draw_prompts`) until `batch_size` informative groups are kept or `max_sampling_rounds` rounds have run;
        the rollout is None when no group is left anywhere. `beta` is the KL coefficient of this rollout; without
        `use_reference` (beta = 0 and fixed) the reference forward is skipped and the old log-probs stand in."""
        cfg = self.cfg
        drawn = Drawn([self.sample(batch, generator)])
        samples = drawn.samples[0]
        if cfg.filter_groups:
            samples = self._informative(drawn, len(batch["prompts"]), generator)
        if samples is None:
            return None, drawn
        gen = samples.gen
        input_ids, attention_mask = gen.joined(samples.prompt_ids, samples.prompt_mask)  # (B, P + N) each
        rewards, shaped, kl = samples.rewards, samples.rewards, None
        old_logprobs, correction = gen.logprobs, None
        if cfg.rollout_is is not None:  # the trainer's log-probs are the old ones; generation's weigh them
            old_logprobs = self.frozen_logprobs(self.policy, input_ids, attention_mask, gen.completion_mask)  # (B, N)
            correction = rollout_is_weights(
                old_logprobs, gen.logprobs, gen.completion_mask, cfg.rollout_is, cfg.rollout_is_level,
                cfg.rollout_is_threshold_lower, cfg.rollout_is_threshold,
            )
        kl_tokens = None
        if use_reference:  # reference log-probs: batched forwards of the frozen model
            ref_logprobs = self.reference_logprobs(input_ids, attention_mask, gen.completion_mask)  # (B, N)
            kl_tokens = kl_penalty(self.kl.estimator, old_logprobs, ref_logprobs, self.kl.clamp)  # (B, N) on the sampled tokens
            kl = masked_sum(kl_tokens, gen.completion_mask, dim=-1)  # (B,)
            if self.kl.in_reward:
                shaped = kl_in_reward(rewards, kl_tokens, gen.completion_mask, beta)
        else:  # beta = 0: the KL term is zero whatever the reference says
            ref_logprobs = old_logprobs
        values = returns = None
        if self.critic is not None:  # per-token advantages from the critic's values (GAE), the KL per token
            values = self.values(input_ids, attention_mask, gen.completion_mask)  # (B, N)
            in_reward = kl_tokens if self.kl.in_reward else None
            advantages, returns = critic_advantages(rewards, values, gen.completion_mask, self.critic[1], in_reward, beta)  # (B, N) each
        else:
            advantages = global_advantages(shaped, cfg.advantage, cfg.samples_per_prompt)  # (B,) over the global batch
        rollout = Rollout(
            input_ids, attention_mask, gen.completion_ids, gen.completion_mask, old_logprobs, ref_logprobs,
            rewards, advantages, gen.finished, kl=kl, values=values, returns=returns,
        )
        if correction is not None:
            rollout.rollout_logprobs, rollout.is_weights, rollout.is_affected = gen.logprobs, correction.weights, correction.affected
        return rollout, drawn

    def _informative(self, drawn: Drawn, target: int, generator: torch.Generator) -> Samples | None:
        """Dynamic sampling: this rank's first `target` informative groups, drawing further prompts while any rank
        is short; None when no rank kept a group. Ranks may keep different numbers of groups (none on some): the
        update agrees its number of forwards (`rl.update.agreed_micro_batches`)."""
        K = self.cfg.samples_per_prompt
        device = drawn.samples[0].rewards.device
        keep = [informative_groups(drawn.samples[0].rewards, K)]
        while True:  # every rank takes the same decision, so every rank runs the same number of rounds
            short = torch.tensor(float(sum(int(k.sum()) for k in keep) < target), device=device)
            if drawn.rounds >= self.cfg.max_sampling_rounds or not bool(max_over_ranks(short)):
                break
            extra = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.draw_prompts(target).items()}
            drawn.samples.append(self.sample(extra, generator))
            keep.append(informative_groups(drawn.samples[-1].rewards, K))
            drawn.rounds += 1
        kept = Samples.cat([d.select_groups(k, K) for d, k in zip(drawn.samples, keep)], self.tokenizer.pad_id)
        drawn.kept_groups = min(kept.rewards.numel() // K, target)  # this rank's: ranks may keep different numbers
        if not int(max_over_ranks(torch.tensor(drawn.kept_groups, device=device))):
            return None
        return kept.select(torch.arange(drawn.kept_groups * K, device=device))  # no row here when another rank has some

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
        """The critic's values (B, N) of the completion tokens (`micro_batched`)."""
        N, critic = completion_mask.size(1), self.critic[0]
        return self.micro_batched(lambda ids, mask: completion_values(critic, ids, mask, N), input_ids, attention_mask, completion_mask, in_lockstep(critic))

    def reference_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
        """The frozen reference's log-probs (B, N) of the completion tokens (`frozen_logprobs`)."""
        return self.frozen_logprobs(self.reference, input_ids, attention_mask, completion_mask)

    def frozen_logprobs(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
        """`model`'s log-probs (B, N) of the completion tokens of prompt ++ completion rows at the rollout temperature
        (`micro_batched`)."""
        N = completion_mask.size(1)
        lockstep = in_lockstep(model) or in_lockstep(self.policy)  # a LoRA reference is the sharded policy, adapters off
        return self.micro_batched(
            lambda ids, mask: token_logprobs(model, ids, mask, self.cfg.temperature, N), input_ids, attention_mask, completion_mask, lockstep,
        )

    @torch.no_grad()
    def micro_batched(
        self, forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], input_ids: torch.Tensor, attention_mask: torch.Tensor,
        completion_mask: torch.Tensor, lockstep: bool = False,
    ) -> torch.Tensor:
        """`forward(ids, mask) -> (b, N)` over prompt ++ completion rows without gradient, `micro_batch_size` rows a
        call, concatenated; 0 outside `completion_mask` (B, N). With `lockstep` (a sharded model: each forward is a
        collective) every rank makes as many calls, a rank with fewer rows (dynamic sampling) calls it on no rows."""
        slices = row_slices(input_ids.size(0), self.cfg.micro_batch_size) or [slice(0, 0)]  # no row: one empty call
        if lockstep:
            most = int(max_over_ranks(torch.tensor(len(slices), device=input_ids.device)))
            slices += [slice(0, 0)] * (most - len(slices))
        out = torch.cat([forward(input_ids[rows], attention_mask[rows]) for rows in slices])  # (B, N)
        return out.masked_fill(~completion_mask, 0.0)


def rollout_metrics(drawn: Drawn, samples_per_prompt: int, filter_groups: bool, gold: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """`rollout/*` over every completion sampled this step (all rounds, all ranks); `gold`: the task judge on the
    same completions (B,), when the reward is learned."""
    rewards = torch.cat([d.rewards for d in drawn.samples])
    lengths = torch.cat([d.gen.lengths for d in drawn.samples]).float()
    finished = torch.cat([d.gen.finished for d in drawn.samples]).float()
    columns = [rewards, lengths, finished] + ([gold] if gold is not None else [])
    stats = gather_rows(torch.stack(columns, 1))  # (B_global, 3 or 4)
    metrics = {
        "rollout/reward_mean": stats[:, 0].mean(),
        "rollout/reward_std": stats[:, 0].std(unbiased=False),
        "rollout/completion_len": stats[:, 1].mean(),
        "rollout/eos_rate": stats[:, 2].mean(),
    }
    if gold is not None:
        metrics["rollout/gold_reward"] = stats[:, 3].mean()
    if filter_groups:
        groups = stats.size(0) // samples_per_prompt
        kept = sum_over_ranks(torch.tensor(float(drawn.kept_groups), device=rewards.device))
        metrics["rollout/kept_groups_frac"] = kept / groups
        metrics["rollout/sampling_rounds"] = torch.tensor(float(drawn.rounds))
        metrics["rollout/prompts_drawn"] = torch.tensor(float(groups))
    return metrics
