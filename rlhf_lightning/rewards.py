"""Reward sources for PPO: strings in, one score per completion out.

Every source is called as ``source(prompts, completions, ended, golds) -> Tensor (B,)``:

- ``prompts``, ``completions``: the decoded texts (a completion stops before EOS);
- ``ended``: bool tensor (B,), True where the completion emitted EOS within the token budget;
- ``golds``: the gold answers where the data knows them, else None.

Sources work on text, so a learned reward model may have its own tokenizer. They are chosen by name from
`REWARD_SOURCES` and built with `build_reward_source`; `checked_rewards` validates what any source returns.
`Scorer` is PPO's use of them: a `RewardConfig`'s source, validated, with its missing-EOS penalty.

>>> judge = JudgeReward()
>>> judge(["Q: 2+3=\\nA:", "Q: 2+3=\\nA:"], ["5", "6"], torch.tensor([True, True]), ["5", None])
tensor([1., 0.])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from rlhf_lightning.checkpoints import CheckpointError, sha256_file
from rlhf_lightning.option_groups import FROZEN_DTYPES, RewardConfig
from rlhf_lightning.tasks.arithmetic import gold_answer, judge_scores
from rlhf_lightning.tokenizer import Tokenizer

__all__ = [
    "REWARD_SOURCES",
    "JudgeReward",
    "LearnedReward",
    "RewardError",
    "RewardSettings",
    "RewardSource",
    "Scorer",
    "WeightedSum",
    "build_reward_source",
    "checked_rewards",
]


class RewardError(ValueError):
    """A reward source that cannot be built, or that returned something other than finite scores (B,)."""


class RewardSource(Protocol):
    name: str

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], ended: torch.Tensor, golds: Sequence[str | None]
    ) -> torch.Tensor: ...


@dataclass
class RewardSettings:
    """What any source may need to be built; each source reads the fields it uses."""

    reward_ckpt: str | None = None
    reward_weights: dict[str, float] | None = None
    normalize: bool = True
    policy_tokenizer: Tokenizer | None = None
    policy_ckpt: str | None = None  # for error messages only


def checked_rewards(name: str, rewards: object, batch_size: int, prompts: Sequence[str] = ()) -> torch.Tensor:
    """`rewards` as float32 (B,) if it is a finite tensor of that shape, else a `RewardError` naming the source."""
    if not isinstance(rewards, torch.Tensor):
        raise RewardError(f"reward source {name!r} returned {type(rewards).__name__}, expected a tensor of shape ({batch_size},)")
    if tuple(rewards.shape) != (batch_size,):
        raise RewardError(f"reward source {name!r} returned shape {tuple(rewards.shape)}, expected ({batch_size},)")
    rewards = rewards.float()
    bad = ~torch.isfinite(rewards)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        shown = f" for prompt {prompts[i]!r}" if i < len(prompts) else ""
        raise RewardError(
            f"reward source {name!r} returned a non-finite reward ({float(rewards[i])}) at row {i}{shown} "
            f"({int(bad.sum())} of {batch_size} rows)"
        )
    return rewards


class JudgeReward:
    """The task's judge: 1.0 for the exact gold answer followed by EOS, else 0.0.

    The gold answer comes from the batch (`golds`) or, if missing, from the toy task's prompt format.
    """

    name = "judge"

    @classmethod
    def build(cls, settings: RewardSettings) -> "JudgeReward":
        return cls()

    def __call__(self, prompts, completions, ended, golds) -> torch.Tensor:
        golds = [gold if gold is not None else gold_answer(prompt) for prompt, gold in zip(prompts, golds)]
        for prompt, gold in zip(prompts, golds):
            if gold is None:
                raise RewardError(
                    f"reward source 'judge' has no gold answer for prompt {prompt!r}: give a 'completion' field "
                    "in the prompts file or use the learned reward"
                )
        return judge_scores(completions, golds, ended).to(ended.device)  # (B,)


class LearnedReward:
    """A frozen reward model from a reward checkpoint, optionally normalized by the mean and std it recorded.

    Built once; checks up front that the reward model's tokenizer can encode every character the policy
    can emit, so scoring never fails mid-run on an unknown character.
    """

    name = "learned"

    def __init__(
        self, reward_ckpt: str, normalize: bool = True, policy_tokenizer: Tokenizer | None = None, policy_ckpt: str | None = None,
        role: str = "model.init_args.reward.ckpt",
    ) -> None:
        from rlhf_lightning.scoring import load_reward_model  # imported on use: only this source needs it

        self.reward_ckpt = reward_ckpt
        self.model, self.tokenizer, meta = load_reward_model(reward_ckpt, role=role)
        self.model.eval().requires_grad_(False)
        if hasattr(policy_tokenizer, "alphabet") and hasattr(self.tokenizer, "alphabet"):  # character tokenizers
            missing = [c for c in policy_tokenizer.alphabet if c not in self.tokenizer.alphabet]
            if missing:
                raise CheckpointError(
                    f"the reward model {reward_ckpt!r} cannot score the outputs of the policy {policy_ckpt or '(given)'!r}: "
                    f"its tokenizer lacks the characters {''.join(missing)!r} of the policy's alphabet"
                )
        self.mean = float(meta.get("reward_mean", 0.0)) if normalize else 0.0
        self.std = float(meta.get("reward_std", 1.0)) if normalize else 1.0
        if not self.std > 0:
            raise CheckpointError(f"{role}: {reward_ckpt!r} records reward_std={self.std}; expected > 0")

    @classmethod
    def build(cls, settings: RewardSettings) -> "LearnedReward":
        if not settings.reward_ckpt:
            raise RewardError("reward 'learned' needs model.init_args.reward.ckpt (a reward-stage checkpoint)")
        return cls(settings.reward_ckpt, settings.normalize, settings.policy_tokenizer, settings.policy_ckpt)

    def to(self, device: torch.device) -> "LearnedReward":
        self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, prompts, completions, ended, golds) -> torch.Tensor:
        from rlhf_lightning.scoring import score_texts

        scores = score_texts(self.model, self.tokenizer, list(prompts), list(completions), ended, where=self.reward_ckpt)
        return ((scores.float() - self.mean) / self.std).to(ended.device)  # (B,)


class WeightedSum:
    """``sum_i w_i * source_i``, each part validated on its own so an error names the part.

    ``reward_weights: {"learned": 1.0, "judge": 0.5}`` builds the named sources from `REWARD_SOURCES`.
    """

    name = "weighted"

    def __init__(self, parts: dict[str, tuple[float, RewardSource]]) -> None:
        if not parts:
            raise RewardError("reward 'weighted' needs at least one source in model.init_args.reward.weights")
        self.parts = parts

    @classmethod
    def build(cls, settings: RewardSettings) -> "WeightedSum":
        weights = settings.reward_weights or {}
        if not weights:
            raise RewardError("reward 'weighted' needs model.init_args.reward.weights, e.g. {learned: 1.0, judge: 0.5}")
        parts = {}
        for name, weight in weights.items():
            if name == cls.name or name not in REWARD_SOURCES:
                valid = sorted(n for n in REWARD_SOURCES if n != cls.name)
                raise RewardError(f"model.init_args.reward.weights: unknown reward source {name!r}; valid: {valid}")
            parts[name] = (float(weight), REWARD_SOURCES[name].build(settings))
        return cls(parts)

    def to(self, device: torch.device) -> "WeightedSum":
        for _, source in self.parts.values():
            if hasattr(source, "to"):
                source.to(device)
        return self

    def __call__(self, prompts, completions, ended, golds) -> torch.Tensor:
        total = torch.zeros(len(prompts), dtype=torch.float32, device=ended.device)
        for name, (weight, source) in self.parts.items():
            total = total + weight * checked_rewards(name, source(prompts, completions, ended, golds), len(prompts), prompts)
        return total  # (B,)


REWARD_SOURCES: dict[str, type] = {
    JudgeReward.name: JudgeReward,
    LearnedReward.name: LearnedReward,
    WeightedSum.name: WeightedSum,
}


def build_reward_source(name: str, settings: RewardSettings) -> RewardSource:
    """The source registered under `name`, built from `settings`."""
    if name not in REWARD_SOURCES:
        raise RewardError(f"unknown reward source {name!r}; valid: {sorted(REWARD_SOURCES)}")
    return REWARD_SOURCES[name].build(settings)


class Scorer:
    """PPO's rewards from a `RewardConfig`: its source, validated (`checked_rewards`), minus `missing_eos_penalty`
    for a completion without EOS; and the task's judge beside a learned reward (`gold`), the gold reward it proxies.

    Holds the source's frozen model(s) (`models`), the learned checkpoint's SHA-256 (a resumed run must be scored by
    the same file), and moves them with `to`."""

    def __init__(self, cfg: RewardConfig, policy_tokenizer: Tokenizer | None = None, policy_ckpt: str | None = None) -> None:
        self.cfg = cfg
        settings = RewardSettings(cfg.ckpt, cfg.weights, cfg.normalize, policy_tokenizer, policy_ckpt)
        self.source = build_reward_source(cfg.source, settings)
        if cfg.dtype != "float32" and hasattr(self.source, "to"):
            self.source.to(FROZEN_DTYPES[cfg.dtype])
        self.sha256 = sha256_file(cfg.ckpt) if cfg.ckpt and cfg.uses_learned else None

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], ended: torch.Tensor, golds: Sequence[str | None]) -> torch.Tensor:
        """Rewards (B,): the source's, validated, minus the missing-EOS penalty."""
        rewards = checked_rewards(self.cfg.source, self.source(prompts, completions, ended, golds), len(prompts), prompts)
        return rewards.to(ended.device) - self.cfg.missing_eos_penalty * (~ended).float()

    def gold(self, completions: Sequence[str], golds: Sequence[str | None], ended: torch.Tensor) -> torch.Tensor | None:
        """The task's judge (B,) when the reward is learned and every gold answer is known, else None."""
        if not self.cfg.uses_learned or any(g is None for g in golds):
            return None
        return judge_scores(list(completions), list(golds), ended).to(ended.device)

    def models(self) -> list[torch.nn.Module]:
        """The frozen reward model(s) (none for the judge)."""
        sources = [source for _, source in self.source.parts.values()] if hasattr(self.source, "parts") else [self.source]
        return [s.model for s in sources if isinstance(getattr(s, "model", None), torch.nn.Module)]

    def to(self, device: torch.device) -> "Scorer":
        if hasattr(self.source, "to"):
            self.source.to(device)
        return self
