"""PPO from an SFT policy: critic-free, sequence-level advantages, KL to the frozen SFT reference.

One training step is one rollout (manual optimization); this module orchestrates it, the phases live in `rl`:

1. `rl.rollout.RolloutCollector.collect`: sample K completions per prompt with the KV cache, keeping generation's
   log-probs as the old log-probs; score them with the reward source (learned model, judge, or a weighted sum),
   minus a missing-EOS penalty; reference log-probs from the frozen SFT model, batched (`micro_batch_size` rows a
   forward; skipped when beta is 0 and fixed); advantages by the configured estimator over the global batch;
2. `rl.update.ppo_update`: `ppo_epochs` x shuffled minibatches: new log-probs in one forward, clipped surrogate +
   beta * KL, `manual_backward`, clipping, optimizer step;
3. the adaptive KL controller, the step's metrics, and every `eval_every` rollouts an evaluation on `val`.

Loss (the default: the plain clipped surrogate with a token-mean KL):
``-token_mean(min(rho A, clip(rho, 1-eps, 1+eps) A)) + beta * token_mean(KL)``; `loss_agg`, `clip_eps_low` /
`clip_eps_high`, `clip_c`, `ratio_level` and `mask_truncated` vary it (`losses.ppo_loss`).
The options are read through their groups (`option_groups`: rollout, loss, KL, optimizer, evaluation).
"""

from __future__ import annotations

import time
from typing import Any

from lightning.pytorch.plugins.precision import MixedPrecision, Precision
import torch
import torch.nn as nn

from rlhf_lightning.callbacks import log_samples, log_step_metrics, logging_step
from rlhf_lightning.checkpoints import CheckpointError, sha256_file
from rlhf_lightning.data.prompts import move_batch
from rlhf_lightning.distributed import gather_rows, rank, world_size
from rlhf_lightning.kl_control import make_kl_controller
from rlhf_lightning.models import enable_gradient_checkpointing
from rlhf_lightning.modules.frozen import FROZEN_DTYPES, hide_reference, policy_reference
from rlhf_lightning.modules.stage import StageModule
from rlhf_lightning.option_groups import EvalConfig, KLConfig, LossConfig, OptimConfig, RolloutConfig
from rlhf_lightning.optim import adamw, warmup_cosine
from rlhf_lightning.options import ConfigError, check_choice, check_lora, check_number
from rlhf_lightning.policy import base_record, context_length, load_policy
from rlhf_lightning.rewards import REWARD_SOURCES, RewardSettings, build_reward_source, checked_rewards
from rlhf_lightning.rl.rollout import Drawn, Rollout, RolloutCollector, Samples, global_advantages, informative_groups, rollout_metrics
from rlhf_lightning.rl.update import UpdateConfig, minibatch_loss, ppo_update
from rlhf_lightning.evaluation import Evaluation, answer
from rlhf_lightning.tasks.arithmetic import judge_scores

__all__ = ["PPOModule", "Rollout", "Samples", "informative_groups"]


