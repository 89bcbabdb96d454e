"""Direct preference optimization: the policy learns from preference pairs directly, with no reward model.

One training step, on a batch of B pairs from `PreferenceDataModule` (rows [0, B) chosen, [B, 2B) rejected):

1. one forward of the policy over the 2B rows; each completion's log-probs summed over its completion tokens
   (`scoring.token_logprobs`; prompt and padding never count);
2. the frozen reference's sums of the same tokens: from the table computed once at fit start
   (`precompute_ref_logprobs`), or one no-grad forward of the same rows; none for reference-free losses (simpo, orpo);
3. `losses.dpo_loss`: the configured `loss_type`s (TRL's names), weighted by `loss_weights`, plus RPO's NLL term.

Automatic optimization: a step is one loss and one optimizer step, as in SFT, so Lightning's gradient clipping
(`trainer.gradient_clip_val`), gradient accumulation and precision plugins apply unchanged.

On `val`: the implicit reward's pairwise accuracy on the held-out pairs (`eval/rm_accuracy`) and the greedy task
accuracy on the `val` prompts (`eval/accuracy` and its strata), also once before the first update.

Online DPO (`online: {...}`, on `PromptDataModule`'s prompt batches): every `refresh_every` steps the *current*
policy samples K completions per prompt of the step's batch through the offline pair sampler
(`data.preferences.sample_groups`), the judge or a reward checkpoint scores them, and every two completions of a
prompt whose scores differ become a pair; the reference's sums of those pairs are computed once, and the next
`refresh_every` steps train on all of them. The sampler is seeded by (seed, refresh, rank) and the pairs are part
of the checkpoint, so a resumed run continues bitwise. Greedy `val` accuracy every `eval_every` steps.

Sharded (`strategy.ShardedStrategy`): the policy is the trained root and the frozen reference a root of its own
(`frozen_roots`; a reference of adapters switched off is the policy itself). Every forward of a sharded model is a
collective, so every rank makes the same calls: the greedy evaluation decodes in lockstep (`generation.generate`),
a held-out batch with no pair still runs its forwards, and every rank decides as rank 0 whether to keep the policy
(`keep_best`: the copy is gathered whole, a collective, and put back into the shards by `StageModule`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import Dataset
from torchmetrics import MeanMetric

from rlhf_lightning.callbacks import log_samples, log_step_metrics, logging_step
from rlhf_lightning.checkpoints import CheckpointError, sha256_file, sha256_path
from rlhf_lightning.data.jsonl import DataError
from rlhf_lightning.data.preferences import JUDGES, PairDataset, check_pair_options, group_pairs, sample_groups
from rlhf_lightning.data.prompts import PromptDataset, PromptRecord, load_prompts, move_batch
from rlhf_lightning.losses import REFERENCE_FREE_LOSSES, PairLogps, chosen_nll, dpo_loss, implicit_rewards, masked_sum
from rlhf_lightning.models import enable_gradient_checkpointing
from rlhf_lightning.lora import BaseOfAdapters
from rlhf_lightning.modules.frozen import hide_reference, policy_reference
from rlhf_lightning.modules.stage import StageModule
from rlhf_lightning.option_groups import FROZEN_DTYPES, DPOEvalConfig, DPOLossConfig, OptimConfig, as_group
from rlhf_lightning.distributed import rank, sum_over_ranks, world_size
from rlhf_lightning.optim import adamw_warmup_cosine
from rlhf_lightning.options import SEED_MAX, ConfigError, check_choice, check_lora, check_number
from rlhf_lightning.policy import base_record, build_policy, context_length, load_policy
from rlhf_lightning.rewards import LearnedReward
from rlhf_lightning.evaluation import evaluate_batches
from rlhf_lightning.scoring import token_logprobs
from rlhf_lightning.sharding import in_lockstep
from rlhf_lightning.tokenizer import CharTokenizer

__all__ = ["DPOModule", "OnlineConfig", "WithReferenceLogps", "sequence_logps"]

ONLINE = "model.init_args.online."


@dataclass
class OnlineConfig:
    """Online DPO: pairs sampled from the current policy and judged while it trains (`DPOModule(online=...)`)."""

    refresh_every: int = 1
    """Optimizer steps that train on one refresh's pairs (1: fresh pairs every step, as TRL's online DPO). The
    prompt batches of the steps between two refreshes are not sampled."""
    samples_per_prompt: int = 4
    """Completions sampled per prompt (K >= 2); every two whose scores differ make a pair."""
    judge: str = "auto"
    """"auto" (the task's judge), "random" (noisy labels) or "learned" (the reward model of `reward_ckpt`)."""
    reward_ckpt: str | None = None
    """Reward-stage checkpoint that scores the completions with `judge: learned`."""
    tie_break: str | None = None
    """None (drop ties) or "length" (the longer completion wins a tie)."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_k: int | None = None
    """Sample among the k most likely tokens only (None: all)."""
    max_new_tokens: int = 6
    """Completion budget of the samples; one without EOS within it gets 0 from the task's judge."""
    eval_every: int = 10
    """Greedy `val` evaluation every N optimizer steps (also at the start and the end); 0: start and end only."""
    seed: int = 0
    """Seed of the sampling (with the refresh's number and the rank)."""

    def __post_init__(self) -> None:
        check_number("refresh_every", self.refresh_every, low=1, integer=True, prefix=ONLINE)
        check_pair_options(self.samples_per_prompt, self.judge, self.tie_break, prefix=ONLINE, judges=[*JUDGES, "learned"])
        check_number("temperature", self.temperature, low=0, low_open=True, prefix=ONLINE)
        check_number("top_k", self.top_k, low=1, integer=True, allow_none="all tokens", prefix=ONLINE)
        check_number("max_new_tokens", self.max_new_tokens, low=1, integer=True, prefix=ONLINE)
        check_number("eval_every", self.eval_every, low=0, integer=True, prefix=ONLINE)
        check_number("seed", self.seed, low=0, high=SEED_MAX, integer=True, prefix=ONLINE)
        if (self.judge == "learned") != (self.reward_ckpt is not None):
            raise ConfigError(
                f"{ONLINE}reward_ckpt: {self.reward_ckpt!r} with judge {self.judge!r}; "
                "allowed: a reward-stage checkpoint with judge 'learned', and null with 'auto' or 'random'"
            )


def sequence_logps(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs summed over each row's completion tokens (R,), the number of those tokens (R,)) of right-padded
    prompt ++ completion rows (`input_ids`, `completion_mask` (R, T)), in one teacher-forced forward.

    Right-padded rows need no attention mask: causal attention keeps real tokens from seeing the padding after
    them (as SFT's step; the fused causal kernel is used)."""
    logprobs = token_logprobs(model, batch["input_ids"], None)  # (R, T): [:, t] = log p(ids[t] | ids[:t])
    mask = batch["completion_mask"]  # (R, T)
    return masked_sum(logprobs, mask, dim=-1), mask.sum(-1).to(logprobs.dtype)  # (R,), (R,)


class WithReferenceLogps(Dataset):
    """A pair dataset whose batches also carry the reference's precomputed sums: `ref_chosen`, `ref_rejected` (B,)."""

    def __init__(self, pairs: Dataset, table: torch.Tensor) -> None:
        self.pairs, self.table = pairs, table  # table (N, 2): per pair the reference's (chosen, rejected) sums

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        return i, self.pairs[i]

    def collate(self, items: list[tuple[int, Any]]) -> dict:
        rows = self.table[torch.tensor([i for i, _ in items])]  # (B, 2)
        return {**self.pairs.collate([item for _, item in items]), "ref_chosen": rows[:, 0], "ref_rejected": rows[:, 1]}


class DPOModule(StageModule):
    """Preference optimization of a policy on pairs; see the module docstring for one training step."""

    stage = "dpo"

    def __init__(
        self,
        policy_ckpt: str | None = None,
        model: dict[str, Any] | None = None,
        tokenizer: dict[str, Any] | None = None,
        loss: DPOLossConfig = DPOLossConfig(),
        optim: OptimConfig = OptimConfig(lr=1e-4),
        eval: DPOEvalConfig = DPOEvalConfig(),
        precompute_ref_logprobs: bool = False,
        inference_batch_size: int = 1024,
        lora: dict[str, Any] | None = None,
        reference_dtype: str = "float32",
        gradient_checkpointing: bool = False,
        online: OnlineConfig | None = None,
    ) -> None:
        """
        Args:
            policy_ckpt: SFT (or PPO, DPO) checkpoint or exported folder; the policy starts from it and the frozen
                reference is it. Needed by every loss that reads a reference, unless `lora` puts adapters on an
                HF model (`model.type: hf`), whose adapters-off self is then the reference.
            model: plain config of the policy when there is no `policy_ckpt`: an HF folder (`{type: hf, path}`) or,
                for reference-free losses only, a fresh model.
            tokenizer: with `model`, its tokenizer (default: the HF folder's, or the toy alphabet).
            loss: the loss or weighted sum of losses, beta and their options (`DPOLossConfig`).
            optim: AdamW, its warm-up and cosine decay over the run's optimizer steps (`OptimConfig`).
            eval: greedy evaluation on `val` and the policy kept (`DPOEvalConfig`).
            precompute_ref_logprobs: compute the reference's log-probs of every training pair once, at fit start,
                instead of a reference forward each step.
            inference_batch_size: prompts per batch of greedy evaluation, and pairs per reference forward of the
                precompute (the DataModule's `eval_batch_size` is its held-out pairs' batch).
            lora: train LoRA adapters on the policy instead of all of it: {r, alpha (default 2 r), dropout,
                target_modules}; the reference is the same model with its adapters switched off (no copy). A
                `policy_ckpt` holding adapters (LoRA SFT) continues them without this option; its reference is
                then that SFT policy merged into one frozen copy.
            reference_dtype: "float32" or "bfloat16" for a frozen reference copy.
            gradient_checkpointing: recompute the policy's activations in backward instead of keeping them (less
                memory for about one more forward per step).
            online: online DPO (`OnlineConfig`): pairs sampled from the current policy every `refresh_every` steps
                from `PromptDataModule`'s prompt batches, instead of `PreferenceDataModule`'s fixed pairs.
        """
        super().__init__()
        # the groups check their own fields (one line, exit 2) before anything is built
        self.loss_cfg, self.optim_cfg, self.eval_cfg = as_group(DPOLossConfig, loss), as_group(OptimConfig, optim), as_group(DPOEvalConfig, eval)
        names = self.loss_cfg.names
        check_number("inference_batch_size", inference_batch_size, low=1, integer=True)
        check_lora(lora)
        check_choice("reference_dtype", reference_dtype, FROZEN_DTYPES)
        if isinstance(online, dict):  # a plain mapping (Python callers); the CLI builds the dataclass itself
            try:
                online = OnlineConfig(**online)
            except TypeError as err:
                raise ConfigError(f"model.init_args.online: {err}; allowed fields: {', '.join(OnlineConfig.__dataclass_fields__)}") from None
        if online is not None and self.eval_cfg.max_val_prompts is not None:
            raise ConfigError(
                "model.init_args.eval.max_val_prompts: online DPO evaluates its PromptDataModule's val prompts; "
                "set data.init_args.max_val_prompts instead"
            )
        if online is not None and precompute_ref_logprobs:
            raise ConfigError(
                "model.init_args.precompute_ref_logprobs: online DPO computes the reference's log-probs of each refresh's "
                "pairs once, when they are sampled; leave it false"
            )
        needs_reference = any(name not in REFERENCE_FREE_LOSSES for name in names)
        if needs_reference and policy_ckpt is None and lora is None:
            raise ConfigError(
                f"model.init_args.policy_ckpt: loss_type {names} needs a reference model: set policy_ckpt (an SFT checkpoint: "
                f"the policy starts from it and the frozen reference is it), add lora on an HF model, or use a reference-free "
                f"loss ({', '.join(sorted(REFERENCE_FREE_LOSSES))})"
            )
        self.online = online
        self.save_options({"loss": self.loss_cfg, "optim": self.optim_cfg, "eval": self.eval_cfg, "online": online})
        self.hparams.loss["loss_type"] = names

        meta: dict[str, Any] = {}
        if policy_ckpt is not None:
            if model is not None or tokenizer is not None:
                raise ConfigError("model.init_args.model: the policy comes from policy_ckpt; leave model and tokenizer unset")
            self.model, self.tokenizer, meta = load_policy(policy_ckpt, role="model.init_args.policy_ckpt")
            model_config = meta["model"]
        else:
            self.model, self.tokenizer, model_config = build_policy(model, tokenizer)
        self.policy_sha256 = sha256_path(policy_ckpt) if policy_ckpt is not None else None  # a resumed run must start from the same file
        self.policy_meta = {"model": dict(model_config), "tokenizer": self.tokenizer.to_dict()}

        def base() -> dict[str, Any]:  # the record of the adapters' base, when `lora` adds adapters
            if policy_ckpt is not None:
                return base_record(policy_ckpt, "checkpoint", self.policy_sha256)
            if model_config.get("type") == "hf":
                return base_record(model_config["path"], "hf")
            raise ConfigError(
                "model.init_args.lora: adapters need a trained base: set model.init_args.policy_ckpt (an SFT checkpoint) "
                "or use an HF model folder (model.type: hf)"
            )

        # resolved LoRA settings and the base's record if adapters train; the frozen reference (a submodule, so it
        # moves with the module; no gradients or optimizer state, left out of `state_dict`, rebuilt from
        # `policy_ckpt`), None for reference-free losses. Dropout is off: at the start the reference's log-probs are
        # the policy's own (margins exactly 0).
        record, self.reference = policy_reference(self.model, meta, lora, base, reference_dtype, needs_reference)
        self.train_adapters(record)
        if gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        hide_reference(self)

        self.val_pair_accuracy = MeanMetric()
        self.val_margin = MeanMetric()
        self.eval_history: list[dict[str, float]] = []
        self.chosen: dict[str, float] | None = None  # what `finalize_policy` kept
        self._val_prompts: PromptDataset | None = None

        self.judge_source: LearnedReward | None = None  # online DPO with `judge: learned`
        self.reward_sha256 = None
        if self.online is not None and self.online.judge == "learned":
            self.judge_source = LearnedReward(self.online.reward_ckpt, True, self.tokenizer, policy_ckpt, role=f"{ONLINE}reward_ckpt")
            self.reward_sha256 = sha256_file(self.online.reward_ckpt)  # a resumed run must be judged by the same model
        self._pairs: dict[str, Any] | None = None  # online: the current refresh's pair batch, reference sums included
        self._refreshes = 0  # online: refreshes so far (seeds the next one's sampling)
        self._steps_on_pairs = 0  # online: optimizer steps taken on the current pairs

    @property
    def data_max_length(self) -> int:
        """The longest prompt ++ completion its DataModule may produce: the policy's context."""
        return context_length(self.model)

    @property
    def task(self) -> str:
        """The task of the greedy evaluation's `val` prompts (and of online refreshes' prompt records): the
        DataModule's `task`; used alone, the toy task in the policy's form: `toy_chat` for a character tokenizer with
        the chat vocabulary (which exists for it), so the prompts are conversations as in its training."""
        datamodule = getattr(self.trainer, "datamodule", None) if self.attached is not None else None
        task = getattr(datamodule, "hparams", {}).get("task") if datamodule is not None else None
        if task is not None:
            return task
        return "toy_chat" if isinstance(self.tokenizer, CharTokenizer) and self.tokenizer.chat else "toy"

    def frozen_roots(self) -> dict[str, nn.Module]:
        """The frozen reference, sharded as a root of its own; none when it is the policy with its adapters off
        (sharded with the policy) or the loss needs none. An online judge's reward model stays whole."""
        if self.reference is None or isinstance(self.reference, BaseOfAdapters):
            return {}
        return {"reference": self.reference}

    def frozen_models(self) -> list[nn.Module]:
        """The frozen reference, if any (none with adapters off: it has no weights of its own)."""
        frozen = [] if self.reference is None else [self.reference]
        return frozen + ([self.judge_source.model] if self.judge_source is not None else [])

    # ------------------------------------------------------------------ setup

    def setup(self, stage: str) -> None:
        """The greedy evaluation's `val` prompts; with `precompute_ref_logprobs`, the reference's table.

        The table is recomputed here at every fit start, resumed or not, rather than stored in the checkpoint:
        it is a deterministic function of the pairs (seeded, so a resumed run loads the same ones) and of the
        reference (`policy_ckpt`, whose SHA-256 a resume checks), computed in fixed chunks in dataset order with no
        randomness, so on the same machine a resumed run uses bitwise the values of the uninterrupted one.
        It runs after the DataModule's `setup` and before any training dataloader is built."""
        datamodule = getattr(self.trainer, "datamodule", None) if self.attached is not None else None
        self._val_prompts = PromptDataset(self.tokenizer, load_prompts(self.task, "val", limit=self.eval_cfg.max_val_prompts), context_length(self.model))
        if self.online is not None and getattr(datamodule, "val_set", None) is not None:
            self._val_prompts = datamodule.val_set  # PromptDataModule's `val` prompts (its val_file, max_val_prompts)
        if stage == "fit" and datamodule is not None:
            prompts = hasattr(datamodule, "draw_prompts")  # PromptDataModule
            if prompts != (self.online is not None):
                raise ConfigError(
                    "data.class_path: online DPO samples its pairs from prompt batches: use rlhf_lightning.data.rollout_prompts.PromptDataModule"
                    if self.online is not None else
                    "data.class_path: DPO trains on preference pairs: use rlhf_lightning.data.preferences.PreferenceDataModule "
                    "(or set model.init_args.online to sample pairs from prompts)"
                )
        if stage != "fit" or not self.hparams.precompute_ref_logprobs or self.reference is None or datamodule is None:
            return
        pairs = datamodule.train_set
        if isinstance(pairs, WithReferenceLogps):
            pairs = pairs.pairs
        device = self.trainer.strategy.root_device
        self.to(device)
        datamodule.train_set = WithReferenceLogps(pairs, self.reference_table(pairs).cpu())

    @torch.no_grad()
    def reference_table(self, pairs: Dataset) -> torch.Tensor:
        """The reference's (chosen, rejected) log-prob sums (N, 2) of every pair, `inference_batch_size` pairs a forward,
        in dataset order: the batches a training step would build from the same pairs."""
        size = self.hparams.inference_batch_size
        out = []
        for start in range(0, len(pairs), size):
            batch = move_batch(pairs.collate([pairs[i] for i in range(start, min(start + size, len(pairs)))]), self.device)
            out.append(self.reference_logps(batch))
        return torch.cat(out) if out else torch.zeros(0, 2)

    def reference_logps(self, batch: dict) -> torch.Tensor:
        """The frozen reference's (chosen, rejected) sums (B, 2) of a pair batch, in one no-grad forward."""
        with torch.no_grad():
            sums, _ = sequence_logps(self.reference, batch)  # (2B,)
        return torch.stack(sums.chunk(2), dim=1)  # (B, 2)

    def on_fit_start(self) -> None:
        if self.judge_source is not None:
            self.judge_source.to(self.device)

    def configure_optimizers(self):
        return adamw_warmup_cosine(self.optim_cfg, self.model, self.trainer.estimated_stepping_batches)

    # ------------------------------------------------------------------ training

    def pair_logps(self, batch: dict) -> PairLogps:
        """The policy's sums (with gradients) and the reference's, as the losses read them."""
        sums, tokens = sequence_logps(self.model, batch)  # (2B,), (2B,)
        chosen, rejected = sums.chunk(2)
        chosen_tokens, rejected_tokens = tokens.chunk(2)
        if self.reference is None:
            return PairLogps(chosen, rejected, chosen_tokens, rejected_tokens)
        if "ref_chosen" in batch:  # precomputed at fit start
            ref = torch.stack([batch["ref_chosen"], batch["ref_rejected"]], dim=1)  # (B, 2)
        else:
            ref = self.reference_logps(batch)  # (B, 2)
        return PairLogps(chosen, rejected, chosen_tokens, rejected_tokens, ref[:, 0], ref[:, 1])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        rollout: dict[str, torch.Tensor] = {}
        scale = 1.0
        if self.online is not None:
            if self.online.eval_every and self.global_step % self.online.eval_every == 0 and self.eval_history[-1:] and self.eval_history[-1]["step"] != self.global_step:
                self.log_metrics_now(self.evaluate())  # before this step's update, so a checkpoint of this step holds it
            if self._pairs is None or self._steps_on_pairs >= self.online.refresh_every:
                rollout = self.refresh_pairs(batch)
            if self._pairs is None:  # every pair on every rank was a tie: nothing to learn from this batch
                log_step_metrics(self, rollout)
                return None
            batch, scale = move_batch(self._pairs, self.device), self._pairs["scale"]
            self._steps_on_pairs += 1
        logps = self.pair_logps(batch)
        cfg = self.loss_cfg
        out = dpo_loss(logps, cfg.names, cfg.beta, cfg.loss_weights, cfg.label_smoothing, cfg.gamma, cfg.nll_alpha)
        loss = out.pair_loss * scale  # online: this rank's share of every rank's pairs (1.0 offline: equal batches)
        if out.nll_weight:  # RPO's (and ORPO's) NLL per chosen token over every rank's pairs
            loss = loss + out.nll_weight * chosen_nll(logps) * self.token_share(logps.chosen_tokens.sum() if scale else None)
        metrics = {
            "dpo/loss": out.loss.detach(),
            "dpo/rewards/chosen": out.chosen_rewards.mean(),
            "dpo/rewards/rejected": out.rejected_rewards.mean(),
            "dpo/rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float().mean(),
            "dpo/rewards/margins": (out.chosen_rewards - out.rejected_rewards).mean(),
            "dpo/logps/chosen": logps.chosen.detach().mean(),
            "dpo/logps/rejected": logps.rejected.detach().mean(),
            "dpo/nll": out.nll,
            **rollout,
        }
        log_step_metrics(self, metrics, prog_bar={"loss": "dpo/loss", "acc": "dpo/rewards/accuracies"})  # rank 0's values
        return loss

    def token_share(self, tokens: torch.Tensor | None) -> float | torch.Tensor:
        """world x this rank's count of `tokens` / every rank's (None: this rank's pairs are a placeholder, 0 tokens):
        the weight that turns a per-rank token mean into its share of the global one under DDP's mean of gradients.
        1.0 in one process."""
        world = world_size()
        if world == 1:
            return 0.0 if tokens is None else 1.0
        local = torch.zeros((), device=self.device) if tokens is None else tokens.detach().float()
        return local * world / sum_over_ranks(local).clamp(min=1)

    # ------------------------------------------------------------------ online DPO

    @torch.no_grad()
    def refresh_pairs(self, batch: dict) -> dict[str, torch.Tensor]:
        """Sample and judge K completions per prompt of `batch` with the current policy, pair them, and hold the
        pairs (with the reference's sums) for the next `refresh_every` steps; returns the `rollout/*` metrics.

        Under DDP each rank pairs its own prompts; a rank's loss is scaled by its share of all ranks' pairs
        (`scale` = n_rank * world / n_all), so DDP's mean of gradients is the gradient of the mean over every pair
        (the NLL term likewise by its share of every rank's chosen tokens, `token_share`).
        A rank with no pair while others have some trains on one placeholder pair at weight 0 (every rank must
        join the gradient all-reduce); when no rank has a pair, the step is skipped."""
        cfg = self.online
        world, this_rank = world_size(), rank()
        records = [PromptRecord(p, g, f"{self.task}:train", s) for p, g, s in zip(batch["prompts"], batch["golds"], batch["strata"])]
        seed = ((cfg.seed * 1_000_003 + self._refreshes) * 1_009 + this_rank) % (2**62)
        groups = sample_groups(
            self.model, self.tokenizer, records, cfg.samples_per_prompt, cfg.judge if cfg.judge in JUDGES else "auto",
            cfg.tie_break, cfg.max_new_tokens, cfg.temperature, cfg.top_k, len(records), seed,
            score=self.judge_source,
        )
        self._refreshes += 1
        self._steps_on_pairs = 0
        pairs = group_pairs(groups)
        K = cfg.samples_per_prompt
        labels = torch.tensor([x for g in groups for x in g.labels], dtype=torch.float32)
        known = ~labels.isnan()
        totals = sum_over_ranks(torch.tensor(
            [len(pairs), len(groups) * K * (K - 1) / 2, float(labels[known].sum()), float(known.sum()), len(groups)],
            dtype=torch.float64, device=self.device,
        )).tolist()  # every rank's: pairs, possible pairs, gold scores, completions with a gold answer, prompts
        n_all = totals[0]
        metrics = {
            "rollout/pairs": torch.tensor(n_all),
            "rollout/pairs_kept_frac": torch.tensor(n_all / max(totals[1], 1.0)),
            "rollout/gold_reward": torch.tensor(totals[2] / totals[3] if totals[3] else float("nan")),
            "rollout/refreshes": torch.tensor(float(self._refreshes)),
        }
        if n_all == 0:
            self._pairs = None
            return metrics
        placeholder = not pairs
        if placeholder:  # a pair of this rank's first two samples, weighted 0 below
            g = groups[0]
            pairs = group_pairs([type(g)(g.prompt, g.gold, g.completions, g.ended, g.scores, g.labels, g.where, [(0, 1)])])
        try:
            data = PairDataset(self.tokenizer, pairs, context_length(self.model))
        except DataError as err:  # cannot happen for the policy's own samples within its context; say so if it does
            raise RuntimeError(f"online DPO: a sampled pair does not fit the policy's context: {err}") from err
        out = move_batch(data.collate([data[i] for i in range(len(data))]), self.device)
        if self.reference is not None:
            ref = self.reference_logps(out)  # (B, 2)
            out["ref_chosen"], out["ref_rejected"] = ref[:, 0], ref[:, 1]
        out["scale"] = 0.0 if placeholder else len(pairs) * world / n_all
        self._pairs = out
        return metrics

    def on_train_start(self) -> None:
        if self.global_step == 0 and not self.eval_history:  # the start, before any update (not on resume)
            self.log_metrics_now(self.evaluate())

    def on_train_end(self) -> None:
        self.finalize_policy()

    # ------------------------------------------------------------------ evaluation

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Held-out pairs: each completion's implicit reward, compared within its pairs."""
        pairs = batch["pairs"]  # (M, 2) rows of (chosen, rejected)
        if not len(pairs) and not in_lockstep(self.model):
            return
        # sharded, a batch with no pair still runs the forwards: each one is a collective the other ranks join
        sums, tokens = sequence_logps(self.model, batch)  # (N,)
        ref = sequence_logps(self.reference, batch)[0] if self.reference is not None else None
        if not len(pairs):
            return
        at = lambda t, k: None if t is None else t[pairs[:, k]]  # noqa: E731
        logps = PairLogps(at(sums, 0), at(sums, 1), at(tokens, 0), at(tokens, 1), at(ref, 0), at(ref, 1))
        chosen, rejected = implicit_rewards(logps, self.loss_cfg.beta, reference_free=self.reference is None)
        self.val_pair_accuracy.update((chosen > rejected).float())
        self.val_margin.update(chosen - rejected)

    def on_validation_epoch_end(self) -> None:
        if self.val_pair_accuracy.update_called:
            self.log("eval/rm_accuracy", self.val_pair_accuracy.compute(), prog_bar=True)
            self.log("eval/rewards/margins", self.val_margin.compute())
        self.val_pair_accuracy.reset()
        self.val_margin.reset()
        if self.attached is not None and self.trainer.sanity_checking:
            return
        for name, value in self.evaluate().items():
            self.log(name, value, prog_bar=name == "eval/accuracy")

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Greedy task accuracy on the `val` prompts and per stratum (`evaluation.answer`, as SFT's validation);
        every rank evaluates all prompts (deterministic). Recorded in `eval_history`; during fit, the best policy is kept."""
        ev = self.eval_cfg
        data = self._val_prompts
        if data is None:
            data = self._val_prompts = PromptDataset(self.tokenizer, load_prompts(self.task, "val", limit=ev.max_val_prompts), context_length(self.model))
        log = lambda a: log_samples(self, "samples/val", a.prompts, a.completions, a.golds, ev.num_logged_samples)  # noqa: E731
        metrics = evaluate_batches(
            self.model, self.tokenizer, data.batches(self.hparams.inference_batch_size, self.device), ev.max_new_tokens,
            first=log if self.attached is not None else None,
        ).metrics()
        self.eval_history.append({"step": self.global_step, **metrics})
        if self.attached is not None and self.trainer.state.fn == "fit":
            self.remember_if_best(metrics["eval/accuracy"])
        return metrics

    def log_metrics_now(self, metrics: dict[str, float]) -> None:
        """Write evaluation metrics outside a loop's logging hook (before the first update, at the end)."""
        if self.attached is not None and self.logger is not None and self.trainer.is_global_zero:
            self.logger.log_metrics(metrics, step=logging_step(self))
        if self.attached is not None:
            self.trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})

    def remember_if_best(self, accuracy: float) -> None:
        """Keep a CPU copy of the trained weights when `accuracy` on `val` is at least the best so far."""
        if self.eval_cfg.keep_best:
            if in_lockstep(self.model):  # keeping gathers the shards (a collective): every rank decides as rank 0
                accuracy = self.trainer.strategy.broadcast(accuracy, src=0)
            self.keep_if_best({"step": self.global_step}, accuracy)

    def finalize_policy(self) -> None:
        """With `keep_best` (or online): evaluate the last policy if it has not been; with `keep_best`, keep the best
        one on `val`.

        Called by `FinalCheckpoint` before it writes the stage's checkpoint, and at the end of training."""
        if self.chosen is not None or self.global_step == 0 or not (self.eval_cfg.keep_best or self.online is not None):
            return
        if not self.eval_history or self.eval_history[-1]["step"] != self.global_step:
            self.log_metrics_now(self.evaluate())  # online DPO evaluates its last policy, kept or not
        if not self.eval_cfg.keep_best:
            return
        best = self.restore_best("step", self.global_step)
        self.chosen = {"step": best["step"], "eval/accuracy": best["accuracy"]} if best is not None else None

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_meta(self) -> dict[str, Any]:
        # the policy format of SFT and PPO checkpoints: `rlhf eval`, `rlhf export` and PPO's policy_ckpt read it
        meta = {
            "model": dict(self.policy_meta["model"]),
            "tokenizer": dict(self.policy_meta["tokenizer"]),
            "policy_ckpt": self.hparams.policy_ckpt,
            "policy_sha256": self.policy_sha256,
            "eval_history": [dict(h) for h in self.eval_history],
            "best": None if self._best is None else dict(self._best),
            "chosen": self.chosen,
        }
        if self.online is not None:  # the pairs in use and where the sampling stands: a resumed run continues bitwise
            pairs = None if self._pairs is None else {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in self._pairs.items()}
            meta["online"] = {
                "pairs": pairs, "refreshes": self._refreshes, "steps_on_pairs": self._steps_on_pairs,
                "reward_ckpt": self.online.reward_ckpt, "reward_sha256": self.reward_sha256,
            }
        return meta

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("rlhf", {})
        if meta.get("policy_sha256") != self.policy_sha256:
            raise CheckpointError(
                f"model.init_args.policy_ckpt: {self.hparams.policy_ckpt!r} (sha256 {self.policy_sha256}) is not the file this "
                f"DPO run started from (sha256 {meta.get('policy_sha256')}); refusing to resume against a different policy_ckpt"
            )
        online = meta.get("online")
        if (online is None) != (self.online is None):
            raise CheckpointError(
                f"model.init_args.online: this checkpoint is of an {'online' if online is not None else 'offline'} DPO run; "
                "resume it with the same setting"
            )
        if online is not None:
            if online.get("reward_sha256") != self.reward_sha256:
                raise CheckpointError(
                    f"{ONLINE}reward_ckpt: {self.online.reward_ckpt!r} (sha256 {self.reward_sha256}) is not the reward model this "
                    f"online DPO run was judged by (sha256 {online.get('reward_sha256')}); refusing to resume"
                )
            self._pairs = online["pairs"]
            self._refreshes, self._steps_on_pairs = int(online["refreshes"]), int(online["steps_on_pairs"])
        self.eval_history = [dict(h) for h in meta.get("eval_history", [])]
        self._best = meta.get("best")
        self.chosen = meta.get("chosen")
