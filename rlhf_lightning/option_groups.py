"""The stages' options in groups: each group is a frozen dataclass that checks its own fields in `__post_init__`
(one-line `ConfigError`, exit 2), and a stage's `__init__` takes the groups it reads.

In a config the groups nest under `model.init_args`, and an error names the option as it is written there:

    model:
      class_path: rlhf_lightning.modules.PPOModule
      init_args:
        rollout: {samples_per_prompt: 8, temperature: 1.0}
        kl: {beta: 0.02, estimator: k3}

The rollout (`rl.rollout`) and the update (`rl.update`) read these groups, not a module's hyperparameters, so they
run on plain models and plain settings. A module stores its groups in `hparams` (and checkpoints) as plain dicts.
The flat option names of earlier releases are read through `MOVED` by the CLI, with a warning naming the new key.

>>> LossConfig(clip_eps=0.2, clip_eps_high=0.28).clip_range
(0.2, 0.28)
>>> KLConfig(beta=-1)
Traceback (most recent call last):
rlhf_lightning.options.ConfigError: model.init_args.kl.beta: -1 is not allowed; allowed: a number >= 0
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, is_dataclass
from typing import Any, ClassVar, TypeVar

import torch

from rlhf_lightning.losses import (
    ADVANTAGE_ESTIMATORS, CRITIC_ESTIMATORS, DPO_LOSSES, GROUP_ESTIMATORS, KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES, RATIO_LEVELS,
    ROLLOUT_IS_LEVELS, ROLLOUT_IS_MODES,
)
from rlhf_lightning.options import MODEL, SEED_MAX, ConfigError, check_choice, check_lora, check_number
from rlhf_lightning.tasks.arithmetic import EVAL_MAX_NEW_TOKENS

__all__ = [
    "CriticConfig", "DPOEvalConfig", "DPOLossConfig", "EvalConfig", "FROZEN_DTYPES", "KLConfig", "LossConfig", "MOVED", "OptimConfig",
    "REWARD_SOURCE_NAMES", "RewardConfig", "RolloutConfig", "UpdateConfig", "as_group", "plain", "regroup",
]

#: dtypes a frozen model (reference, reward model) may be held in
FROZEN_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: the reward sources by name (`rewards.REWARD_SOURCES` builds them)
REWARD_SOURCE_NAMES = ("judge", "learned", "weighted")

G = TypeVar("G")


def _prefix(group: Any) -> str:
    """A group's errors name its options as `model.init_args.<group>.<field>`. (The groups share no base class:
    jsonargparse takes a dataclass with a plain base for a subclass type and asks for `class_path`.)"""
    return f"{MODEL}{group.group}."


@dataclass(frozen=True)
class RolloutConfig:
    """How a PPO rollout samples: K completions per prompt, dynamic sampling, batching, and the advantage estimator.

    Args:
        samples_per_prompt: K completions per prompt (the group of the group estimators).
        max_new_tokens: completion budget of rollouts and evaluation.
        temperature: sampling temperature; the old, new and reference log-probs all use it.
        advantage: "batch_mean" (R - mean R), "batch_whiten", "group_mean", "group_whiten" or "rloo" (critic-free, one
            advantage per sequence), or "gae" (per token, from a learned value function: needs the `critic` group).
        filter_groups: dynamic sampling (verl `filter_groups`, OpenRLHF `dynamic_filtering`): drop prompt groups
            whose K rewards are all equal and draw more prompts until the rollout holds `batch_size` informative
            groups or `max_sampling_rounds` rounds have run. Needs a group `advantage` and `samples_per_prompt` >= 2.
        max_sampling_rounds: generation rounds per rollout at most, with `filter_groups`.
        generation_batch_size: rows generated at once (None: the whole rollout): the KV cache and each step's
            activations are held for this many rows only. Sampled draws differ from one pass's.
        micro_batch_size: rows per forward of the reference pass and the update (None: a whole minibatch). A
            minibatch's micro-batches accumulate their gradients before its one optimizer step, each scaled by the
            minibatch's token and sequence counts, so the step is the same (to float rounding) with activations for
            this many rows only (OpenRLHF `micro_train_batch_size`).
        compile: capture the decode step on a CUDA device (CUDA graphs through `torch.compile(mode="reduce-overhead")`
            on a static KV cache). On CPU: a warning and the eager decode.
        seed: sampling seed; rank r samples with seed + r.
        dtype: the decode's precision: "float32", or "bfloat16" (autocast), as a rollout engine in lower precision
            than the trainer samples: its log-probs then differ from the update's (`rollout/logprob_mismatch`).
        rollout_is: correct for that mismatch with importance weights pi_train / pi_rollout on the policy loss:
            "tis" (truncated: weights capped at `rollout_is_threshold`) or "mis" (masked: tokens, or sequences,
            outside [`rollout_is_threshold_lower`, `rollout_is_threshold`] get weight 0); None: off. The old log-probs
            are then the trainer's (one more no-grad forward of the rollout), the rollout's kept for the weights
            (verl `rollout_is`, TRL `vllm_importance_sampling_mode`).
        rollout_is_level: "token" (a weight per token) or "sequence" (the product over the sequence's tokens).
        rollout_is_threshold: upper bound of the weights (verl's default 2.0).
        rollout_is_threshold_lower: lower bound (None: none for "tis"; for "mis", no lower rejection).
    """

    group: ClassVar[str] = "rollout"
    samples_per_prompt: int = 4
    max_new_tokens: int = 5
    temperature: float = 1.0
    advantage: str = "batch_mean"
    filter_groups: bool = False
    max_sampling_rounds: int = 4
    generation_batch_size: int | None = None
    micro_batch_size: int | None = None
    compile: bool = False
    seed: int = 0
    dtype: str = "float32"
    rollout_is: str | None = None
    rollout_is_level: str = "token"
    rollout_is_threshold: float = 2.0
    rollout_is_threshold_lower: float | None = None

    def __post_init__(self) -> None:
        p = _prefix(self)
        check_number("samples_per_prompt", self.samples_per_prompt, low=1, integer=True, prefix=p)
        check_number("max_new_tokens", self.max_new_tokens, low=1, integer=True, prefix=p)
        check_number("temperature", self.temperature, low=0, low_open=True, prefix=p)
        check_choice("advantage", self.advantage, (*ADVANTAGE_ESTIMATORS, *CRITIC_ESTIMATORS), prefix=p)
        check_number("max_sampling_rounds", self.max_sampling_rounds, low=1, integer=True, prefix=p)
        check_number("generation_batch_size", self.generation_batch_size, low=1, integer=True, allow_none="all rows at once", prefix=p)
        check_number("micro_batch_size", self.micro_batch_size, low=1, integer=True, allow_none="all rows at once", prefix=p)
        check_number("seed", self.seed, low=0, high=SEED_MAX, integer=True, prefix=p)
        check_choice("dtype", self.dtype, FROZEN_DTYPES, prefix=p)
        check_choice("rollout_is", self.rollout_is, (*ROLLOUT_IS_MODES, None), prefix=p)
        check_choice("rollout_is_level", self.rollout_is_level, ROLLOUT_IS_LEVELS, prefix=p)
        check_number("rollout_is_threshold", self.rollout_is_threshold, low=0, low_open=True, prefix=p)
        check_number("rollout_is_threshold_lower", self.rollout_is_threshold_lower, low=0, low_open=True, allow_none="no lower bound", prefix=p)
        if self.rollout_is_threshold_lower is not None and self.rollout_is_threshold_lower >= self.rollout_is_threshold:
            raise ConfigError(
                f"{p}rollout_is_threshold_lower: {self.rollout_is_threshold_lower} is not below rollout_is_threshold "
                f"{self.rollout_is_threshold}; allowed: lower < upper (or null)"
            )
        if self.filter_groups and self.advantage not in GROUP_ESTIMATORS:
            raise ConfigError(
                f"{p}filter_groups: true needs an advantage with groups; advantage {self.advantage!r} has none "
                f"(allowed with filter_groups: {', '.join(sorted(GROUP_ESTIMATORS))})"
            )
        if self.filter_groups and self.samples_per_prompt < 2:
            raise ConfigError(f"{p}filter_groups: true needs samples_per_prompt >= 2 (a group to compare), got {self.samples_per_prompt}")


@dataclass(frozen=True)
class RewardConfig:
    """Where a PPO rollout's rewards come from (`rewards.REWARD_SOURCES`).

    Args:
        source: "learned" (a reward model), "judge" (the task's exact-answer judge) or "weighted" (a weighted sum).
        ckpt: reward-stage checkpoint for the "learned" source.
        weights: {source name: weight} for "weighted", e.g. {learned: 1.0, judge: 0.5}.
        normalize: divide the learned reward by the std (after subtracting the mean) its checkpoint records.
        missing_eos_penalty: subtracted from the reward of a completion that never emitted EOS.
        dtype: "float32" or "bfloat16" for the learned reward model.
    """

    group: ClassVar[str] = "reward"
    source: str = "learned"
    ckpt: str | None = None
    weights: dict[str, float] | None = None
    normalize: bool = True
    missing_eos_penalty: float = 0.0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        p = _prefix(self)
        check_choice("source", self.source, REWARD_SOURCE_NAMES, prefix=p)
        for name, weight in (self.weights or {}).items():
            check_number(f"weights.{name}", weight, prefix=p)
        check_number("missing_eos_penalty", self.missing_eos_penalty, low=0, prefix=p)
        check_choice("dtype", self.dtype, FROZEN_DTYPES, prefix=p)

    @property
    def uses_learned(self) -> bool:
        """Whether a reward model scores the completions (alone or in the weighted sum)."""
        return self.source == "learned" or (self.source == "weighted" and "learned" in (self.weights or {}))


@dataclass(frozen=True)
class LossConfig:
    """PPO's policy loss: the clipped surrogate (clip range, dual clip, ratio level) or a variant, its aggregation,
    truncated completions.

    Args:
        policy_loss: "ppo" (the clipped surrogate), "cispo" (REINFORCE weighted by the clipped, stop-gradient
            importance ratio: no token loses its gradient; MiniMax-M1), "sapo" (a smooth sigmoid gate instead of the
            hard clip, temperatures per advantage sign; Qwen's SAPO) or "gmpo" (the geometric mean of a sequence's
            token ratios, clipped in log space; GMPO). The variants have their own clipping: the PPO clip options
            (`clip_eps_low` / `clip_eps_high`, `clip_c`) and `ratio_level: sequence` are refused with them.
        clip_eps: the ratio is clipped to [1 - clip_eps, 1 + clip_eps].
        clip_eps_low: lower clip range (None: `clip_eps`).
        clip_eps_high: upper clip range, >= the lower one (None: `clip_eps`); above it is clip-higher (DAPO; TRL
            `epsilon_high`, verl `clip_ratio_high`).
        clip_c: dual clip (> 1; None: off): for negative advantages the objective is at least clip_c * A (verl
            `clip_ratio_c`).
        ratio_level: "token" (rho per token) or "sequence" (GSPO: a sequence's ratio is the exponential of the mean
            of its tokens' log-ratios; TRL `importance_sampling_level`).
        loss_agg: how per-token terms (policy and KL) become the loss: "token_mean" (over every valid token of the
            minibatch), "seq_mean_token_mean" (mean over sequences of their token means), "seq_mean_token_sum_norm"
            (token sums / `max_new_tokens`, mean over sequences; Dr. GRPO) (verl `loss_agg_mode`, TRL `loss_type`).
        mask_truncated: completions that hit `max_new_tokens` without EOS get no loss; they still count in the reward
            and advantage statistics (TRL `mask_truncated_completions`).
        cispo_clip: CISPO's cap on its importance weight, rho <= 1 + cispo_clip (no lower bound; TRL's recommended
            `epsilon_high` 5.0 is cispo_clip 4.0).
        sapo_tau_pos: SAPO's gate temperature for positive advantages.
        sapo_tau_neg: SAPO's gate temperature for negative advantages (larger: their gradient fades faster off policy).
        gmpo_clip: GMPO's clip of each token's log-ratio, to [-gmpo_clip, gmpo_clip] (the paper's 0.4).
    """

    group: ClassVar[str] = "loss"
    policy_loss: str = "ppo"
    clip_eps: float = 0.2
    clip_eps_low: float | None = None
    clip_eps_high: float | None = None
    clip_c: float | None = None
    ratio_level: str = "token"
    loss_agg: str = "token_mean"
    mask_truncated: bool = False
    cispo_clip: float = 4.0
    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05
    gmpo_clip: float = 0.4

    def __post_init__(self) -> None:
        p = _prefix(self)
        check_choice("policy_loss", self.policy_loss, POLICY_LOSSES, prefix=p)
        check_number("cispo_clip", self.cispo_clip, low=0, low_open=True, prefix=p)
        check_number("sapo_tau_pos", self.sapo_tau_pos, low=0, low_open=True, prefix=p)
        check_number("sapo_tau_neg", self.sapo_tau_neg, low=0, low_open=True, prefix=p)
        check_number("gmpo_clip", self.gmpo_clip, low=0, low_open=True, prefix=p)
        if self.policy_loss != "ppo":
            for name, value in (("clip_eps_low", self.clip_eps_low), ("clip_eps_high", self.clip_eps_high), ("clip_c", self.clip_c)):
                if value is not None:
                    raise ConfigError(
                        f"{p}{name}: {value} is PPO's clip and does not combine with policy_loss {self.policy_loss!r}, which "
                        f"clips its own way ({self._own_clip()}); leave {name} null"
                    )
            if self.ratio_level != "token":
                raise ConfigError(
                    f"{p}ratio_level: 'sequence' does not combine with policy_loss {self.policy_loss!r} "
                    f"({'a sequence-level ratio by its own geometric mean' if self.policy_loss == 'gmpo' else 'a per-token importance weight'}); use 'token'"
                )
        check_number("clip_eps", self.clip_eps, low=0, low_open=True, prefix=p)
        check_number("clip_eps_low", self.clip_eps_low, low=0, low_open=True, allow_none="clip_eps", prefix=p)
        check_number("clip_eps_high", self.clip_eps_high, low=0, low_open=True, allow_none="clip_eps", prefix=p)
        check_number("clip_c", self.clip_c, low=1, low_open=True, allow_none="no dual clip", prefix=p)
        check_choice("ratio_level", self.ratio_level, RATIO_LEVELS, prefix=p)
        check_choice("loss_agg", self.loss_agg, LOSS_AGGREGATIONS, prefix=p)
        low, high = self.clip_range
        if high < low:
            raise ConfigError(
                f"{p}clip_eps_high: {high} is below clip_eps_low {low}; "
                f"allowed: clip_eps_high >= clip_eps_low (each defaults to clip_eps = {self.clip_eps})"
            )

    def _own_clip(self) -> str:
        return {"cispo": "cispo_clip", "sapo": "the gate's sapo_tau_pos / sapo_tau_neg", "gmpo": "gmpo_clip, in log space"}[self.policy_loss]

    @property
    def policy_loss_options(self) -> dict[str, float]:
        """The keyword arguments of `losses.POLICY_LOSSES[policy_loss]` (none for "ppo", which reads the clip range)."""
        return {
            "ppo": {}, "cispo": {"clip_low": None, "clip_high": self.cispo_clip},
            "sapo": {"tau_pos": self.sapo_tau_pos, "tau_neg": self.sapo_tau_neg},
            "gmpo": {"clip_low": self.gmpo_clip, "clip_high": self.gmpo_clip},
        }[self.policy_loss]

    @property
    def clip_range(self) -> tuple[float, float]:
        """(low, high): the ratio is clipped to [1 - low, 1 + high]."""
        low = self.clip_eps if self.clip_eps_low is None else self.clip_eps_low
        high = self.clip_eps if self.clip_eps_high is None else self.clip_eps_high
        return low, high


@dataclass(frozen=True)
class KLConfig:
    """The KL to the frozen reference: its estimator, where it goes, and its coefficient (fixed or adaptive).

    Args:
        beta: KL coefficient (the initial one when `target` is set).
        estimator: "k1" (log p - log p_ref) or "k3" (`losses.KL_ESTIMATORS`).
        in_reward: subtract beta * the sequence's summed KL from the reward instead of adding it to the loss.
        target: adapt beta toward this per-token KL (None: fixed beta).
        horizon: the adaptive controller's horizon, in samples.
        clamp: bound on the k3 estimate per token, [-clamp, clamp], its log-ratio first bounded to [-20, 20]: verl's
            `low_var_kl` convention and default (10). k3 = e^x - x - 1 grows exponentially where the policy makes a
            sampled token far less likely than the reference (x = log p_ref - log p = 3 gives 16.1): unclamped, a few
            such tokens dominate a batch's KL and its gradient. The clamp binds from x of about 2.6 on. None: unbounded.
    """

    group: ClassVar[str] = "kl"
    beta: float = 0.05
    estimator: str = "k1"
    in_reward: bool = False
    target: float | None = None
    horizon: float = 10000.0
    clamp: float | None = 10.0

    def __post_init__(self) -> None:
        p = _prefix(self)
        check_number("clamp", self.clamp, low=0, low_open=True, allow_none="unbounded", prefix=p)
        check_number("beta", self.beta, low=0, prefix=p)
        check_choice("estimator", self.estimator, KL_ESTIMATORS, prefix=p)
        check_number("target", self.target, low=0, low_open=True, allow_none="fixed beta", prefix=p)
        check_number("horizon", self.horizon, low=0, low_open=True, prefix=p)


@dataclass(frozen=True)
class CriticConfig:
    """A learned value function for `rollout.advantage: gae` (InstructGPT's PPO; verl's and OpenRLHF's critic): a
    reward-model-style backbone with a scalar head read at every completion token, trained by PPO's clipped value
    loss toward the GAE returns, by its own AdamW (`rl.critic`).

    Args:
        init: "reward" (InstructGPT: the reward model's backbone and head, from `ckpt`) or "policy" (the policy's
            transformer from `policy_ckpt`, its LM head replaced by a fresh scalar head).
        ckpt: the reward checkpoint of `init: reward` (None: the learned reward's `reward.ckpt`). Its tokenizer must
            be the policy's: the critic reads the policy's token ids.
        lr: the critic's AdamW learning rate (constant; its warm-up is `warmup` rollouts of critic-only updates).
        weight_decay: the critic's AdamW weight decay on matrices.
        gamma: GAE's discount per token, in [0, 1].
        lam: GAE's lambda, in [0, 1]: 1 gives Monte-Carlo returns minus the value, 0 one-step TD errors.
        cliprange_value: the value loss's clip around the rollout's values (None: unclipped; verl's default 0.5).
        warmup: rollouts at the start in which only the critic trains (verl `critic_warmup`): the policy moves once
            the values mean something.
        whiten_advantages: whiten the per-token advantages over the global rollout (TRL and verl do).
        max_grad_norm: clip the critic's gradient norm to this, apart from the policy's (None: no clipping).
        lora: train LoRA adapters on the critic's backbone (its head trains fully): {r, alpha, dropout,
            target_modules}, as the policy's `lora`.
    """

    group: ClassVar[str] = "critic"
    init: str = "reward"
    ckpt: str | None = None
    lr: float = 1e-4
    weight_decay: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    cliprange_value: float | None = 0.5
    warmup: int = 0
    whiten_advantages: bool = True
    max_grad_norm: float | None = 1.0
    lora: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        p = _prefix(self)
        check_choice("init", self.init, CRITIC_INITS, prefix=p)
        check_number("lr", self.lr, low=0, low_open=True, prefix=p)
        check_number("weight_decay", self.weight_decay, low=0, prefix=p)
        check_number("gamma", self.gamma, low=0, high=1, prefix=p)
        check_number("lam", self.lam, low=0, high=1, prefix=p)
        check_number("cliprange_value", self.cliprange_value, low=0, low_open=True, allow_none="unclipped", prefix=p)
        check_number("warmup", self.warmup, low=0, integer=True, prefix=p)
        check_number("max_grad_norm", self.max_grad_norm, low=0, low_open=True, allow_none="no clipping", prefix=p)
        check_lora(self.lora, prefix=f"{p}")


#: where a critic's weights come from
CRITIC_INITS = ("reward", "policy")


@dataclass(frozen=True)
class UpdateConfig:
    """PPO's update of one rollout: passes, minibatches, gradient clipping.

    Args:
        ppo_epochs: passes over each rollout.
        num_minibatches: minibatches per pass (per rank under DDP); each is one optimizer step.
        max_grad_norm: clip the gradient norm to this (None: no clipping).
    """

    group: ClassVar[str] = "update"
    ppo_epochs: int = 4
    num_minibatches: int = 1
    max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        p = _prefix(self)
        check_number("ppo_epochs", self.ppo_epochs, low=1, integer=True, prefix=p)
        check_number("num_minibatches", self.num_minibatches, low=1, integer=True, prefix=p)
        check_number("max_grad_norm", self.max_grad_norm, low=0, low_open=True, allow_none="no clipping", prefix=p)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and its schedule: linear warm-up, then cosine decay to `min_lr_ratio * lr` (1.0: constant).

    Args:
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay on matrices (none on biases and norms).
        warmup_steps: linear warm-up of the learning rate, in optimizer steps (0: none).
        min_lr_ratio: final learning rate as a fraction of `lr`.
    """

    group: ClassVar[str] = "optim"
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 1.0

    def __post_init__(self) -> None:
        p = _prefix(self)
        check_number("lr", self.lr, low=0, low_open=True, prefix=p)
        check_number("weight_decay", self.weight_decay, low=0, prefix=p)
        check_number("warmup_steps", self.warmup_steps, low=0, integer=True, prefix=p)
        check_number("min_lr_ratio", self.min_lr_ratio, low=0, high=1, prefix=p)


@dataclass(frozen=True)
class EvalConfig:
    """PPO's evaluation on `val` and the policy it keeps at the end.

    Args:
        every: evaluate on `val` every N rollouts (0: only before the first update and at the end).
        num_logged_samples: completions written to TensorBoard as text.
        keep_best: the final policy is the one with the best `eval/accuracy` on `val` among the evaluations (the
            latest on ties; the start counts), so a reward that starts to be gamed cannot lower the result. False:
            the last policy.
        keep_best_min_gain: a later evaluation replaces the kept policy only if its `val` accuracy is at least this
            much higher (0: any tie or gain, so the latest of the best).
    """

    group: ClassVar[str] = "eval"
    every: int = 10
    num_logged_samples: int = 8
    keep_best: bool = True
    keep_best_min_gain: float = 0.0

    def __post_init__(self) -> None:
        p = _prefix(self)
        check_number("every", self.every, low=0, integer=True, prefix=p)
        check_number("num_logged_samples", self.num_logged_samples, low=0, integer=True, prefix=p)
        check_number("keep_best_min_gain", self.keep_best_min_gain, low=0, high=1, prefix=p)


@dataclass(frozen=True)
class DPOLossConfig:
    """The DPO family's loss (`losses.dpo_loss`): one loss or a weighted sum of several.

    Args:
        loss_type: a name of `losses.DPO_LOSSES` (TRL's `loss_type` names: sigmoid, robust, ipo, hinge, simpo;
            orpo) or a list of them, summed with `loss_weights`.
        loss_weights: one weight per `loss_type` (default: 1 each).
        beta: the KL strength of DPO (IPO's tau; SimPO's and ORPO's scale); a number > 0.
        label_smoothing: eps, the assumed probability of a flipped label: cDPO's smoothing of `sigmoid`, the noise
            rate of `robust`, SimPO's smoothing; 0 <= eps < 0.5.
        gamma: SimPO's target reward margin.
        nll_alpha: weight of the chosen completions' NLL per token added to the loss (RPO's alpha; ORPO includes
            its own NLL).
    """

    group: ClassVar[str] = "loss"
    loss_type: str | list[str] = "sigmoid"
    loss_weights: list[float] | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    gamma: float = 0.5
    nll_alpha: float = 0.0

    def __post_init__(self) -> None:
        p = _prefix(self)
        names = self.names
        if not names:
            raise ConfigError(f"{p}loss_type: an empty list; allowed: one or more of {', '.join(sorted(DPO_LOSSES))}")
        for name in names:
            check_choice("loss_type", name, DPO_LOSSES, prefix=p)
        weights = self.loss_weights
        if weights is not None and (len(weights) != len(names) or not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights)):
            raise ConfigError(
                f"{p}loss_weights: {list(weights)} does not fit loss_type {names}; "
                f"allowed: {len(names)} finite number(s), one per loss type, or null (1 each)"
            )
        check_number("beta", self.beta, low=0, low_open=True, prefix=p)
        check_number("label_smoothing", self.label_smoothing, low=0, high=0.5, high_open=True, prefix=p)  # a label is likelier right than flipped
        check_number("gamma", self.gamma, prefix=p)
        check_number("nll_alpha", self.nll_alpha, low=0, prefix=p)

    @property
    def names(self) -> list[str]:
        """`loss_type` as a list."""
        return [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)


@dataclass(frozen=True)
class DPOEvalConfig:
    """DPO's greedy evaluation on `val` prompts and the policy it keeps.

    Args:
        max_new_tokens: completion budget of greedy evaluation.
        max_val_prompts: evaluate on the first N `val` prompts only (None: all); online DPO evaluates its
            `PromptDataModule`'s `val` prompts (`data.init_args.max_val_prompts`).
        num_logged_samples: evaluation completions written to TensorBoard as text.
        keep_best: the final checkpoint holds the policy with the best `eval/accuracy` on `val` among the evaluations
            (the latest on ties; the start counts). False: the last policy.
    """

    group: ClassVar[str] = "eval"
    max_new_tokens: int = EVAL_MAX_NEW_TOKENS
    max_val_prompts: int | None = None
    num_logged_samples: int = 8
    keep_best: bool = False

    def __post_init__(self) -> None:
        p = _prefix(self)
        check_number("max_new_tokens", self.max_new_tokens, low=1, integer=True, prefix=p)
        check_number("max_val_prompts", self.max_val_prompts, low=1, integer=True, allow_none="all", prefix=p)
        check_number("num_logged_samples", self.num_logged_samples, low=0, integer=True, prefix=p)


def as_group(cls: type[G], value: G | dict[str, Any] | None, default: G | None = None) -> G:
    """`value` as a `cls` group: the dataclass itself (the CLI builds it), a plain mapping (a Python caller, or
    `hparams` read back), or None for `default` (`cls()` if not given). An unknown field is one line."""
    if value is None:
        return default if default is not None else cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        allowed = [f.name for f in fields(cls)]
        unknown = [k for k in value if k not in allowed]
        if unknown:
            raise ConfigError(f"{MODEL}{cls.group}.{unknown[0]}: no such option; allowed: {', '.join(allowed)}")
        return cls(**value)
    raise ConfigError(f"{MODEL}{cls.group}: expected a mapping of {', '.join(f.name for f in fields(cls))}, got {value!r}")


def plain(value: Any) -> Any:
    """A group as a plain dict (what `hparams.yaml` and a checkpoint's `hyper_parameters` hold); else as it is."""
    return asdict(value) if is_dataclass(value) and not isinstance(value, type) else value


#: Flat option names of earlier releases, by stage class name: old name -> "group.field" (or a new flat name).
MOVED: dict[str, dict[str, str]] = {
    "PPOModule": {
        "reward": "reward.source", "reward_ckpt": "reward.ckpt", "reward_weights": "reward.weights",
        "normalize_reward": "reward.normalize", "missing_eos_penalty": "reward.missing_eos_penalty",
        "reward_dtype": "reward.dtype",
        **{k: f"rollout.{k}" for k in (
            "samples_per_prompt", "max_new_tokens", "temperature", "advantage", "filter_groups", "max_sampling_rounds",
            "generation_batch_size", "micro_batch_size", "compile", "seed",
        )},
        "beta": "kl.beta", "kl_estimator": "kl.estimator", "kl_in_reward": "kl.in_reward", "target_kl": "kl.target",
        "kl_horizon": "kl.horizon",
        **{k: f"loss.{k}" for k in ("clip_eps", "clip_eps_low", "clip_eps_high", "clip_c", "ratio_level", "loss_agg", "mask_truncated")},
        **{k: f"update.{k}" for k in ("ppo_epochs", "num_minibatches", "max_grad_norm")},
        **{k: f"optim.{k}" for k in ("lr", "weight_decay", "warmup_steps")},
        "eval_every": "eval.every", "num_logged_samples": "eval.num_logged_samples", "keep_best": "eval.keep_best",
        "keep_best_min_gain": "eval.keep_best_min_gain",
    },
    "DPOModule": {
        **{k: f"loss.{k}" for k in ("loss_type", "loss_weights", "beta", "label_smoothing", "gamma", "nll_alpha")},
        **{k: f"optim.{k}" for k in ("lr", "weight_decay", "warmup_steps", "min_lr_ratio")},
        **{k: f"eval.{k}" for k in ("max_new_tokens", "max_val_prompts", "num_logged_samples", "keep_best")},
    },
    "SFTModule": {k: f"optim.{k}" for k in ("lr", "weight_decay", "warmup_steps", "min_lr_ratio")},
    "RewardModule": {k: f"optim.{k}" for k in ("lr", "weight_decay", "warmup_steps", "min_lr_ratio")},
}


def regroup(stage: str, init_args: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """`init_args` of stage class `stage` with its flat keys of earlier releases moved into their groups:
    (new init_args, [(old key, new key)]). A key given both ways keeps the grouped value."""
    moved = MOVED.get(stage, {})
    out: dict[str, Any] = {}
    renamed: list[tuple[str, str]] = []
    for key, value in init_args.items():
        if key not in moved or (isinstance(value, dict) and key == moved[key].partition(".")[0]):  # a group by its own name: the new form
            out[key] = value if not isinstance(value, dict) or key not in out else {**out[key], **value}
            continue
        group, _, field = moved[key].partition(".")
        renamed.append((key, moved[key]))
        if not field:
            out.setdefault(group, value)
            continue
        current = out.get(group)
        current = dict(current) if isinstance(current, dict) else {}
        current.setdefault(field, value)
        out[group] = current
    return out, renamed
