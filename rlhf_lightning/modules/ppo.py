"""PPO from an SFT policy: critic-free, sequence-level advantages, KL to the frozen SFT reference.

One training step is one rollout (manual optimization):

1. sample K completions per prompt with the KV cache, keeping generation's log-probs as the old log-probs;
2. score them with the reward source (learned model, judge, or a weighted sum), minus a missing-EOS penalty;
3. reference log-probs from the frozen SFT model, batched (`micro_batch_size` rows a forward; skipped when beta is 0 and fixed);
4. advantages by the configured estimator over the global batch (all ranks);
5. `ppo_epochs` x shuffled minibatches: new log-probs in one forward, clipped surrogate + beta * KL,
   `manual_backward`, `clip_gradients`, optimizer step.

Loss (the seed's, the default): ``-token_mean(min(rho A, clip(rho, 1-eps, 1+eps) A)) + beta * token_mean(KL)``;
`loss_agg`, `clip_eps_low` / `clip_eps_high`, `clip_c`, `ratio_level` and `mask_truncated` vary it (`losses.ppo_loss`).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import lightning as L
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
import torch
import torch.distributed as dist
import torch.nn as nn

from rlhf_lightning.callbacks import log_samples, log_step_metrics, logging_step, write_step_metrics
from rlhf_lightning.checkpoints import CheckpointError, sha256_file
from rlhf_lightning.data.prompts import move_batch
from rlhf_lightning.generation import Generation
from rlhf_lightning.kl_control import make_kl_controller
from rlhf_lightning.tasks.strata import strata_metrics
from rlhf_lightning.losses import (
    ADVANTAGE_ESTIMATORS,
    GROUP_ESTIMATORS,
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    PPOLossOutput,
    RATIO_LEVELS,
    compute_advantages,
    drop_truncated,
    kl_in_reward,
    kl_penalty,
    masked_mean,
    ppo_loss,
)
from rlhf_lightning.optim import adamw, warmup_cosine
from rlhf_lightning.options import SEED_MAX, ConfigError, check_choice, check_lora, check_number
from rlhf_lightning.padding import pad_columns
from rlhf_lightning.models import enable_gradient_checkpointing
from rlhf_lightning.lora import BaseOfAdapters, add_adapters, has_adapters, keep_trainable, lora_settings, merged, require_peft
from rlhf_lightning.policy import base_record, context_length, load_policy
from rlhf_lightning.rewards import REWARD_SOURCES, RewardSettings, build_reward_source, checked_rewards
from rlhf_lightning.completions import complete
from rlhf_lightning.scoring import completion_kl, token_logprobs
from rlhf_lightning.tasks.arithmetic import judge_scores


@dataclass
class Rollout:
    """One rollout's tensors; rows are prompts repeated K times consecutively (a prompt's group is contiguous)."""

    input_ids: torch.Tensor  # (B, P + N) left-padded prompt ++ right-padded completion
    attention_mask: torch.Tensor  # (B, P + N) bool: prompt_mask ++ completion_mask
    completion_ids: torch.Tensor  # (B, N)
    completion_mask: torch.Tensor  # (B, N) bool, True up to and including EOS
    old_logprobs: torch.Tensor  # (B, N) generation's log-probs (temperature-scaled softmax)
    ref_logprobs: torch.Tensor  # (B, N) frozen reference, same temperature (the old log-probs when beta = 0: unused)
    rewards: torch.Tensor  # (B,) from the reward source (penalty included, before any KL shaping)
    advantages: torch.Tensor  # (B,) per sequence, broadcast to tokens
    finished: torch.Tensor | None = None  # (B,) bool, True where the completion emitted EOS
    kl: torch.Tensor | None = None  # (B,) summed per-token KL estimate to the reference (None: not computed, beta = 0)

    def logprobs(self, model: nn.Module, temperature: float, return_entropy: bool = False):
        """`model`'s log-probs (B, N) of the completion tokens at `temperature` (and each position's entropy (B, N)
        with `return_entropy`), from one forward and one pass over its logits (`scoring.token_logprobs`)."""
        return token_logprobs(model, self.input_ids, self.attention_mask, temperature, self.completion_ids.size(1), return_entropy=return_entropy)

    def select(self, idx: torch.Tensor) -> "Rollout":
        return Rollout(**{k: None if v is None else v[idx] for k, v in self.__dict__.items()})


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


def informative_groups(rewards: torch.Tensor, samples_per_prompt: int) -> torch.Tensor:
    """(G,) bool: groups of `samples_per_prompt` consecutive rewards that are not all equal (they carry a signal
    under group baselines). [1, 1, 0, 1] with group size 2 -> [False, True]."""
    groups = rewards.view(-1, samples_per_prompt)  # (G, K)
    return (groups.max(1).values - groups.min(1).values) > 1e-6


# ----------------------------------------------------------------------------- distributed helpers


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows (rank 0 first); equal row counts per rank. Identity in one process."""
    if _world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    return _reduce(t, dist.ReduceOp.SUM) if _world_size() > 1 else t


def max_over_ranks(t: torch.Tensor) -> torch.Tensor:
    return _reduce(t, dist.ReduceOp.MAX) if _world_size() > 1 else t


def min_over_ranks(t: torch.Tensor) -> torch.Tensor:
    return _reduce(t, dist.ReduceOp.MIN) if _world_size() > 1 else t


def _reduce(t: torch.Tensor, op) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t, op=op)
    return t


