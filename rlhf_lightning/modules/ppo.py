"""PPO from an SFT policy: critic-free, sequence-level advantages, KL to the frozen SFT reference.

One training step is one rollout (manual optimization):

1. sample K completions per prompt with the KV cache, keeping generation's log-probs as the old log-probs;
2. score them with the reward source (learned model, judge, or a weighted sum), minus a missing-EOS penalty;
3. reference log-probs from the frozen SFT model in one batched forward;
4. advantages by the configured estimator over the global batch (all ranks);
5. `ppo_epochs` x shuffled minibatches: new log-probs in one forward, clipped surrogate + beta * KL,
   `manual_backward`, `clip_gradients`, optimizer step.

Loss (the seed's): ``-token_mean(min(rho A, clip(rho, 1-eps, 1+eps) A)) + beta * token_mean(KL)``.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from rlhf_lightning.callbacks import log_samples
from rlhf_lightning.checkpoints import CheckpointError, sha256_file
from rlhf_lightning.data.prompts import move_batch
from rlhf_lightning.generation import completion_logits, generate
from rlhf_lightning.kl_control import make_kl_controller
from rlhf_lightning.losses import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    PPOLossOutput,
    compute_advantages,
    entropy_from_logits,
    kl_in_reward,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    ppo_loss,
)
from rlhf_lightning.optim import adamw
from rlhf_lightning.policy import context_length, judge_scores, load_policy
from rlhf_lightning.rewards import RewardSettings, build_reward_source, checked_rewards


@dataclass
class Rollout:
    """One rollout's tensors; rows are prompts repeated K times consecutively (a prompt's group is contiguous)."""

    input_ids: torch.Tensor  # (B, P + N) left-padded prompt ++ right-padded completion
    attention_mask: torch.Tensor  # (B, P + N) bool: prompt_mask ++ completion_mask
    completion_ids: torch.Tensor  # (B, N)
    completion_mask: torch.Tensor  # (B, N) bool, True up to and including EOS
    old_logprobs: torch.Tensor  # (B, N) generation's log-probs (temperature-scaled softmax)
    ref_logprobs: torch.Tensor  # (B, N) frozen reference, same temperature
    rewards: torch.Tensor  # (B,) from the reward source (penalty included, before any KL shaping)
    advantages: torch.Tensor  # (B,) per sequence, broadcast to tokens

    def logits(self, model: nn.Module) -> torch.Tensor:
        """`model`'s logits (B, N, V) predicting each completion token, from one forward."""
        return completion_logits(model, self.input_ids, self.attention_mask, self.completion_ids.size(1))

    def select(self, idx: torch.Tensor) -> "Rollout":
        return Rollout(**{k: v[idx] for k, v in self.__dict__.items()})


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
    if _world_size() == 1:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t


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
        ppo_epochs: int = 4,
        num_minibatches: int = 1,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = 1.0,
        eval_every: int = 10,
        num_logged_samples: int = 8,
        seed: int = 0,
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
            clip_eps: PPO clip range.
            ppo_epochs: passes over each rollout.
            num_minibatches: minibatches per pass (per rank under DDP).
            lr: AdamW learning rate (constant).
            weight_decay: AdamW weight decay on matrices.
            max_grad_norm: clip the gradient norm to this (None: no clipping).
            eval_every: evaluate on `val` every N rollouts (0: only before the first update and at the end).
            num_logged_samples: evaluation completions written to TensorBoard as text.
            seed: sampling seed; rank r samples with seed + r.
        """
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        if advantage not in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage: unknown estimator {advantage!r}; valid: {sorted(ADVANTAGE_ESTIMATORS)}")
        if kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator: unknown estimator {kl_estimator!r}; valid: {sorted(KL_ESTIMATORS)}")
        if samples_per_prompt < 1 or ppo_epochs < 1 or num_minibatches < 1:
            raise ValueError("samples_per_prompt, ppo_epochs and num_minibatches must be >= 1")

        self.model, self.tokenizer, meta = load_policy(policy_ckpt, role="model.init_args.policy_ckpt")
        disable_dropout(self.model)
        self.policy_meta = {"model": dict(meta["model"], **({"dropout": 0.0} if "dropout" in meta["model"] else {})), "tokenizer": dict(meta["tokenizer"])}
        self.policy_sha256 = sha256_file(policy_ckpt)
        self.reward_sha256 = sha256_file(reward_ckpt) if reward_ckpt and _uses_learned(reward, reward_weights) else None
        # Frozen reference and reward model are kept out of the registered submodules: no optimizer state,
        # no DDP wrapping, not saved (they are reloaded from checkpoints whose hashes are checked on resume).
        object.__setattr__(self, "reference", copy.deepcopy(self.model).eval().requires_grad_(False))
        settings = RewardSettings(reward_ckpt, reward_weights, normalize_reward, self.tokenizer, policy_ckpt)
        object.__setattr__(self, "reward_source", build_reward_source(reward, settings))
        self.kl_ctl = make_kl_controller(beta, target_kl, kl_horizon)
        self.eval_history: list[dict[str, float]] = []
        self.last_update: dict[str, float] = {}
        self._generator: torch.Generator | None = None
        self._generator_state: torch.Tensor | None = None
        self._rollouts = 0

    @property
    def prompt_context_length(self) -> int:
        """Longest prompt (BOS included) that leaves room for `max_new_tokens`: bounds the prompt datasets."""
        return context_length(self.model) - self.hparams.max_new_tokens + 1

    # ------------------------------------------------------------------ setup

    def on_fit_start(self) -> None:
        self.reference.to(self.device)
        if hasattr(self.reward_source, "to"):
            self.reward_source.to(self.device)

    def configure_optimizers(self):
        return adamw(self.model, self.hparams.lr, self.hparams.weight_decay)

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
    def make_rollout(self, batch: dict) -> tuple[Rollout, dict[str, torch.Tensor]]:
        """Sample, score and compute advantages for one batch of prompts; returns (rollout, rollout metrics)."""
        hp = self.hparams
        K = hp.samples_per_prompt
        # 1. K samples per prompt, consecutive rows: groups stay contiguous (and on this rank)
        prompt_ids = batch["prompt_ids"].repeat_interleave(K, 0)  # (B, P)
        prompt_mask = batch["prompt_mask"].bool().repeat_interleave(K, 0)  # (B, P)
        prompts = [p for p in batch["prompts"] for _ in range(K)]
        golds = [g for g in batch["golds"] for _ in range(K)]
        gen = generate(
            self.model, prompt_ids, prompt_mask, max_new_tokens=hp.max_new_tokens, eos_id=self.tokenizer.eos_id,
            pad_id=self.tokenizer.pad_id, temperature=hp.temperature, generator=self.sampling_generator(),
        )
        completions = [self.tokenizer.decode(row) for row in gen.completion_ids.tolist()]
        # 2. rewards (text in, (B,) out), penalty for completions without EOS
        rewards = self.score(prompts, completions, gen.finished, golds)  # (B,)
        input_ids, attention_mask = gen.joined(prompt_ids, prompt_mask)  # (B, P + N) each
        rollout = Rollout(input_ids, attention_mask, gen.completion_ids, gen.completion_mask, gen.logprobs, gen.logprobs, rewards, rewards)
        # 3. reference log-probs: one batched forward of the frozen SFT model
        ref_logprobs = logprobs_from_logits(rollout.logits(self.reference), gen.completion_ids, hp.temperature)
        ref_logprobs = ref_logprobs.masked_fill(~gen.completion_mask, 0.0)  # (B, N)
        kl_tokens = kl_penalty(hp.kl_estimator, gen.logprobs, ref_logprobs)  # (B, N) on the sampled tokens
        shaped = kl_in_reward(rewards, kl_tokens, gen.completion_mask, self.kl_ctl.beta) if hp.kl_in_reward else rewards
        # 4. advantages over the global batch, then this rank's rows
        advantages = self.global_advantages(shaped)
        rollout = replace(rollout, ref_logprobs=ref_logprobs, advantages=advantages)
        stats = torch.stack([rewards, gen.lengths.float(), gen.finished.float(), masked_sum_rows(kl_tokens, gen.completion_mask)], 1)
        stats = gather_rows(stats)  # (B_global, 4)
        metrics = {
            "rollout/reward_mean": stats[:, 0].mean(),
            "rollout/reward_std": stats[:, 0].std(unbiased=False),
            "rollout/completion_len": stats[:, 1].mean(),
            "rollout/eos_rate": stats[:, 2].mean(),
            "rollout_kl": stats[:, 3].sum() / stats[:, 1].sum(),  # per-token KL of the sampling policy
        }
        if self._rollouts == 0 or (hp.num_logged_samples and hp.eval_every and self._rollouts % hp.eval_every == 0):
            log_samples(self, "samples/rollout", prompts, completions, golds, hp.num_logged_samples)
        return rollout, metrics

    def global_advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """Advantages (B,) of this rank's rows, computed with the statistics of every rank's rewards."""
        all_rewards = gather_rows(rewards)  # (W * B,)
        advantages = compute_advantages(self.hparams.advantage, all_rewards, self.hparams.samples_per_prompt)
        B = rewards.size(0)
        return advantages[_rank() * B : (_rank() + 1) * B]

    # ------------------------------------------------------------------ update

    def minibatch_loss(self, mb: Rollout, total_tokens: torch.Tensor | None = None) -> tuple[PPOLossOutput, torch.Tensor, torch.Tensor]:
        """(loss output, new log-probs (B, N), entropy) of a minibatch, from one policy forward.

        `total_tokens` is the minibatch's token count over all ranks; the returned loss is scaled by the
        world size because DDP averages gradients, so the averaged gradient is that of the global token mean.
        """
        hp = self.hparams
        logits = mb.logits(self.model)  # (B, N, V)
        logprobs = logprobs_from_logits(logits, mb.completion_ids, hp.temperature)  # (B, N)
        beta = 0.0 if hp.kl_in_reward else self.kl_ctl.beta
        out = ppo_loss(
            logprobs, mb.old_logprobs, mb.ref_logprobs, mb.advantages, mb.completion_mask, hp.clip_eps, beta,
            hp.kl_estimator, total_tokens,
        )
        world = _world_size()
        if world > 1:
            out = PPOLossOutput(*(v * world for v in out))
        with torch.no_grad():
            entropy = masked_mean(entropy_from_logits(logits.detach() / hp.temperature), mb.completion_mask, total=total_tokens) * world
        return out, logprobs, entropy

    def ppo_update(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        """`ppo_epochs` x shuffled minibatches of backward / clip / step; returns mean metrics of the update."""
        hp = self.hparams
        opt = self.optimizers()
        B = rollout.completion_ids.size(0)
        chunks = max(1, min(hp.num_minibatches, B))
        sums: dict[str, torch.Tensor] = {}
        first_ratio_error = None
        for epoch in range(hp.ppo_epochs):
            perm = torch.randperm(B, generator=self.sampling_generator(), device=self.device)
            parts = list(perm.chunk(chunks))
            counts = sum_over_ranks(torch.stack([rollout.completion_mask[p].sum() for p in parts]).float())  # global tokens
            for idx, total in zip(parts, counts):
                mb = rollout.select(idx)
                out, logprobs, entropy = self.minibatch_loss(mb, total)
                if first_ratio_error is None:  # before any step: must be 1 (same log-probs as generation)
                    first_ratio_error = masked_max(torch.exp(logprobs.detach() - mb.old_logprobs) - 1, mb.completion_mask)
                opt.zero_grad()
                self.manual_backward(out.loss)
                self.check_finite(out.loss)
                if hp.max_grad_norm is not None:
                    self.clip_gradients(opt, gradient_clip_val=hp.max_grad_norm, gradient_clip_algorithm="norm")
                opt.step()
                for name, value in zip(("ppo/loss", "ppo/policy_loss", "ppo/kl", "ppo/clipfrac", "ppo/approx_kl"), out):
                    sums[name] = sums.get(name, 0.0) + value.detach()
                sums["ppo/entropy"] = sums.get("ppo/entropy", 0.0) + entropy
        steps = hp.ppo_epochs * chunks
        metrics = {k: v / steps for k, v in sums.items()}
        self.last_update = {"first_ratio_error": float(first_ratio_error), **{k: float(v) for k, v in metrics.items()}}
        return metrics

    def check_finite(self, loss: torch.Tensor) -> None:
        """Stop before the optimizer step if the loss or the (already synchronized) gradients are not finite."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
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
        rollout_kl = rollout_metrics.pop("rollout_kl")
        rollout_time = time.perf_counter() - start
        start = time.perf_counter()
        update_metrics = self.ppo_update(rollout)
        update_time = time.perf_counter() - start
        beta = self.kl_ctl.beta
        self.kl_ctl.update(float(rollout_kl), n_steps=rollout.completion_ids.size(0) * _world_size())
        self._rollouts += 1
        metrics = {**update_metrics, **rollout_metrics, "ppo/beta": torch.tensor(beta)}
        # update metrics are per-rank shares of global token means: their mean over ranks is the global value
        self.log_dict({k: v.float() for k, v in metrics.items()}, prog_bar=False, sync_dist=_world_size() > 1)
        self.log_dict({"time/rollout": rollout_time, "time/update": update_time})
        self.log("reward", rollout_metrics["rollout/reward_mean"], prog_bar=True, logger=False)
        if hp.eval_every and self._rollouts % hp.eval_every == 0:
            self.evaluate()

    def on_train_end(self) -> None:
        if self._rollouts and self.eval_history and self.eval_history[-1]["rollout"] != self._rollouts:
            self.evaluate()

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
        self.reference.to(self.device)
        correct = known = reward_sum = kl_sum = tokens = rows = 0.0
        for i, batch in enumerate(loader):
            batch = move_batch(batch, self.device)
            gen = generate(
                self.model, batch["prompt_ids"], batch["prompt_mask"], max_new_tokens=hp.max_new_tokens,
                eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id, greedy=True,
            )
            completions = [self.tokenizer.decode(row) for row in gen.completion_ids.tolist()]
            scores = judge_scores(completions, batch["golds"], gen.finished)
            has_gold = ~scores.isnan()
            correct += float(scores[has_gold].sum())
            known += float(has_gold.sum())
            reward_sum += float(self.score(batch["prompts"], completions, gen.finished, batch["golds"]).sum())
            ids, mask = gen.joined(batch["prompt_ids"], batch["prompt_mask"])  # (B, P + N) each
            N = gen.completion_ids.size(1)
            logp = F.log_softmax(completion_logits(self.model, ids, mask, N).float() / hp.temperature, -1)  # (B, N, V)
            ref_logp = F.log_softmax(completion_logits(self.reference, ids, mask, N).float() / hp.temperature, -1)
            kl = (logp.exp() * (logp - ref_logp)).sum(-1)  # (B, N) exact per-token KL
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
        self.eval_history.append({"rollout": self._rollouts, **metrics})
        if self._trainer is not None and self.logger is not None and self.trainer.is_global_zero:
            self.logger.log_metrics(metrics, step=self.global_step)
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
        }

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


def _uses_learned(reward: str, weights: dict[str, float] | None) -> bool:
    return reward == "learned" or (reward == "weighted" and "learned" in (weights or {}))


def masked_sum_rows(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, values, torch.zeros_like(values)).sum(-1)  # (B,)


def masked_max(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, values.abs(), torch.zeros_like(values)).max()
