"""PPO's options in groups, each a dataclass that checks its own fields (one-line `ConfigError`, exit 2).

The rollout (`rl.rollout`) and the update (`rl.update`) read these groups, not the module's hyperparameters, so
they run on plain models and plain settings. The fields keep the names of `PPOModule`'s options (an error names
the option as the user writes it, `model.init_args.<name>`).

>>> LossConfig(clip_eps=0.2, clip_eps_high=0.28).clip_range
(0.2, 0.28)
>>> KLConfig(beta=-1)
Traceback (most recent call last):
rlhf_lightning.options.ConfigError: model.init_args.beta: -1 is not allowed; allowed: a number >= 0
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf_lightning.losses import ADVANTAGE_ESTIMATORS, GROUP_ESTIMATORS, KL_ESTIMATORS, LOSS_AGGREGATIONS, RATIO_LEVELS
from rlhf_lightning.options import SEED_MAX, ConfigError, check_choice, check_number

__all__ = ["EvalConfig", "KLConfig", "LossConfig", "OptimConfig", "RolloutConfig"]


@dataclass(frozen=True)
class RolloutConfig:
    """How a rollout samples and scores: K completions per prompt, the estimator of their advantages."""

    samples_per_prompt: int = 4  # K completions per prompt (the group of the group estimators)
    max_new_tokens: int = 5  # completion budget of rollouts and evaluation
    temperature: float = 1.0  # sampling temperature; old, new and reference log-probs all use it
    advantage: str = "batch_mean"  # an estimator of `losses.ADVANTAGE_ESTIMATORS`
    missing_eos_penalty: float = 0.0  # subtracted from the reward of a completion that never emitted EOS
    filter_groups: bool = False  # dynamic sampling: keep groups whose K rewards differ, draw more prompts
    max_sampling_rounds: int = 4  # generation rounds per rollout at most, with `filter_groups`
    generation_batch_size: int | None = None  # rows generated at once (None: the whole rollout)
    micro_batch_size: int | None = None  # rows per forward of the reference pass and the update (None: all)
    compile: bool = False  # CUDA graphs for the decode step
    seed: int = 0  # sampling seed; rank r samples with seed + r

    def __post_init__(self) -> None:
        check_number("samples_per_prompt", self.samples_per_prompt, low=1, integer=True)
        check_number("max_new_tokens", self.max_new_tokens, low=1, integer=True)
        check_number("temperature", self.temperature, low=0, low_open=True)
        check_choice("advantage", self.advantage, ADVANTAGE_ESTIMATORS)
        check_number("missing_eos_penalty", self.missing_eos_penalty, low=0)
        check_number("max_sampling_rounds", self.max_sampling_rounds, low=1, integer=True)
        check_number("generation_batch_size", self.generation_batch_size, low=1, integer=True, allow_none="all rows at once")
        check_number("micro_batch_size", self.micro_batch_size, low=1, integer=True, allow_none="all rows at once")
        check_number("seed", self.seed, low=0, high=SEED_MAX, integer=True)
        if self.filter_groups and self.advantage not in GROUP_ESTIMATORS:
            raise ConfigError(
                f"model.init_args.filter_groups: true needs an advantage with groups; advantage {self.advantage!r} has none "
                f"(allowed with filter_groups: {', '.join(sorted(GROUP_ESTIMATORS))})"
            )
        if self.filter_groups and self.samples_per_prompt < 2:
            raise ConfigError(
                f"model.init_args.filter_groups: true needs samples_per_prompt >= 2 (a group to compare), got {self.samples_per_prompt}"
            )


@dataclass(frozen=True)
class LossConfig:
    """The clipped surrogate: clip range, dual clip, ratio level, aggregation, truncated completions."""

    clip_eps: float = 0.2  # the ratio is clipped to [1 - clip_eps, 1 + clip_eps]
    clip_eps_low: float | None = None  # lower clip range (None: clip_eps)
    clip_eps_high: float | None = None  # upper clip range, >= the lower (None: clip_eps); clip-higher (DAPO)
    clip_c: float | None = None  # dual clip (> 1; None: off)
    ratio_level: str = "token"  # "token" or "sequence" (GSPO)
    loss_agg: str = "token_mean"  # an aggregation of `losses.LOSS_AGGREGATIONS`
    mask_truncated: bool = False  # completions without EOS get no loss

    def __post_init__(self) -> None:
        check_number("clip_eps", self.clip_eps, low=0, low_open=True)
        check_number("clip_eps_low", self.clip_eps_low, low=0, low_open=True, allow_none="clip_eps")
        check_number("clip_eps_high", self.clip_eps_high, low=0, low_open=True, allow_none="clip_eps")
        check_number("clip_c", self.clip_c, low=1, low_open=True, allow_none="no dual clip")
        check_choice("ratio_level", self.ratio_level, RATIO_LEVELS)
        check_choice("loss_agg", self.loss_agg, LOSS_AGGREGATIONS)
        low, high = self.clip_range
        if high < low:
            raise ConfigError(
                f"model.init_args.clip_eps_high: {high} is below clip_eps_low {low}; "
                f"allowed: clip_eps_high >= clip_eps_low (each defaults to clip_eps = {self.clip_eps})"
            )

    @property
    def clip_range(self) -> tuple[float, float]:
        """(low, high): the ratio is clipped to [1 - low, 1 + high]."""
        low = self.clip_eps if self.clip_eps_low is None else self.clip_eps_low
        high = self.clip_eps if self.clip_eps_high is None else self.clip_eps_high
        return low, high


@dataclass(frozen=True)
class KLConfig:
    """The KL to the reference: its estimator, where it goes, and its coefficient (fixed or adaptive)."""

    beta: float = 0.05  # KL coefficient (the initial one with `target_kl`)
    kl_estimator: str = "k1"  # "k1" or "k3" (`losses.KL_ESTIMATORS`)
    kl_in_reward: bool = False  # subtract beta * the sequence's KL from the reward instead of adding it to the loss
    target_kl: float | None = None  # adapt beta toward this per-token KL (None: fixed)
    kl_horizon: float = 10000.0  # the adaptive controller's horizon, in samples

    def __post_init__(self) -> None:
        check_number("beta", self.beta, low=0)
        check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        check_number("target_kl", self.target_kl, low=0, low_open=True, allow_none="fixed beta")
        check_number("kl_horizon", self.kl_horizon, low=0, low_open=True)


@dataclass(frozen=True)
class OptimConfig:
    """The update: passes over a rollout, minibatches, AdamW, clipping, warm-up."""

    ppo_epochs: int = 4  # passes over each rollout
    num_minibatches: int = 1  # minibatches per pass (per rank under DDP)
    lr: float = 1e-4  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay on matrices
    max_grad_norm: float | None = 1.0  # clip the gradient norm (None: no clipping)
    warmup_steps: int = 0  # linear warm-up of the learning rate, in optimizer steps

    def __post_init__(self) -> None:
        check_number("ppo_epochs", self.ppo_epochs, low=1, integer=True)
        check_number("num_minibatches", self.num_minibatches, low=1, integer=True)
        check_number("lr", self.lr, low=0, low_open=True)
        check_number("weight_decay", self.weight_decay, low=0)
        check_number("max_grad_norm", self.max_grad_norm, low=0, low_open=True, allow_none="no clipping")
        check_number("warmup_steps", self.warmup_steps, low=0, integer=True)


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation on `val` and the policy kept at the end."""

    eval_every: int = 10  # evaluate every N rollouts (0: only at the start and the end)
    num_logged_samples: int = 8  # completions written to TensorBoard as text
    keep_best: bool = True  # the final policy is the best on `val` (the start counts)
    keep_best_min_gain: float = 0.0  # a later evaluation replaces the kept policy only if this much better

    def __post_init__(self) -> None:
        check_number("eval_every", self.eval_every, low=0, integer=True)
        check_number("num_logged_samples", self.num_logged_samples, low=0, integer=True)
        check_number("keep_best_min_gain", self.keep_best_min_gain, low=0, high=1)