#: Precisions a frozen model (reference, reward model) may be held in.
FROZEN_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def disable_dropout(model: nn.Module) -> None:
    """PPO's ratio needs deterministic forwards: zero every dropout probability."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        elif isinstance(getattr(module, "dropout", None), float):
            module.dropout = 0.0
    if hasattr(getattr(model, "config", None), "dropout"):
        model.config.dropout = 0.0


# ----------------------------------------------------------------------------- the module


class PPOModule(L.LightningModule):
    """Critic-free PPO with a frozen SFT reference; see the module docstring for one training step."""

    def __init__(
        self,
        policy_ckpt: str = "checkpoints/toy/sft.ckpt",
        reward: str = "learned",
        reward_ckpt: str | None = None,
        reward_weights: dict[str, float] | None = None,
        normalize_reward: bool = True,
        missing_eos_penalty: float = 0.0,
        samples_per_prompt: int = 4,
        max_new_tokens: int = 5,
        temperature: float = 1.0,
        advantage: str = "batch_mean",
        kl_estimator: str = "k1",
        kl_in_reward: bool = False,
        beta: float = 0.05,
        target_kl: float | None = None,
        kl_horizon: float = 10000.0,
        clip_eps: float = 0.2,
        clip_eps_low: float | None = None,
        clip_eps_high: float | None = None,
        clip_c: float | None = None,
        ratio_level: str = "token",
        loss_agg: str = "token_mean",
        mask_truncated: bool = False,
        ppo_epochs: int = 4,
        num_minibatches: int = 1,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = 1.0,
        eval_every: int = 10,
        num_logged_samples: int = 8,
        seed: int = 0,
        filter_groups: bool = False,
        max_sampling_rounds: int = 4,
        keep_best: bool = True,
        keep_best_min_gain: float = 0.0,
        warmup_steps: int = 0,
        lora: dict[str, Any] | None = None,
        reference_dtype: str = "float32",
        reward_dtype: str = "float32",
        gradient_checkpointing: bool = False,
        micro_batch_size: int | None = None,
        generation_batch_size: int | None = None,
        compile: bool = False,
    ) -> None:
        """
        Args:
            policy_ckpt: SFT (or PPO) checkpoint; the policy starts from it and the frozen reference is it.
            reward: reward source by name: "learned", "judge" or "weighted" (see `rlhf_lightning.rewards`).
            reward_ckpt: reward-stage checkpoint for the "learned" source.
            reward_weights: {source name: weight} for "weighted", e.g. {learned: 1.0, judge: 0.5}.
            normalize_reward: divide the learned reward by the std (after subtracting the mean) its checkpoint records.
            missing_eos_penalty: subtracted from the reward of a completion that never emitted EOS.
            samples_per_prompt: K completions per prompt (the group of the group estimators).
            max_new_tokens: completion budget of rollouts and evaluation.
            temperature: sampling temperature; log-probs (old, new, reference) all use it.
            advantage: "batch_mean" (R - mean R, the seed's), "batch_whiten", "group_mean", "group_whiten", "rloo".
            kl_estimator: "k1" (log p - log p_ref, the seed's) or "k3".
            kl_in_reward: subtract beta * the sequence's summed KL from the reward instead of adding it to the loss.
            beta: KL coefficient (the initial one when `target_kl` is set).
            target_kl: adapt beta toward this per-token KL (None: fixed beta).
            kl_horizon: the adaptive controller's horizon, in samples.
            clip_eps: PPO clip range: the ratio is clipped to [1 - clip_eps, 1 + clip_eps].
            clip_eps_low: lower clip range (None: `clip_eps`).
            clip_eps_high: upper clip range, >= the lower one (None: `clip_eps`); above it is clip-higher
                (DAPO; TRL `epsilon_high`, verl `clip_ratio_high`).
            clip_c: dual clip (> 1; None: off): for negative advantages the objective is at least clip_c * A
                (verl `clip_ratio_c`).
            ratio_level: "token" (rho per token) or "sequence" (GSPO: a sequence's ratio is the exponential of
                the mean of its tokens' log-ratios; TRL `importance_sampling_level`).
            loss_agg: how per-token terms (policy and KL) become the loss: "token_mean" (over every valid token
                of the minibatch, the seed's), "seq_mean_token_mean" (mean over sequences of their token
                means), "seq_mean_token_sum_norm" (token sums / `max_new_tokens`, mean over sequences; Dr. GRPO)
                (verl `loss_agg_mode`, TRL `loss_type`).
            mask_truncated: completions that hit `max_new_tokens` without EOS get no loss; they still count in
                the reward and advantage statistics (TRL `mask_truncated_completions`).
            ppo_epochs: passes over each rollout.
            num_minibatches: minibatches per pass (per rank under DDP).
            lr: AdamW learning rate (constant).
            weight_decay: AdamW weight decay on matrices.
            max_grad_norm: clip the gradient norm to this (None: no clipping).
            eval_every: evaluate on `val` every N rollouts (0: only before the first update and at the end).
            num_logged_samples: evaluation completions written to TensorBoard as text.
            seed: sampling seed; rank r samples with seed + r.
            filter_groups: dynamic sampling (verl `filter_groups`, OpenRLHF `dynamic_filtering`): drop prompt
                groups whose K rewards are all equal and draw more prompts from the DataModule until the
                rollout holds `batch_size` informative groups or `max_sampling_rounds` rounds have run.
                Needs a group `advantage` and `samples_per_prompt` >= 2.
            max_sampling_rounds: at most this many generation rounds per rollout with `filter_groups`.
            keep_best: the final policy is the one with the best `eval/accuracy` on `val` among the
                evaluations (the latest on ties; the SFT start counts), so a reward that starts to be gamed
                cannot lower the result. False: the last policy.
            keep_best_min_gain: a later evaluation replaces the kept policy only if its `val` accuracy is at
                least this much higher (0: any tie or gain, so the latest of the best). On a few hundred `val`
                prompts one prompt is within one standard error of a high accuracy, so a small positive value keeps
                the start unless PPO shows a gain `val` can resolve.
            warmup_steps: raise the learning rate linearly from lr / warmup_steps to lr over this many
                optimizer steps (0: constant lr). Adam's first steps move every weight by about lr.
            lora: train LoRA adapters on the policy (`policy_ckpt` is their base): {r, alpha (default 2 r),
                dropout, target_modules}. The reference is then the same model with its adapters switched off
                (no copy). A `policy_ckpt` that holds adapters (LoRA SFT) continues them without this option;
                its reference is that SFT policy merged once into a frozen copy.
            reference_dtype: "float32" or "bfloat16" for a frozen reference copy (not used when the reference
                is the policy with adapters off).
            reward_dtype: "float32" or "bfloat16" for the learned reward model.
            gradient_checkpointing: recompute the policy's activations in backward instead of keeping them
                (less memory for about one more forward per minibatch; generation is unaffected).
            micro_batch_size: rows per forward of the update and of the reference pass (None: a whole minibatch
                at once). A minibatch's micro-batches accumulate their gradients before its one optimizer step,
                each scaled by the minibatch's token and sequence counts, so the step is the same as without
                micro-batches (to float rounding) with activations for this many rows only (OpenRLHF
                `micro_train_batch_size`, TRL `per_device_train_batch_size` x `gradient_accumulation_steps`).
            generation_batch_size: rows generated at once (None: the whole rollout): the KV cache and each
                step's activations are held for this many rows only. Sampled draws differ from one pass's.
            compile: capture the rollouts' and evaluations' decode step on a CUDA device (CUDA graphs through
                `torch.compile(mode="reduce-overhead")`, on a static KV cache; the first rollout of each shape
                compiles). On CPU: a warning and the eager decode. Same tokens and log-probs to float rounding.
        """
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        check_choice("reward", reward, REWARD_SOURCES)
        check_choice("advantage", advantage, ADVANTAGE_ESTIMATORS)
        check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
        check_choice("loss_agg", loss_agg, LOSS_AGGREGATIONS)
        check_choice("ratio_level", ratio_level, RATIO_LEVELS)
        check_choice("reference_dtype", reference_dtype, FROZEN_DTYPES)
        check_choice("reward_dtype", reward_dtype, FROZEN_DTYPES)
        for name, weight in (reward_weights or {}).items():
            check_number(f"reward_weights.{name}", weight)
        check_number("missing_eos_penalty", missing_eos_penalty, low=0)
        check_number("samples_per_prompt", samples_per_prompt, low=1, integer=True)
        check_number("max_new_tokens", max_new_tokens, low=1, integer=True)
        check_number("temperature", temperature, low=0, low_open=True)
        check_number("beta", beta, low=0)
        check_number("target_kl", target_kl, low=0, low_open=True, allow_none="fixed beta")
        check_number("kl_horizon", kl_horizon, low=0, low_open=True)
        check_number("clip_eps", clip_eps, low=0, low_open=True)
        check_number("clip_eps_low", clip_eps_low, low=0, low_open=True, allow_none="clip_eps")
        check_number("clip_eps_high", clip_eps_high, low=0, low_open=True, allow_none="clip_eps")
        check_number("clip_c", clip_c, low=1, low_open=True, allow_none="no dual clip")
        check_number("ppo_epochs", ppo_epochs, low=1, integer=True)
        check_number("num_minibatches", num_minibatches, low=1, integer=True)
        check_number("lr", lr, low=0, low_open=True)
        check_number("weight_decay", weight_decay, low=0)
        check_number("max_grad_norm", max_grad_norm, low=0, low_open=True, allow_none="no clipping")
        check_number("eval_every", eval_every, low=0, integer=True)
        check_number("num_logged_samples", num_logged_samples, low=0, integer=True)
        check_number("seed", seed, low=0, high=SEED_MAX, integer=True)
        check_number("max_sampling_rounds", max_sampling_rounds, low=1, integer=True)
        check_number("warmup_steps", warmup_steps, low=0, integer=True)
        check_number("keep_best_min_gain", keep_best_min_gain, low=0, high=1)
        check_number("micro_batch_size", micro_batch_size, low=1, integer=True, allow_none="all rows at once")
        check_number("generation_batch_size", generation_batch_size, low=1, integer=True, allow_none="all rows at once")
        low = clip_eps if clip_eps_low is None else clip_eps_low
        high = clip_eps if clip_eps_high is None else clip_eps_high
        if high < low:
            raise ConfigError(
                f"model.init_args.clip_eps_high: {high} is below clip_eps_low {low}; "
                f"allowed: clip_eps_high >= clip_eps_low (each defaults to clip_eps = {clip_eps})"
            )
        self.clip_range = (low, high)  # the ratio is clipped to [1 - low, 1 + high]
        if filter_groups and advantage not in GROUP_ESTIMATORS:
            raise ConfigError(
                f"model.init_args.filter_groups: true needs an advantage with groups; advantage {advantage!r} has none "
                f"(allowed with filter_groups: {', '.join(sorted(GROUP_ESTIMATORS))})"
            )
        if filter_groups and samples_per_prompt < 2:
            raise ConfigError(
                f"model.init_args.filter_groups: true needs samples_per_prompt >= 2 (a group to compare), got {samples_per_prompt}"
            )
        check_lora(lora)
        self.model, self.tokenizer, meta = load_policy(policy_ckpt, role="model.init_args.policy_ckpt")
        if compile and getattr(getattr(self.model, "config", None), "static_cache", True) is False:
            raise ConfigError("model.init_args.compile: true needs the policy's static KV cache; its hf model config has static_cache: false")
        self.policy_sha256 = sha256_file(policy_ckpt)
        self.lora: dict[str, Any] | None = None  # resolved LoRA settings and the base's record, if adapters train
        if lora is not None:
            require_peft("model.init_args.lora")
            if has_adapters(self.model):
                raise ConfigError("model.init_args.lora: policy_ckpt already holds adapters; leave lora unset to continue training them")
            self.lora = {"lora": add_adapters(self.model, lora_settings(lora)), "base": base_record(policy_ckpt, "checkpoint", self.policy_sha256)}
            reference: nn.Module = BaseOfAdapters(self.model)
        elif has_adapters(self.model):  # LoRA SFT: continue its adapters; the reference is that SFT policy
            self.lora = {"lora": meta["lora"], "base": meta["base"]}
            reference = merged(self.model).to(FROZEN_DTYPES[reference_dtype])
        else:
            reference = copy.deepcopy(self.model).to(FROZEN_DTYPES[reference_dtype])
        self.strict_loading = self.lora is None  # a checkpoint of adapters leaves the frozen base out
        if gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        disable_dropout(self.model)
        disable_dropout(reference)
        self.policy_meta = {"model": dict(meta["model"], **({"dropout": 0.0} if "dropout" in meta["model"] else {})), "tokenizer": dict(meta["tokenizer"])}
        self.reward_sha256 = sha256_file(reward_ckpt) if reward_ckpt and _uses_learned(reward, reward_weights) else None
        # The frozen reference (a submodule, so it moves with the module) and the reward source (a plain object
        # holding its own model): no gradients, no optimizer state (the optimizer holds `self.model`'s parameters
        # only), and left out of `state_dict` by `_without_reference` (both are rebuilt from their checkpoints,
        # whose hashes are checked on resume).
        self.reference = reference.eval().requires_grad_(False)
        self.register_state_dict_post_hook(_without_reference)
        self.register_load_state_dict_post_hook(_reference_not_expected)
        settings = RewardSettings(reward_ckpt, reward_weights, normalize_reward, self.tokenizer, policy_ckpt)
        self.reward_source = build_reward_source(reward, settings)
        if reward_dtype != "float32" and hasattr(self.reward_source, "to"):
            self.reward_source.to(FROZEN_DTYPES[reward_dtype])
        self.kl_ctl = make_kl_controller(beta, target_kl, kl_horizon)
        self.eval_history: list[dict[str, float]] = []
        self.last_update: dict[str, float] = {}
        self._generator: torch.Generator | None = None
        self._generator_state: torch.Tensor | None = None
        self._rollouts = 0
        self._skipped_updates = 0
        self._best: dict[str, Any] | None = None  # {rollout, accuracy, state} of the best policy on val
        self.chosen: dict[str, float] | None = None  # what `finalize_policy` kept

    def frozen_models(self) -> list[nn.Module]:
        """The frozen models: the reference (no weights of its own with adapters off) and the learned reward
        model(s)."""
        sources = [source for _, source in self.reward_source.parts.values()] if hasattr(self.reward_source, "parts") else [self.reward_source]
        return [self.reference, *(s.model for s in sources if isinstance(getattr(s, "model", None), nn.Module))]

    @property
    def needs_reference(self) -> bool:
        """Whether a rollout needs the reference's log-probs: the KL is in the loss or the reward (beta > 0), or an
        adaptive controller steers beta by it. Otherwise (beta = 0, fixed) the reference forward is skipped; the
        KL to the reference is still measured at every evaluation (`eval/kl`)."""
        return self.hparams.target_kl is not None or self.kl_ctl.beta > 0

    @property
    def data_max_length(self) -> int:
        """Longest prompt (BOS included) that leaves room for `max_new_tokens`: bounds the prompt datasets."""
        return context_length(self.model) - self.hparams.max_new_tokens + 1

    # ------------------------------------------------------------------ setup

    def on_fit_start(self) -> None:
        if hasattr(self.reward_source, "to"):
            self.reward_source.to(self.device)

    def configure_optimizers(self):
        # fused AdamW, except under mixed precision: Lightning refuses to clip a fused optimizer's gradients there
        mixed = self._trainer is not None and isinstance(self.trainer.precision_plugin, MixedPrecision)
        optimizer = adamw(self.model, self.hparams.lr, self.hparams.weight_decay, fused=not mixed)
        if not self.hparams.warmup_steps:
            return optimizer
        scheduler = warmup_cosine(optimizer, self.hparams.warmup_steps, total_steps=1, min_lr_ratio=1.0)  # then constant
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def sampling_generator(self) -> torch.Generator:
        """The rollout sampler's generator: seed + rank, restored from the checkpoint on resume."""
        if self._generator is None or self._generator.device != self.device:
            self._generator = torch.Generator(device=self.device)
            self._generator.manual_seed(self.hparams.seed + _rank())
            if self._generator_state is not None:
                self._generator.set_state(self._generator_state)
                self._generator_state = None
        return self._generator

    # ------------------------------------------------------------------ rollout

    def score(self, prompts: list[str], completions: list[str], ended: torch.Tensor, golds: list[str | None]) -> torch.Tensor:
        """Rewards (B,) from the reward source, validated, minus the missing-EOS penalty."""
        rewards = checked_rewards(self.hparams.reward, self.reward_source(prompts, completions, ended, golds), len(prompts), prompts)
        return rewards.to(ended.device) - self.hparams.missing_eos_penalty * (~ended).float()

    @torch.no_grad()
    def sample(self, batch: dict) -> Samples:
        """K completions per prompt of `batch` (consecutive rows: a prompt's group stays contiguous), scored."""
        hp = self.hparams
        K = hp.samples_per_prompt
        prompt_ids = batch["prompt_ids"].repeat_interleave(K, 0)  # (B, P)
        prompt_mask = batch["prompt_mask"].bool().repeat_interleave(K, 0)  # (B, P)
        prompts = [p for p in batch["prompts"] for _ in range(K)]
        golds = [g for g in batch["golds"] for _ in range(K)]
        completions, gen = complete(  # each prompt's forward once, its K samples from it
            self.model, self.tokenizer, batch["prompt_ids"], batch["prompt_mask"], hp.max_new_tokens, temperature=hp.temperature,
            generator=self.sampling_generator(), batch_size=hp.generation_batch_size, samples_per_prompt=K, compile=hp.compile,
        )
        rewards = self.score(prompts, completions, gen.finished, golds)  # (B,) text in, penalty included
        return Samples(prompt_ids, prompt_mask, gen, rewards, prompts, completions, golds)

    @torch.no_grad()
    def make_rollout(self, batch: dict) -> tuple[Rollout | None, dict[str, torch.Tensor]]:
        """Sample, score and compute advantages for one batch of prompts; returns (rollout, rollout metrics).

        With `filter_groups`, groups whose K rewards are all equal are dropped and further prompts are drawn
        from the DataModule (`draw_prompts`) until `batch_size` informative groups are kept or
        `max_sampling_rounds` rounds have run; the rollout is None when no group is left anywhere.
        """
        hp = self.hparams
        K = hp.samples_per_prompt
        # 1. K samples per prompt; 2. rewards (text in, (B,) out)
        drawn = [self.sample(batch)]
        rounds, kept_groups, rollout = 1, None, None
        if hp.filter_groups:
            target = len(batch["prompts"])
            keep = [informative_groups(drawn[0].rewards, K)]
            while True:  # every rank takes the same decision, so every rank runs the same number of rounds
                short = torch.tensor(float(sum(int(k.sum()) for k in keep) < target), device=self.device)
                if rounds >= hp.max_sampling_rounds or not bool(max_over_ranks(short)):
                    break
                extra = move_batch(self.trainer.datamodule.draw_prompts(target), self.device)
                drawn.append(self.sample(extra))
                keep.append(informative_groups(drawn[-1].rewards, K))
                rounds += 1
            kept = Samples.cat([d.select_groups(k, K) for d, k in zip(drawn, keep)], self.tokenizer.pad_id)
            own = kept.rewards.numel() // K
            kept_groups = min(own, target, int(min_over_ranks(torch.tensor(own, device=self.device))))  # equal on every rank
            samples = kept.select(torch.arange(kept_groups * K, device=self.device)) if kept_groups else None
        else:
            samples = drawn[0]
        if samples is not None:
            gen = samples.gen
            input_ids, attention_mask = gen.joined(samples.prompt_ids, samples.prompt_mask)  # (B, P + N) each
            rewards, shaped, kl = samples.rewards, samples.rewards, None
            if self.needs_reference:  # 3. reference log-probs: batched forwards of the frozen SFT model
                ref_logprobs = self.reference_logprobs(input_ids, attention_mask, gen.completion_mask)  # (B, N)
                kl_tokens = kl_penalty(hp.kl_estimator, gen.logprobs, ref_logprobs)  # (B, N) on the sampled tokens
                kl = masked_sum_rows(kl_tokens, gen.completion_mask)  # (B,)
                if hp.kl_in_reward:
                    shaped = kl_in_reward(rewards, kl_tokens, gen.completion_mask, self.kl_ctl.beta)
            else:  # beta = 0: the KL term is zero whatever the reference says
                ref_logprobs = gen.logprobs
            # 4. advantages over the global batch, then this rank's rows
            rollout = Rollout(
                input_ids, attention_mask, gen.completion_ids, gen.completion_mask, gen.logprobs, ref_logprobs,
                rewards, self.global_advantages(shaped), gen.finished, kl=kl,
            )
        metrics = self.rollout_metrics(drawn, rounds, kept_groups)
        if self._rollouts == 0 or (hp.num_logged_samples and hp.eval_every and self._rollouts % hp.eval_every == 0):
            log_samples(self, "samples/rollout", drawn[0].prompts, drawn[0].completions, drawn[0].golds, hp.num_logged_samples)
        return rollout, metrics

    def reference_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
        """The frozen reference's log-probs (B, N) of the completion tokens of prompt ++ completion rows, at the
        rollout temperature, `micro_batch_size` rows a forward; 0 outside `completion_mask` (B, N)."""
        N = completion_mask.size(1)
        ref = torch.cat([
            token_logprobs(self.reference, input_ids[rows], attention_mask[rows], self.hparams.temperature, N)
            for rows in row_slices(input_ids.size(0), self.hparams.micro_batch_size)
        ])  # (B, N)
        return ref.masked_fill(~completion_mask, 0.0)

    def rollout_metrics(self, drawn: list[Samples], rounds: int, kept_groups: int | None) -> dict[str, torch.Tensor]:
        """`rollout/*` over every completion sampled this step (all rounds, all ranks)."""
        hp = self.hparams
        rewards = torch.cat([d.rewards for d in drawn])
        lengths = torch.cat([d.gen.lengths for d in drawn]).float()
        finished = torch.cat([d.gen.finished for d in drawn]).float()
        columns = [rewards, lengths, finished]
        gold = self.gold_scores(drawn)
        if gold is not None:
            columns.append(gold)
        stats = gather_rows(torch.stack(columns, 1))  # (B_global, 3 or 4)
        metrics = {
            "rollout/reward_mean": stats[:, 0].mean(),
            "rollout/reward_std": stats[:, 0].std(unbiased=False),
            "rollout/completion_len": stats[:, 1].mean(),
            "rollout/eos_rate": stats[:, 2].mean(),
        }
        if gold is not None:
            metrics["rollout/gold_reward"] = stats[:, 3].mean()
        if hp.filter_groups:
            groups = stats.size(0) // hp.samples_per_prompt
            kept = sum_over_ranks(torch.tensor(float(kept_groups), device=self.device))
            metrics["rollout/kept_groups_frac"] = kept / groups
            metrics["rollout/sampling_rounds"] = torch.tensor(float(rounds))
            metrics["rollout/prompts_drawn"] = torch.tensor(float(groups))
        return metrics

    def gold_scores(self, drawn: list[Samples]) -> torch.Tensor | None:
        """The task judge on every sampled completion (B,) when the reward is learned and every gold is known:
        the gold reward beside the proxy the policy is trained on. None otherwise."""
        if not _uses_learned(self.hparams.reward, self.hparams.reward_weights):
            return None
        golds = [g for d in drawn for g in d.golds]
        if any(g is None for g in golds):
            return None
        return torch.cat([judge_scores(d.completions, d.golds, d.gen.finished) for d in drawn]).to(self.device)

    def global_advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """Advantages (B,) of this rank's rows, computed with the statistics of every rank's rewards."""
        all_rewards = gather_rows(rewards)  # (W * B,)
        advantages = compute_advantages(self.hparams.advantage, all_rewards, self.hparams.samples_per_prompt)
        B = rewards.size(0)
        return advantages[_rank() * B : (_rank() + 1) * B]

    # ------------------------------------------------------------------ update

    def loss_mask(self, mb: Rollout) -> torch.Tensor:
        """(B, N) bool: the tokens that get a loss (with `mask_truncated`, none of a completion without EOS)."""
        return drop_truncated(mb.completion_mask, mb.finished) if self.hparams.mask_truncated else mb.completion_mask

    def loss_counts(self, mb: Rollout) -> torch.Tensor:
        """(valid tokens, sequences with a valid token) of a minibatch over all ranks, each at least 1: what its
        loss divides by."""
        mask = self.loss_mask(mb)
        return sum_over_ranks(torch.stack([mask.sum(), mask.any(-1).sum()]).float()).clamp(min=1)

    def minibatch_loss(self, mb: Rollout, counts: torch.Tensor | None = None) -> tuple[PPOLossOutput, torch.Tensor, torch.Tensor]:
        """(loss output, new log-probs (B, N), entropy) of a minibatch, from one policy forward.

        The loss divides by `counts` (`loss_counts` of the minibatch this is part of; None: of `mb` itself) and
        is scaled by the world size because DDP averages gradients, so summing the parts' gradients (over
        micro-batches and ranks) gives the gradient of the loss on the global minibatch. With
        `mask_truncated`, completions without EOS have no valid token.
        """
        hp = self.hparams
        mask = self.loss_mask(mb)  # (B, N)
        tokens, rows = self.loss_counts(mb) if counts is None else counts
        logprobs, entropy = mb.logprobs(self.model, hp.temperature, return_entropy=True)  # (B, N), (B, N) no gradient
        beta = 0.0 if hp.kl_in_reward else self.kl_ctl.beta
        out = ppo_loss(
            logprobs, mb.old_logprobs, mb.ref_logprobs, mb.advantages, mask, self.clip_range[0], beta,
            hp.kl_estimator, tokens, clip_eps_high=self.clip_range[1], clip_c=hp.clip_c, ratio_level=hp.ratio_level,
            loss_agg=hp.loss_agg, total_rows=rows, max_new_tokens=hp.max_new_tokens,
        )
        world = _world_size()
        if world > 1:
            out = PPOLossOutput(*(v * world for v in out))
        with torch.no_grad():
            entropy = masked_mean(entropy, mask, total=tokens) * world
        return out, logprobs, entropy

    def ppo_update(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        """`ppo_epochs` x shuffled minibatches of backward / clip / step; returns mean metrics of the update.

        A minibatch runs as micro-batches of `micro_batch_size` rows whose gradients add up before the step."""
        hp = self.hparams
        opt = self.optimizers()
        scheduler = self.lr_schedulers()
        B = rollout.completion_ids.size(0)
        chunks = max(1, min(hp.num_minibatches, B))
        sums: dict[str, torch.Tensor] = {}
        first_ratio_error = None
        steps = 0
        for epoch in range(hp.ppo_epochs):
            perm = torch.randperm(B, generator=self.sampling_generator(), device=self.device)
            parts = list(perm.chunk(chunks))  # at most `chunks` parts (5 rows in 4 chunks: 3 parts)
            steps += len(parts)
            for idx in parts:
                mb = rollout.select(idx)
                counts = self.loss_counts(mb)
                opt.zero_grad()
                step: dict[str, torch.Tensor] = {}
                ratio_error = None
                for rows in row_slices(idx.numel(), hp.micro_batch_size):
                    micro = mb.select(rows)
                    out, logprobs, entropy = self.minibatch_loss(micro, counts)
                    if first_ratio_error is None:  # before any step: must be 1 (same log-probs as generation)
                        error = masked_max(torch.exp(logprobs.detach() - micro.old_logprobs) - 1, micro.completion_mask)
                        ratio_error = error if ratio_error is None else torch.maximum(ratio_error, error)
                    self.manual_backward(out.loss)
                    for name, value in zip(("ppo/loss", "ppo/policy_loss", "ppo/kl", "ppo/clipfrac", "ppo/approx_kl"), out):
                        step[name] = step.get(name, 0.0) + value.detach()
                    step["ppo/entropy"] = step.get("ppo/entropy", 0.0) + entropy
                if first_ratio_error is None:
                    first_ratio_error = ratio_error
                self.clip_and_check(opt, step["ppo/loss"])
                opt.step()
                if scheduler is not None:  # manual optimization: the warm-up is stepped here
                    scheduler.step()
                for name, value in step.items():
                    sums[name] = sums.get(name, 0.0) + value
        metrics = {k: v / steps for k, v in sums.items()}  # means over the optimizer steps taken
        if rollout.kl is None:  # no reference forward (beta = 0): the loss's KL term measured nothing
            metrics.pop("ppo/kl")
        names = ["first_ratio_error", *metrics]
        self.last_update = dict(zip(names, torch.stack([first_ratio_error, *metrics.values()]).float().tolist()))  # one host sync
        return metrics

    def clip_and_check(self, opt, loss: torch.Tensor) -> None:
        """Clip the (already synchronized) gradients' norm to `max_grad_norm` and stop before the optimizer step if
        the loss or the norm is not finite.

        In full precision the clip's own norm is the one checked: one norm over the gradients, not two. Under a
        mixed-precision plugin Lightning's `clip_gradients` clips (it owns the gradient scaler) after the check."""
        hp = self.hparams
        params = [p for p in self.model.parameters() if p.grad is not None]
        full_precision = self._trainer is None or type(self._trainer.precision_plugin) is Precision
        if hp.max_grad_norm is not None and full_precision:
            self.check_finite(loss, torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm))
            return
        self.check_finite(loss, torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(()))
        if hp.max_grad_norm is not None:
            self.clip_gradients(opt, gradient_clip_val=hp.max_grad_norm, gradient_clip_algorithm="norm")

    def check_finite(self, loss: torch.Tensor, norm: torch.Tensor) -> None:
        """Stop before the optimizer step if the loss or the gradient norm is not finite."""
        if not (torch.isfinite(loss) and torch.isfinite(norm)):
            raise FloatingPointError(
                f"PPO loss {float(loss)} / gradient norm {float(norm)} is not finite at rollout {self._rollouts}: "
                "stopping before the optimizer step (no checkpoint of these weights is written); "
                "lower lr or check the reward"
            )

    def training_step(self, batch: dict, batch_idx: int) -> None:
        hp = self.hparams
        if self._rollouts == 0:
            self.evaluate()  # the SFT start, before any update
        start = time.perf_counter()
        rollout, rollout_metrics = self.make_rollout(batch)
        rollout_time = time.perf_counter() - start
        start = time.perf_counter()
        beta = self.kl_ctl.beta
        if rollout is not None:
            update_metrics = self.ppo_update(rollout)
            if rollout.kl is not None:
                kl_and_tokens = gather_rows(torch.stack([rollout.kl, rollout.completion_mask.sum(1).float()], 1))  # (B_global, 2)
                rollout_kl = kl_and_tokens[:, 0].sum() / kl_and_tokens[:, 1].sum()  # per-token KL of the sampling policy
                self.kl_ctl.update(float(rollout_kl), n_steps=rollout.completion_ids.size(0) * _world_size())
        else:  # dynamic sampling found no informative group on any rank: nothing to learn from this rollout
            update_metrics = {}
            self._skipped_updates += 1
        update_time = time.perf_counter() - start
        self._rollouts += 1
        metrics = {**update_metrics, **rollout_metrics, "ppo/beta": torch.tensor(beta)}
        if hp.filter_groups:
            metrics["rollout/skipped_updates"] = torch.tensor(float(self._skipped_updates))
        # update metrics are per-rank shares of global token means: their mean over ranks is the global value
        log_step_metrics(self, {**metrics, "time/rollout": rollout_time, "time/update": update_time}, mean_over_ranks=True,
                         prog_bar={"reward": "rollout/reward_mean"})
        if hp.eval_every and self._rollouts % hp.eval_every == 0:
            self.evaluate()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        write_step_metrics(self)  # the loggers' part of this step's `log_step_metrics`

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """A prompt batch's tensors to the device; its text lists stay as they are (Lightning's default walks every
        string of them: 0.45 ms of a 16 ms peer step on CPU)."""
        return move_batch(batch, device) if isinstance(batch, dict) else super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_train_end(self) -> None:
        self.finalize_policy()

    def finalize_policy(self) -> None:
        """Evaluate the last policy if it has not been, then keep the best one on `val` (`keep_best`).

        Called by `FinalCheckpoint` before it writes the stage's checkpoint, and at the end of training.
        """
        if self.chosen is not None or not self._rollouts:
            return
        if self.eval_history and self.eval_history[-1]["rollout"] != self._rollouts:
            self.evaluate()
        best = self._best
        if self.hparams.keep_best and best is not None and best["rollout"] != self._rollouts:
            self.model.load_state_dict(best["state"], strict=self.lora is None)
        chosen = best if self.hparams.keep_best and best is not None else None
        self.chosen = {
            "rollout": chosen["rollout"] if chosen else self._rollouts,
            "eval/accuracy": chosen["accuracy"] if chosen else (self.eval_history[-1]["eval/accuracy"] if self.eval_history else float("nan")),
        }

    def remember_if_best(self, accuracy: float) -> None:
        """Keep a CPU copy of the policy's weights when `accuracy` on `val` is at least the best so far plus
        `keep_best_min_gain`."""
        if not self.hparams.keep_best or accuracy != accuracy:  # NaN: no gold answers to choose by
            return
        if self._best is None or accuracy >= self._best["accuracy"] + self.hparams.keep_best_min_gain:
            state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items() if self.lora is None or "lora_" in k}
            self._best = {"rollout": self._rollouts, "accuracy": accuracy, "state": state}

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, loader=None) -> dict[str, float] | None:
        """Greedy accuracy, mean reward and per-token KL to the reference on the `val` prompts.

        `eval/kl` is the exact KL(policy || reference) of the next-token distributions (at the rollout
        temperature), averaged over the greedy completions' tokens. Every rank evaluates all prompts
        (deterministic), rank 0 logs.
        """
        hp = self.hparams
        if loader is None:
            datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
            if datamodule is None or not hasattr(datamodule, "eval_dataloader"):
                return None
            loader = datamodule.eval_dataloader()
        was_training = self.model.training
        self.model.eval()
        correct = known = reward_sum = kl_sum = tokens = rows = 0.0
        all_scores, all_strata = [], []  # per prompt, for `eval/accuracy/<stratum>`
        for i, batch in enumerate(loader):
            batch = move_batch(batch, self.device)
            completions, gen = complete(
                self.model, self.tokenizer, batch["prompt_ids"], batch["prompt_mask"], hp.max_new_tokens, greedy=True, compile=hp.compile
            )
            scores = judge_scores(completions, batch["golds"], gen.finished)
            has_gold = ~scores.isnan()
            correct += float(scores[has_gold].sum())
            known += float(has_gold.sum())
            all_scores += scores.tolist()
            all_strata += batch.get("strata", [()] * len(completions))
            reward_sum += float(self.score(batch["prompts"], completions, gen.finished, batch["golds"]).sum())
            ids, mask = gen.joined(batch["prompt_ids"], batch["prompt_mask"])  # (B, P + N) each
            kl = completion_kl(self.model, self.reference, ids, mask, gen.completion_ids.size(1), hp.temperature)  # (B, N)
            kl_sum += float(kl[gen.completion_mask].sum())
            tokens += float(gen.completion_mask.sum())
            rows += len(completions)
            if i == 0:
                log_samples(self, "samples/val", batch["prompts"], completions, batch["golds"], hp.num_logged_samples)
        self.model.train(was_training)
        metrics = {
            "eval/accuracy": correct / known if known else float("nan"),
            "eval/reward": reward_sum / max(rows, 1),
            "eval/kl": kl_sum / max(tokens, 1),
        }
        for name, m in strata_metrics(all_scores, all_strata).items():
            if m["accuracy"] is not None:
                metrics[f"eval/accuracy/{name}"] = m["accuracy"]
        self.eval_history.append({"rollout": self._rollouts, **metrics})
        if self._trainer is not None and self.trainer.state.fn == "fit":
            self.remember_if_best(metrics["eval/accuracy"])
        if self._trainer is not None and self.logger is not None and self.trainer.is_global_zero:
            self.logger.log_metrics(metrics, step=logging_step(self))
        return metrics

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rlhf"] = {
            "stage": "ppo",
            "model": dict(self.policy_meta["model"]),
            "tokenizer": dict(self.policy_meta["tokenizer"]),
            "policy_ckpt": self.hparams.policy_ckpt,
            "policy_sha256": self.policy_sha256,
            "reward_ckpt": self.hparams.reward_ckpt,
            "reward_sha256": self.reward_sha256,
            "kl_controller": self.kl_ctl.state_dict(),
            "sampling_generator": self.sampling_generator().get_state(),
            "rollouts": self._rollouts,
            "eval_history": [dict(h) for h in self.eval_history],
            "skipped_updates": self._skipped_updates,
            "best": None if self._best is None else {"rollout": self._best["rollout"], "accuracy": self._best["accuracy"], "state": self._best["state"]},
            "chosen": self.chosen,
            **(self.lora or {}),
        }
        if self.lora is not None:
            keep_trainable(checkpoint["state_dict"], self.model, "model.")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("rlhf", {})
        for role, path, current, saved in (
            ("policy_ckpt", self.hparams.policy_ckpt, self.policy_sha256, meta.get("policy_sha256")),
            ("reward_ckpt", self.hparams.reward_ckpt, self.reward_sha256, meta.get("reward_sha256")),
        ):
            if saved != current:
                raise CheckpointError(
                    f"model.init_args.{role}: {path!r} (sha256 {current}) is not the file this PPO run started from "
                    f"(sha256 {saved}, recorded as {meta.get(role)!r}); refusing to resume against a different {role}"
                )
        if "kl_controller" in meta:
            self.kl_ctl.load_state_dict(meta["kl_controller"])
        if "sampling_generator" in meta:
            self._generator, self._generator_state = None, meta["sampling_generator"].cpu()
        self._rollouts = int(meta.get("rollouts", 0))
        self.eval_history = [dict(h) for h in meta.get("eval_history", [])]
        self._skipped_updates = int(meta.get("skipped_updates", 0))
        self._best = meta.get("best")


def _without_reference(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """`state_dict` hook: drop the frozen reference's tensors (rebuilt from `policy_ckpt`, never trained)."""
    for key in [k for k in state_dict if k.startswith(prefix + "reference.")]:
        del state_dict[key]


def _reference_not_expected(module: nn.Module, incompatible_keys: Any) -> None:
    """`load_state_dict` hook: a state dict without the reference's tensors is complete (see `_without_reference`)."""
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not k.startswith("reference.")]


def _uses_learned(reward: str, weights: dict[str, float] | None) -> bool:
    return reward == "learned" or (reward == "weighted" and "learned" in (weights or {}))


def masked_sum_rows(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, values, torch.zeros_like(values)).sum(-1)  # (B,)


def row_slices(rows: int, size: int | None) -> list[slice]:
    """Consecutive slices of at most `size` rows covering `rows` (one slice when `size` is None).

    >>> row_slices(5, 2)
    [slice(0, 2, None), slice(2, 4, None), slice(4, 5, None)]
    """
    step = size or max(rows, 1)
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def masked_max(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, values.abs(), torch.zeros_like(values)).max()
