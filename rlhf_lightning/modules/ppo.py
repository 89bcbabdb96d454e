"""PPO from an SFT policy: critic-free sequence-level advantages, or a learned critic with GAE; KL to the frozen SFT
reference.

One training step is one rollout (manual optimization); this module orchestrates it, the phases live in `rl`:

1. `rl.rollout.RolloutCollector.collect`: sample K completions per prompt with the KV cache, keeping generation's
   log-probs as the old log-probs; score them (`rewards.Scorer`: learned model, judge, or a weighted sum, minus a
   missing-EOS penalty); reference log-probs from the frozen SFT model, batched (`rollout.micro_batch_size` rows a
   forward; skipped when beta is 0 and fixed); advantages by the configured estimator over the global batch, or,
   with `rollout.advantage: gae`, the critic's values and GAE per token (`rl.critic`);
2. `rl.update.ppo_update`: `update.ppo_epochs` x shuffled minibatches: new log-probs in one forward, clipped surrogate
   + beta * KL, `manual_backward`, clipping, optimizer step; with a critic, a step of its own optimizer on the
   clipped value loss (only that during its `critic.warmup` rollouts);
3. the adaptive KL controller, the step's metrics, and every `eval.every` rollouts an evaluation on `val`.

Loss (the default: the plain clipped surrogate with a token-mean KL):
``-token_mean(min(rho A, clip(rho, 1-eps, 1+eps) A)) + beta * token_mean(KL)``; the `loss` group's `loss_agg`,
`clip_eps_low` / `clip_eps_high`, `clip_c`, `ratio_level` and `mask_truncated` vary it (`losses.ppo_loss`).
The options come in groups (`option_groups`: reward, rollout, loss, kl, update, optim, eval, critic).
"""

from __future__ import annotations

import time
from typing import Any

from lightning.pytorch.plugins.precision import MixedPrecision, Precision
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from rlhf_lightning.callbacks import log_samples, log_step_metrics, logging_step
from rlhf_lightning.checkpoints import CheckpointError, sha256_file
from rlhf_lightning.data.prompts import move_batch
from rlhf_lightning.distributed import gather_uneven_rows, own_entry, per_rank, rank, world_size
from rlhf_lightning.kl_control import make_kl_controller
from rlhf_lightning.lora import BaseOfAdapters
from rlhf_lightning.models import enable_gradient_checkpointing
from rlhf_lightning.modules.frozen import disable_dropout, hide_reference, policy_reference
from rlhf_lightning.modules.stage import StageModule
from rlhf_lightning.option_groups import (
    CRITIC_ESTIMATORS, FROZEN_DTYPES, CriticConfig, EvalConfig, KLConfig, LossConfig, OptimConfig, RewardConfig, RolloutConfig, UpdateConfig, as_group,
)
from rlhf_lightning.optim import adamw, warmup_cosine
from rlhf_lightning.options import ConfigError, check_choice, check_lora
from rlhf_lightning.policy import base_record, context_length, load_policy
from rlhf_lightning.rewards import Scorer
from rlhf_lightning.rl.rollout import Drawn, Rollout, RolloutCollector, Samples, global_advantages, informative_groups, rollout_metrics
from rlhf_lightning.rl.critic import build_critic, critic_metrics, read_values_as_forward
from rlhf_lightning.rl.update import CriticUpdate, PPOConfig, clip_and_check, minibatch_loss, ppo_update
from rlhf_lightning.evaluation import evaluate_batches

__all__ = ["PPOModule", "Rollout", "Samples", "informative_groups"]