class PPOModule(StageModule):
    """Critic-free PPO with a frozen SFT reference; see the module docstring for one training step."""

    stage = "ppo"

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
            advantage: "batch_mean" (R - mean R), "batch_whiten", "group_mean", "group_whiten", "rloo".
            kl_estimator: "k1" (log p - log p_ref) or "k3".
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
                of the minibatch), "seq_mean_token_mean" (mean over sequences of their token
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
        # the option groups check their own fields (one line, exit 2) before anything is read
        self.cfg = UpdateConfig(
            rollout=RolloutConfig(
                samples_per_prompt, max_new_tokens, temperature, advantage, missing_eos_penalty, filter_groups,
                max_sampling_rounds, generation_batch_size, micro_batch_size, compile, seed,
            ),
            loss=LossConfig(clip_eps, clip_eps_low, clip_eps_high, clip_c, ratio_level, loss_agg, mask_truncated),
            kl=KLConfig(beta, kl_estimator, kl_in_reward, target_kl, kl_horizon),
            optim=OptimConfig(ppo_epochs, num_minibatches, lr, weight_decay, max_grad_norm, warmup_steps),
        )
        EvalConfig(eval_every, num_logged_samples, keep_best, keep_best_min_gain)  # checks the evaluation options (read from hparams)
        check_choice("reward", reward, REWARD_SOURCES)
        check_choice("reference_dtype", reference_dtype, FROZEN_DTYPES)
        check_choice("reward_dtype", reward_dtype, FROZEN_DTYPES)
        for name, weight in (reward_weights or {}).items():
            check_number(f"reward_weights.{name}", weight)
        check_lora(lora)
        self.model, self.tokenizer, meta = load_policy(policy_ckpt, role="model.init_args.policy_ckpt")
        if compile and getattr(getattr(self.model, "config", None), "static_cache", True) is False:
            raise ConfigError("model.init_args.compile: true needs the policy's static KV cache; its hf model config has static_cache: false")
        self.policy_sha256 = sha256_file(policy_ckpt)
        base = lambda: base_record(policy_ckpt, "checkpoint", self.policy_sha256)  # noqa: E731
        # resolved LoRA settings and the base's record if adapters train; the frozen reference (a submodule, so it
        # moves with the module; no gradients, no optimizer state, left out of `state_dict`)
        record, self.reference = policy_reference(self.model, meta, lora, base, reference_dtype)
        self.train_adapters(record)
        if gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        hide_reference(self)
        self.policy_meta = {"model": dict(meta["model"], **({"dropout": 0.0} if "dropout" in meta["model"] else {})), "tokenizer": dict(meta["tokenizer"])}
        self.reward_sha256 = sha256_file(reward_ckpt) if reward_ckpt and _uses_learned(reward, reward_weights) else None
        # the reward source: a plain object holding its own frozen model(s), rebuilt from `reward_ckpt` on resume
        settings = RewardSettings(reward_ckpt, reward_weights, normalize_reward, self.tokenizer, policy_ckpt)
        self.reward_source = build_reward_source(reward, settings)
        if reward_dtype != "float32" and hasattr(self.reward_source, "to"):
            self.reward_source.to(FROZEN_DTYPES[reward_dtype])
        self.kl_ctl = make_kl_controller(beta, target_kl, kl_horizon)
        self.collector = RolloutCollector(
            self.model, self.reference, self.tokenizer, self.score, self.cfg.rollout, self.cfg.kl,
            draw_prompts=lambda n: self.trainer.datamodule.draw_prompts(n),
        )
        self.eval_history: list[dict[str, float]] = []
        self.last_update: dict[str, float] = {}
        self._generator: torch.Generator | None = None
        self._generator_state: torch.Tensor | None = None
        self._rollouts = 0
        self._skipped_updates = 0
        self._best: dict[str, Any] | None = None  # {rollout, accuracy, state} of the best policy on val
        self.chosen: dict[str, float] | None = None  # what `finalize_policy` kept

    @property
    def clip_range(self) -> tuple[float, float]:
        return self.cfg.loss.clip_range

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
        mixed = self.attached is not None and isinstance(self.trainer.precision_plugin, MixedPrecision)
        optimizer = adamw(self.model, self.hparams.lr, self.hparams.weight_decay, fused=not mixed)
        if not self.hparams.warmup_steps:
            return optimizer
        scheduler = warmup_cosine(optimizer, self.hparams.warmup_steps, total_steps=1, min_lr_ratio=1.0)  # then constant
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def sampling_generator(self) -> torch.Generator:
        """The rollout sampler's generator: seed + rank, restored from the checkpoint on resume."""
        if self._generator is None or self._generator.device != self.device:
            self._generator = torch.Generator(device=self.device)
            self._generator.manual_seed(self.hparams.seed + rank())
            if self._generator_state is not None:
                self._generator.set_state(self._generator_state)
                self._generator_state = None
        return self._generator

    # ------------------------------------------------------------------ one step

    def score(self, prompts: list[str], completions: list[str], ended: torch.Tensor, golds: list[str | None]) -> torch.Tensor:
        """Rewards (B,) from the reward source, validated, minus the missing-EOS penalty."""
        rewards = checked_rewards(self.hparams.reward, self.reward_source(prompts, completions, ended, golds), len(prompts), prompts)
        return rewards.to(ended.device) - self.hparams.missing_eos_penalty * (~ended).float()

    def sample(self, batch: dict) -> Samples:
        return self.collector.sample(batch, self.sampling_generator())

    def make_rollout(self, batch: dict) -> tuple[Rollout | None, dict[str, torch.Tensor]]:
        """Sample, score and compute advantages for one batch of prompts (`RolloutCollector.collect`); returns
        (rollout, rollout metrics); the rollout is None when dynamic sampling kept no group on any rank."""
        rollout, drawn = self.collector.collect(batch, self.sampling_generator(), self.kl_ctl.beta, self.needs_reference)
        metrics = rollout_metrics(drawn, self.hparams.samples_per_prompt, self.hparams.filter_groups, self.gold_scores(drawn))
        hp = self.hparams
        if self._rollouts == 0 or (hp.num_logged_samples and hp.eval_every and self._rollouts % hp.eval_every == 0):
            first = drawn.samples[0]
            log_samples(self, "samples/rollout", first.prompts, first.completions, first.golds, hp.num_logged_samples)
        return rollout, metrics

    def gold_scores(self, drawn: Drawn) -> torch.Tensor | None:
        """The task judge on every sampled completion (B,) when the reward is learned and every gold is known:
        the gold reward beside the proxy the policy is trained on. None otherwise."""
        if not _uses_learned(self.hparams.reward, self.hparams.reward_weights):
            return None
        golds = [g for d in drawn.samples for g in d.golds]
        if any(g is None for g in golds):
            return None
        return torch.cat([judge_scores(d.completions, d.golds, d.gen.finished) for d in drawn.samples]).to(self.device)

    def global_advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """Advantages (B,) of this rank's rows, with every rank's rewards' statistics (`rl.rollout`)."""
        return global_advantages(rewards, self.hparams.advantage, self.hparams.samples_per_prompt)

    def minibatch_loss(self, mb: Rollout, counts: torch.Tensor | None = None):
        """`rl.update.minibatch_loss` of this policy at the current beta."""
        return minibatch_loss(self.model, mb, self.cfg, self.kl_ctl.beta, counts)

    def ppo_update(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        """`rl.update.ppo_update` with Lightning's backward and this module's clipping; returns mean metrics."""
        metrics, first_ratio_error = ppo_update(
            self.model, self.optimizers(), rollout, self.cfg, self.kl_ctl.beta, self.sampling_generator(),
            backward=self.manual_backward, clip=self.clip_and_check, scheduler=self.lr_schedulers(),
        )
        names = ["first_ratio_error", *metrics]
        self.last_update = dict(zip(names, torch.stack([first_ratio_error, *metrics.values()]).float().tolist()))  # one host sync
        return metrics

    def clip_and_check(self, loss: torch.Tensor) -> None:
        """Clip the (already synchronized) gradients' norm to `max_grad_norm` and stop before the optimizer step if
        the loss or the norm is not finite.

        In full precision the clip's own norm is the one checked: one norm over the gradients, not two. Under a
        mixed-precision plugin Lightning's `clip_gradients` clips (it owns the gradient scaler) after the check."""
        hp = self.hparams
        params = [p for p in self.model.parameters() if p.grad is not None]
        full_precision = self.attached is None or type(self.attached.precision_plugin) is Precision
        if hp.max_grad_norm is not None and full_precision:
            self.check_finite(loss, torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm))
            return
        self.check_finite(loss, torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(()))
        if hp.max_grad_norm is not None:
            self.clip_gradients(self.optimizers(), gradient_clip_val=hp.max_grad_norm, gradient_clip_algorithm="norm")

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
                self.kl_ctl.update(float(rollout_kl), n_steps=rollout.completion_ids.size(0) * world_size())
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
            self.load_trainable_state(best["state"])
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
            self._best = {"rollout": self._rollouts, "accuracy": accuracy, "state": self.trainable_state()}

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, loader=None) -> dict[str, float] | None:
        """Greedy accuracy (and per stratum), mean reward and per-token KL to the reference on the `val` prompts
        (`evaluation.answer`), in `training_step`: the keep-best copy must be taken before the next update, and
        Lightning's validation loop runs only between training batches of its own cadence, not every N rollouts.

        `eval/kl` is the exact KL(policy || reference) of the next-token distributions (at the rollout
        temperature) per answer token. Every rank evaluates all prompts (deterministic), rank 0 logs."""
        hp = self.hparams
        if loader is None:
            datamodule = getattr(self.trainer, "datamodule", None) if self.attached is not None else None
            if datamodule is None or not hasattr(datamodule, "eval_dataloader"):
                return None
            loader = datamodule.eval_dataloader()
        was_training = self.model.training
        self.model.eval()
        evaluation = Evaluation()
        for i, batch in enumerate(loader):
            answers = answer(
                self.model, self.tokenizer, move_batch(batch, self.device), hp.max_new_tokens, compile=hp.compile,
                score=self.score, reference=self.reference, kl_temperature=hp.temperature,
            )
            evaluation.add(answers)
            if i == 0:
                log_samples(self, "samples/val", answers.prompts, answers.completions, answers.golds, hp.num_logged_samples)
        self.model.train(was_training)
        metrics = evaluation.metrics()
        self.eval_history.append({"rollout": self._rollouts, **metrics})
        if self.attached is not None and self.trainer.state.fn == "fit":
            self.remember_if_best(metrics["eval/accuracy"])
        if self.attached is not None and self.logger is not None and self.trainer.is_global_zero:
            self.logger.log_metrics(metrics, step=logging_step(self))
        return metrics

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_meta(self) -> dict[str, Any]:
        return {
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
        self.eval_history = [dict(h) for h in meta.get("eval_history", [])]
        self._skipped_updates = int(meta.get("skipped_updates", 0))
        self._best = meta.get("best")


def _uses_learned(reward: str, weights: dict[str, float] | None) -> bool:
    return reward == "learned" or (reward == "weighted" and "learned" in (weights or {}))