class PPOModule(StageModule):
    """PPO with a frozen SFT reference, critic-free or with a learned critic; see the module docstring for one
    training step."""

    stage = "ppo"

    def __init__(
        self,
        policy_ckpt: str = "checkpoints/toy/sft.ckpt",
        reward: RewardConfig = RewardConfig(),
        rollout: RolloutConfig = RolloutConfig(),
        loss: LossConfig = LossConfig(),
        kl: KLConfig = KLConfig(),
        update: UpdateConfig = UpdateConfig(),
        optim: OptimConfig = OptimConfig(lr=1e-4),
        eval: EvalConfig = EvalConfig(),
        lora: dict[str, Any] | None = None,
        reference_dtype: str = "float32",
        gradient_checkpointing: bool = False,
        critic: CriticConfig | None = None,
    ) -> None:
        """
        Args:
            policy_ckpt: SFT (or PPO) checkpoint; the policy starts from it and the frozen reference is it.
            reward: the reward source (`RewardConfig`): learned model, judge, or a weighted sum.
            rollout: sampling, dynamic sampling, batching and the advantage estimator (`RolloutConfig`).
            loss: the clipped surrogate (`LossConfig`).
            kl: the KL to the reference, fixed or adaptive (`KLConfig`).
            update: passes, minibatches and gradient clipping of each rollout's update (`UpdateConfig`).
            optim: AdamW and its warm-up (`OptimConfig`; a cosine to `min_lr_ratio` spans `trainer.max_steps`
                rollouts' optimizer steps).
            eval: evaluation on `val` every N rollouts and the policy kept at the end (`EvalConfig`).
            lora: train LoRA adapters on the policy (`policy_ckpt` is their base): {r, alpha (default 2 r),
                dropout, target_modules}. The reference is then the same model with its adapters switched off
                (no copy). A `policy_ckpt` that holds adapters (LoRA SFT) continues them without this option;
                its reference is that SFT policy merged once into a frozen copy.
            reference_dtype: "float32" or "bfloat16" for a frozen reference copy (not used when the reference
                is the policy with adapters off).
            gradient_checkpointing: recompute the policy's activations in backward instead of keeping them
                (less memory for about one more forward per minibatch; generation is unaffected).
            critic: the learned value function of `rollout.advantage: gae` (`CriticConfig`): its initialization,
                GAE's gamma and lambda, the value clip, its learning rate and warm-up. None: no critic.
        """
        super().__init__()
        # the groups check their own fields (one line, exit 2) before anything is built
        reward, self.eval_cfg, self.optim_cfg = as_group(RewardConfig, reward), as_group(EvalConfig, eval), as_group(OptimConfig, optim)
        self.cfg = PPOConfig(as_group(RolloutConfig, rollout), as_group(LossConfig, loss), as_group(KLConfig, kl), as_group(UpdateConfig, update))
        self.reward_cfg = reward
        self.critic_cfg = None if critic is None else as_group(CriticConfig, critic)
        check_choice("reference_dtype", reference_dtype, FROZEN_DTYPES)
        check_lora(lora)
        if (self.cfg.rollout.advantage in CRITIC_ESTIMATORS) != (self.critic_cfg is not None):
            raise ConfigError(
                f"model.init_args.rollout.advantage: {self.cfg.rollout.advantage!r} needs a critic (model.init_args.critic)"
                if self.critic_cfg is None else
                f"model.init_args.critic: a critic is read only by rollout.advantage {' or '.join(CRITIC_ESTIMATORS)}, not {self.cfg.rollout.advantage!r}; set critic: null or advantage: gae"
            )
        self.save_options({"reward": reward, "eval": self.eval_cfg, "optim": self.optim_cfg, **vars(self.cfg), "critic": self.critic_cfg})
        self.automatic_optimization = False
        rollout, kl = self.cfg.rollout, self.cfg.kl
        self.model, self.tokenizer, meta = load_policy(policy_ckpt, role="model.init_args.policy_ckpt")
        if rollout.compile and getattr(getattr(self.model, "config", None), "static_cache", True) is False:
            raise ConfigError("model.init_args.rollout.compile: true needs the policy's static KV cache; its hf model config has static_cache: false")
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
        # the rewards: a plain object holding its own frozen model(s), rebuilt from `reward.ckpt` on resume
        self.scorer = Scorer(reward, self.tokenizer, policy_ckpt)
        self.kl_ctl = make_kl_controller(kl.beta, kl.target, kl.horizon)
        # the critic (a submodule: it trains, moves with the module and is checkpointed), and where it came from
        self.critic, self.critic_record = None, None
        if self.critic_cfg is not None:
            self.critic, self.critic_record = build_critic(
                self.critic_cfg, reward.ckpt if reward.uses_learned else None, self.model, meta, self.tokenizer, context_length(self.model),
                normalize=reward.normalize,
            )
            disable_dropout(self.critic)
        self.collector = RolloutCollector(
            self.model, self.reference, self.tokenizer, self.scorer, rollout, kl, draw_prompts=lambda n: self.trainer.datamodule.draw_prompts(n),
            critic=None if self.critic is None else (self.critic, self.critic_cfg),
        )
        self.eval_history: list[dict[str, float]] = []
        self.last_update: dict[str, float] = {}
        self._generator: torch.Generator | None = None
        self._generator_state: torch.Tensor | None = None
        self._rollouts = 0
        self._skipped_updates = 0
        self.chosen: dict[str, float] | None = None  # what `finalize_policy` kept

    @property
    def clip_range(self) -> tuple[float, float]:
        return self.cfg.loss.clip_range

    def frozen_models(self) -> list[nn.Module]:
        """The frozen models: the reference (no weights of its own with adapters off) and the learned reward
        model(s)."""
        return [self.reference, *self.scorer.models()]

    @property
    def needs_reference(self) -> bool:
        """Whether a rollout needs the reference's log-probs: the KL is in the loss or the reward (beta > 0), or an
        adaptive controller steers beta by it. Otherwise (beta = 0, fixed) the reference forward is skipped; the
        KL to the reference is still measured at every evaluation (`eval/kl`)."""
        return self.cfg.kl.target is not None or self.kl_ctl.beta > 0

    @property
    def data_max_length(self) -> int:
        """Longest prompt (BOS included) that leaves room for `max_new_tokens`: bounds the prompt datasets."""
        return context_length(self.model) - self.cfg.rollout.max_new_tokens + 1

    # ------------------------------------------------------------------ setup

    def shardable_roots(self) -> dict[str, nn.Module]:
        """The trained models a sharded strategy shards: the policy, and the critic (its own optimizer, built after
        over its shards)."""
        return {"model": self.model, **({"critic": self.critic} if self.critic is not None else {})}

    def frozen_roots(self) -> dict[str, nn.Module]:
        """The frozen reference (not with LoRA adapters: it is the sharded policy with them off) and the learned
        reward model(s), each a root of its own (kept whole below the policy's `replicate_frozen_below`)."""
        roots = {} if self.reference is None or isinstance(self.reference, BaseOfAdapters) else {"reference": self.reference}
        for i, model in enumerate(self.scorer.models()):
            roots["reward_model" if i == 0 else f"reward_model_{i}"] = model
        return roots

    def configure_model(self) -> None:
        super().configure_model()
        if self.critic is not None:
            read_values_as_forward(self.critic)  # its values read its backbone and head: FSDP2's hooks around them

    def on_fit_start(self) -> None:
        wrapped = self.trainer.strategy.model
        if self.critic is not None and isinstance(wrapped, DistributedDataParallel) and not wrapped.find_unused_parameters:
            # the policy's and the critic's losses are separate backward passes (and only the critic's in its warm-up):
            # each leaves the other model's parameters without a gradient, which plain DDP refuses mid-run
            raise ConfigError(
                "trainer.strategy: PPO with a critic under DDP needs 'ddp_find_unused_parameters_true' (the policy and "
                "the critic take separate backward passes)"
            )
        self.scorer.to(self.device)

    def configure_optimizers(self):
        # fused AdamW, except under mixed precision: Lightning refuses to clip a fused optimizer's gradients there
        mixed = self.attached is not None and isinstance(self.trainer.precision_plugin, MixedPrecision)
        opt = self.optim_cfg
        optimizer = adamw(self.model, opt.lr, opt.weight_decay, fused=not mixed)
        # the critic's own AdamW: its learning rate, its clipping, and steps of its own during its warm-up
        optimizers = [optimizer] if self.critic is None else [optimizer, adamw(self.critic, self.critic_cfg.lr, self.critic_cfg.weight_decay, fused=not mixed)]
        if not opt.warmup_steps and opt.min_lr_ratio == 1.0:
            return optimizers if self.critic is not None else optimizer
        total = 1  # constant after the warm-up (min_lr_ratio 1), else a cosine over every rollout's optimizer steps
        if opt.min_lr_ratio < 1.0:
            rollouts = self.trainer.max_steps if self.attached is not None else -1
            if rollouts is None or rollouts < 1:
                raise ConfigError("model.init_args.optim.min_lr_ratio: a decay below 1 needs trainer.max_steps (the number of rollouts)")
            total = rollouts * self.cfg.update.ppo_epochs * self.cfg.update.num_minibatches
        scheduler = warmup_cosine(optimizer, opt.warmup_steps, total_steps=total, min_lr_ratio=opt.min_lr_ratio)
        if self.critic is not None:
            return optimizers, [{"scheduler": scheduler, "interval": "step"}]
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def sampling_generator(self) -> torch.Generator:
        """The rollout sampler's generator: seed + rank, restored from the checkpoint on resume."""
        if self._generator is None or self._generator.device != self.device:
            self._generator = torch.Generator(device=self.device)
            self._generator.manual_seed(self.cfg.rollout.seed + rank())
            if self._generator_state is not None:
                self._generator.set_state(self._generator_state)
                self._generator_state = None
        return self._generator

    # ------------------------------------------------------------------ one step

    def score(self, prompts: list[str], completions: list[str], ended: torch.Tensor, golds: list[str | None]) -> torch.Tensor:
        """Rewards (B,) from the reward source, validated, minus the missing-EOS penalty (`rewards.Scorer`)."""
        return self.scorer(prompts, completions, ended, golds)

    def sample(self, batch: dict) -> Samples:
        return self.collector.sample(batch, self.sampling_generator())

    def make_rollout(self, batch: dict) -> tuple[Rollout | None, dict[str, torch.Tensor]]:
        """Sample, score and compute advantages for one batch of prompts (`RolloutCollector.collect`); returns
        (rollout, rollout metrics); the rollout is None when dynamic sampling kept no group on any rank."""
        rollout, drawn = self.collector.collect(batch, self.sampling_generator(), self.kl_ctl.beta, self.needs_reference)
        metrics = rollout_metrics(drawn, self.cfg.rollout.samples_per_prompt, self.cfg.rollout.filter_groups, self.gold_scores(drawn))
        if rollout is not None and rollout.values is not None:
            metrics.update(critic_metrics(rollout.values, rollout.returns, rollout.completion_mask))
        ev = self.eval_cfg
        if self._rollouts == 0 or (ev.num_logged_samples and ev.every and self._rollouts % ev.every == 0):
            first = drawn.samples[0]
            log_samples(self, "samples/rollout", first.prompts, first.completions, first.golds, ev.num_logged_samples)
        return rollout, metrics

    def gold_scores(self, drawn: Drawn) -> torch.Tensor | None:
        """The task judge on every sampled completion (B,) when the reward is learned and every gold is known:
        the gold reward beside the proxy the policy is trained on. None otherwise."""
        parts = drawn.samples
        return self.scorer.gold([c for d in parts for c in d.completions], [g for d in parts for g in d.golds], torch.cat([d.gen.finished for d in parts]))

    def global_advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """Advantages (B,) of this rank's rows, with every rank's rewards' statistics (`rl.rollout`)."""
        return global_advantages(rewards, self.cfg.rollout.advantage, self.cfg.rollout.samples_per_prompt)

    def minibatch_loss(self, mb: Rollout, counts: torch.Tensor | None = None):
        """`rl.update.minibatch_loss` of this policy at the current beta."""
        return minibatch_loss(self.model, mb, self.cfg, self.kl_ctl.beta, counts)

    @property
    def critic_warming_up(self) -> bool:
        """Whether this rollout is one of the critic's warm-up rollouts, in which the policy does not move."""
        return self.critic_cfg is not None and self._rollouts < self.critic_cfg.warmup

    def ppo_update(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        """`rl.update.ppo_update` with Lightning's backward and this module's clipping; returns mean metrics."""
        optimizers = self.optimizers()
        policy_opt, critic_opt = (optimizers[0], optimizers[1]) if isinstance(optimizers, list) else (optimizers, None)
        critic = None if self.critic is None else CriticUpdate(
            self.critic, critic_opt, self.critic_cfg, lambda loss: self.clip_and_check(loss, self.critic, critic_opt, self.critic_cfg.max_grad_norm),
        )
        metrics, first_ratio_error = ppo_update(
            self.model, policy_opt, rollout, self.cfg, self.kl_ctl.beta, self.sampling_generator(),
            backward=self.manual_backward, clip=lambda loss: self.clip_and_check(loss, self.model, policy_opt, self.cfg.update.max_grad_norm),
            scheduler=self.lr_schedulers(), critic=critic, update_policy=not self.critic_warming_up,
        )
        names = [*(["first_ratio_error"] if first_ratio_error is not None else []), *metrics]
        values = [*([first_ratio_error] if first_ratio_error is not None else []), *metrics.values()]
        self.last_update = dict(zip(names, torch.stack(values).float().tolist())) if values else {}  # one host sync
        return metrics

    def clip_and_check(self, loss: torch.Tensor, model: nn.Module, optimizer, max_norm: float | None) -> None:
        """`rl.update.clip_and_check` of `model`'s gradients (the policy's or the critic's, each stepped by its own
        `optimizer`); under a mixed-precision plugin Lightning's `clip_gradients` clips (it owns the gradient scaler)."""
        mixed = self.attached is not None and type(self.attached.precision_plugin) is not Precision
        clip = (lambda norm: self.clip_gradients(optimizer, gradient_clip_val=norm, gradient_clip_algorithm="norm")) if mixed else None
        params = [p for p in model.parameters() if p.grad is not None]
        clip_and_check(params, loss, max_norm, clip, where=f" at rollout {self._rollouts}")

    def training_step(self, batch: dict, batch_idx: int) -> None:
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
                kl_and_tokens, _ = gather_uneven_rows(torch.stack([rollout.kl, rollout.completion_mask.sum(1).float()], 1))  # (B_global, 2)
                rollout_kl = kl_and_tokens[:, 0].sum() / kl_and_tokens[:, 1].sum()  # per-token KL of the sampling policy
                self.kl_ctl.update(float(rollout_kl), n_steps=kl_and_tokens.size(0))
        else:  # dynamic sampling found no informative group on any rank: nothing to learn from this rollout
            update_metrics = {}
            self._skipped_updates += 1
        update_time = time.perf_counter() - start
        self._rollouts += 1
        metrics = {**update_metrics, **rollout_metrics, "ppo/beta": torch.tensor(beta)}
        if self.cfg.rollout.filter_groups:
            metrics["rollout/skipped_updates"] = torch.tensor(float(self._skipped_updates))
        # update metrics are per-rank shares of global token means: their mean over ranks is the global value
        log_step_metrics(self, {**metrics, "time/rollout": rollout_time, "time/update": update_time}, mean_over_ranks=True,
                         prog_bar={"reward": "rollout/reward_mean"})
        if self.eval_cfg.every and self._rollouts % self.eval_cfg.every == 0:
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
        chosen = self.restore_best("rollout", self._rollouts) if self.eval_cfg.keep_best else None
        self.chosen = {
            "rollout": chosen["rollout"] if chosen else self._rollouts,
            "eval/accuracy": chosen["accuracy"] if chosen else (self.eval_history[-1]["eval/accuracy"] if self.eval_history else float("nan")),
        }

    def remember_if_best(self, accuracy: float) -> None:
        """Keep a CPU copy of the policy's weights when `accuracy` on `val` is at least the best so far plus
        `keep_best_min_gain`."""
        if self.eval_cfg.keep_best:
            self.keep_if_best({"rollout": self._rollouts}, accuracy, self.eval_cfg.keep_best_min_gain)

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, loader=None) -> dict[str, float] | None:
        """Greedy accuracy (and per stratum), mean reward and per-token KL to the reference on the `val` prompts
        (`evaluation.answer`), in `training_step`: the keep-best copy must be taken before the next update, and
        Lightning's validation loop runs only between training batches of its own cadence, not every N rollouts.

        `eval/kl` is the exact KL(policy || reference) of the next-token distributions (at the rollout
        temperature) per answer token. Every rank evaluates all prompts (deterministic), rank 0 logs."""
        rollout = self.cfg.rollout
        if loader is None:
            datamodule = getattr(self.trainer, "datamodule", None) if self.attached is not None else None
            if datamodule is None or not hasattr(datamodule, "eval_dataloader"):
                return None
            loader = datamodule.eval_dataloader()
        metrics = evaluate_batches(
            self.model, self.tokenizer, (move_batch(batch, self.device) for batch in loader), rollout.max_new_tokens,
            first=lambda a: log_samples(self, "samples/val", a.prompts, a.completions, a.golds, self.eval_cfg.num_logged_samples),
            compile=rollout.compile, score=self.score, reference=self.reference, kl_temperature=rollout.temperature,
        ).metrics()
        self.eval_history.append({"rollout": self._rollouts, **metrics})
        if self.attached is not None and self.trainer.state.fn == "fit":
            self.remember_if_best(metrics["eval/accuracy"])
        if self.attached is not None and self.logger is not None and self.trainer.is_global_zero:
            self.logger.log_metrics(metrics, step=logging_step(self))
        return metrics

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_meta(self) -> dict[str, Any]:
        generator = self.sampling_generator().get_state()
        each_rank = {"sampling_generators": per_rank(generator)} if world_size() > 1 else {}  # a collective
        return {
            **each_rank,
            "model": dict(self.policy_meta["model"]),
            "tokenizer": dict(self.policy_meta["tokenizer"]),
            "policy_ckpt": self.hparams.policy_ckpt,
            "policy_sha256": self.policy_sha256,
            "reward_ckpt": self.reward_cfg.ckpt,
            "reward_sha256": self.scorer.sha256,
            "critic": self.critic_record,
            "kl_controller": self.kl_ctl.state_dict(),
            "sampling_generator": generator,  # this rank's: rank 0's in the file, as one process reads it
            "rollouts": self._rollouts,
            "eval_history": [dict(h) for h in self.eval_history],
            "skipped_updates": self._skipped_updates,
            "best": None if self._best is None else dict(self._best),
            "chosen": self.chosen,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("rlhf", {})
        for option, key, path, current in (
            ("policy_ckpt", "policy", self.hparams.policy_ckpt, self.policy_sha256),
            ("reward.ckpt", "reward", self.reward_cfg.ckpt, self.scorer.sha256),
        ):
            if meta.get(f"{key}_sha256") != current:
                raise CheckpointError(
                    f"model.init_args.{option}: {path!r} (sha256 {current}) is not the file this PPO run started from "
                    f"(sha256 {meta.get(f'{key}_sha256')}, recorded as {meta.get(f'{key}_ckpt')!r}); refusing to resume "
                    f"against a different {key} checkpoint"
                )
        recorded, current = meta.get("critic"), self.critic_record
        if (recorded is None) != (current is None) or (current is not None and (recorded["init"], recorded["sha256"]) != (current["init"], current["sha256"])):
            raise CheckpointError(
                f"model.init_args.critic: this run's critic ({current}) is not the one the checkpoint was trained with "
                f"({recorded}); refusing to resume with another critic"
            )
        if "kl_controller" in meta:
            self.kl_ctl.load_state_dict(meta["kl_controller"])
        if "sampling_generator" in meta:
            own = own_entry(meta.get("sampling_generators"))  # each rank its own (rank 0's before they were kept)
            self._generator, self._generator_state = None, (meta["sampling_generator"] if own is None else own).cpu()
        self._rollouts = int(meta.get("rollouts", 0))
        self.eval_history = [dict(h) for h in meta.get("eval_history", [])]
        self._skipped_updates = int(meta.get("skipped_updates", 0))
        self._best = meta.get("best")

