"""Reward modelling: a Bradley-Terry loss on preference pairs, `-log sigmoid(r_chosen - r_rejected)`.

Sharded (`strategy.ShardedStrategy`): the reward model (its backbone's blocks, then the whole model with the score
head and the LM head) is one trained root (`StageModule.configure_model`); the likelihood feature's 0-dim `lm_scale`
stays whole on every rank (`sharding.shard_model`). The training step reads `score_and_logprobs`, registered as a
forward of the sharded root.
"""

from __future__ import annotations

import math
from typing import Any

from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import CatMetric, MeanMetric

from rlhf_lightning.callbacks import log_step_metrics
from rlhf_lightning.distributed import sum_over_ranks, world_size
from rlhf_lightning.checkpoints import read_checkpoint, sha256_file, submodule_state
from rlhf_lightning.lora import add_reward_adapters, lora_settings, require_peft
from rlhf_lightning.modules.stage import StageModule
from rlhf_lightning.losses import bradley_terry_loss, masked_mean, pairwise_accuracy
from rlhf_lightning.models.reward import RewardModel
from rlhf_lightning.option_groups import OptimConfig, as_group
from rlhf_lightning.optim import adamw_warmup_cosine
from rlhf_lightning.options import ConfigError, check_lora, check_number
from rlhf_lightning.policy import POLICY_STAGES, base_record, load_plain_policy
from rlhf_lightning.sharding import is_sharded
from rlhf_lightning.tasks.arithmetic import ALPHABET
from rlhf_lightning.tokenizer import CharTokenizer, Tokenizer, load_tokenizer

__all__ = ["RewardModule", "binary_auroc"]


def binary_auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Probability that a random positive (label 1) outscores a random negative (label 0); ties count half.

    Mann-Whitney U from average ranks; NaN when either class is missing.

    >>> binary_auroc(torch.tensor([0.1, 0.4, 0.4, 0.9]), torch.tensor([0.0, 0.0, 1.0, 1.0]))  # (1 + 0.5 + 1 + 1) / 4
    0.875
    """
    scores, labels = scores.double().flatten(), labels.flatten()  # (N,), (N,)
    positive = labels == 1
    n_pos, n_neg = int(positive.sum()), int((labels == 0).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)  # sorted tie blocks
    block_rank = counts.cumsum(0).double() - (counts.double() - 1) / 2  # average 1-based rank of each block
    ranks = block_rank[inverse]  # (N,)
    u = float(ranks[positive].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


class RewardModule(StageModule):
    """Trains a `RewardModel` on preference pairs; chosen and rejected are scored in one forward."""

    stage = "reward"

    def __init__(
        self,
        model: dict[str, Any] | None = None,
        tokenizer: dict[str, Any] | None = None,
        sft_ckpt: str | None = None,
        init_from_sft: bool = True,
        use_margin: bool = True,
        chosen_nll: float = 0.0,
        optim: OptimConfig = OptimConfig(lr=1e-3, weight_decay=0.0, warmup_steps=10, min_lr_ratio=0.1),
        lora: dict[str, Any] | None = None,
    ) -> None:
        """
        Args:
            model: plain config of the reward model, e.g. {"type": "gpt", "n_layer": 2, "n_embd": 64} or
                {"type": "mean_embedding", "n_embd": 64} (the seed's model, for parity); `vocab_size` comes from the
                tokenizer. With `init_from_sft`, the transformer's sizes come from the SFT checkpoint.
            tokenizer: `CharTokenizer.to_dict()` output; default: the SFT checkpoint's, else the toy alphabet.
            sft_ckpt: SFT checkpoint: its tokenizer and its weights (with `init_from_sft`). Sampled preference
                pairs name their own policy (`data.init_args.pairs.init_args.policy_ckpt`).
            init_from_sft: initialize the transformer from the SFT policy (its LM head is dropped).
            use_margin: use the pairs' optional `margin` in the loss (TRL's convention).
            chosen_nll: weight of the chosen completions' mean token NLL under the LM head, added to the
                loss (needs `lm_feature`). It keeps the likelihood feature a calibrated language model while
                the Bradley-Terry loss pushes rejected completions down.
            optim: AdamW, its warm-up and cosine decay over the run's optimizer steps (`OptimConfig`).
            lora: train LoRA adapters on the reward model's backbone instead of all of it: {r, alpha (default
                2 r), dropout, target_modules}; the score head (and the likelihood feature's scale) train fully,
                the LM head stays the SFT policy's. Needs a trained base: `sft_ckpt` with `init_from_sft`, or an
                HF folder (`model.type: hf`). The checkpoint holds the trained tensors and the base's path and SHA-256.
        """
        super().__init__()
        check_number("chosen_nll", chosen_nll, low=0)
        self.optim_cfg = as_group(OptimConfig, optim, OptimConfig(lr=1e-3, weight_decay=0.0, warmup_steps=10, min_lr_ratio=0.1))
        check_lora(lora)
        sft = read_checkpoint(sft_ckpt, POLICY_STAGES, "model.init_args.sft_ckpt") if sft_ckpt else None
        self.sft_sha256 = sha256_file(sft_ckpt) if sft_ckpt else None  # a resumed run must start from the same file
        self.tokenizer = self._resolve_tokenizer(tokenizer, sft, model)
        config = self._resolve_model(model, sft if init_from_sft else None)
        self.model = RewardModel(config)
        if sft is not None and init_from_sft:
            if sft["rlhf"].get("lora"):  # a LoRA SFT policy: its adapters merged into its base
                self.model.load_backbone(load_plain_policy(sft_ckpt, role="model.init_args.sft_ckpt")[0].state_dict())
            else:
                self.model.load_backbone(submodule_state(sft, "model"))
        record: dict[str, Any] | None = None  # resolved LoRA settings and the base's record, if adapters train
        if lora is not None:
            require_peft("model.init_args.lora")
            if sft is not None and init_from_sft:
                base = base_record(sft_ckpt, "checkpoint", self.sft_sha256)
            elif config["type"] == "hf":
                base = base_record(config["path"], "hf")
            else:
                raise ConfigError(
                    "model.init_args.lora: adapters need a trained base: model.init_args.sft_ckpt with init_from_sft "
                    "(the SFT policy's transformer), or an HF folder (model.type: hf)"
                )
            record = {"lora": add_reward_adapters(self.model, lora_settings(lora)), "base": base}
        self.train_adapters(record)
        if chosen_nll and not self.model.lm_feature:
            raise ConfigError("model.init_args.chosen_nll needs a reward model with the likelihood feature (model: {lm_feature: true})")
        self.save_options({"optim": self.optim_cfg})
        self.hparams.model = config  # resolved: the checkpoint rebuilds exactly this model
        self.hparams.tokenizer = self.tokenizer.to_dict()
        self.val_accuracy = MeanMetric()
        self.val_loss = MeanMetric()
        self.val_scores = CatMetric(nan_strategy="disable")
        self.val_labels = CatMetric(nan_strategy="disable")
        self.reward_mean, self.reward_std = 0.0, 1.0  # of held-out completions' scores, measured on val

    @staticmethod
    def _resolve_tokenizer(tokenizer: dict[str, Any] | None, sft: dict | None, model: dict[str, Any] | None) -> Tokenizer:
        """The SFT checkpoint's tokenizer (its recorded chat template included), the one given, an HF folder's own
        (with its chat template), or the toy alphabet. `to_dict()` of the result is what the checkpoint records."""
        if sft is None:
            if not tokenizer and (model or {}).get("type") == "hf" and (model or {}).get("path"):
                from rlhf_lightning.hf_files import local_folder

                tokenizer = {"type": "hf", "path": local_folder(model["path"])}
            return load_tokenizer(tokenizer) if tokenizer else CharTokenizer(ALPHABET)
        sft_tokenizer = load_tokenizer(sft["rlhf"]["tokenizer"])
        if tokenizer and load_tokenizer(tokenizer) != sft_tokenizer:
            raise ConfigError("model.init_args.tokenizer differs from the tokenizer of model.init_args.sft_ckpt; leave it unset")
        return sft_tokenizer

    def _resolve_model(self, model: dict[str, Any] | None, sft: dict | None) -> dict[str, Any]:
        config = {"type": "gpt", **(model or {})}
        if sft is None:
            return {**config, "vocab_size": self.tokenizer.vocab_size}
        policy = sft["rlhf"]["model"]
        if config["type"] != "gpt" or policy.get("type", "gpt") != "gpt":
            raise ConfigError(
                f"model.init_args.init_from_sft needs a 'gpt' reward model and a 'gpt' policy, got "
                f"{config['type']!r} and {policy.get('type')!r} (set init_from_sft: false)"
            )
        conflicts = sorted(k for k in config if k != "type" and k in policy and policy[k] != config[k])
        if conflicts:
            raise ConfigError(f"model.init_args.model: {conflicts} differ from the SFT policy's; with init_from_sft the sizes come from sft_ckpt")
        return {**policy, "type": "gpt", **{k: config[k] for k in ("lm_feature",) if k in config}}

    def setup(self, stage: str) -> None:
        """Warn when sampled preference pairs came from another policy than the one this reward model starts from."""
        pairs = getattr(getattr(self.attached, "datamodule", None), "pairs", None) if self.attached is not None else None
        policy = getattr(pairs, "policy_ckpt", None)
        same_file = policy and self.hparams.sft_ckpt and Path(policy).resolve() == Path(self.hparams.sft_ckpt).resolve()
        if policy and self.sft_sha256 and not same_file and Path(policy).is_file() and sha256_file(policy) != self.sft_sha256:
            rank_zero_warn(
                f"data.init_args.pairs.init_args.policy_ckpt {policy!r} is not model.init_args.sft_ckpt "
                f"{self.hparams.sft_ckpt!r}: the pairs are sampled from another policy than the reward model starts from"
            )

    @property
    def data_max_length(self) -> int:
        """The longest scored sequence its DataModule may produce: the reward model's context."""
        return int(self.model.block_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, attention_mask, completion_mask)  # (B,)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        completion = batch["completion_mask"]  # (2B, T)
        scores, logp = self.model.score_and_logprobs(batch["input_ids"], batch["attention_mask"], completion)  # (2B,): chosen, then rejected
        r_chosen, r_rejected = scores.chunk(2)  # (B,), (B,)
        margin = batch["margin"] if self.hparams.use_margin else None
        loss = bradley_terry_loss(r_chosen, r_rejected, margin)
        n = r_chosen.size(0)
        metrics = {
            "rm/loss": loss.detach(),  # Bradley-Terry alone
            "rm/accuracy": pairwise_accuracy(r_chosen, r_rejected),
            "rm/margin": (r_chosen - r_rejected).mean().detach(),
        }
        if self.hparams.chosen_nll:
            tokens = completion[:n, 1:]  # the chosen rows' completion tokens
            nll = -masked_mean(logp[:n], tokens)
            metrics["rm/chosen_nll"] = nll.detach()
            if world_size() > 1:
                # the rank's token sum over a rank's mean token count: the ranks' mean gradient (DDP's, FSDP2's) is
                # then one process's on the global batch, however the chosen tokens fall across the ranks (as SFT)
                nll = -masked_mean(logp[:n], tokens, total=sum_over_ranks(tokens.sum()) / world_size())
            loss = loss + self.hparams.chosen_nll * nll
        # rank 0's values, as self.log without sync_dist; the bar shows the loss and the accuracy
        log_step_metrics(self, metrics, prog_bar={"rm/loss": "rm/loss", "rm/accuracy": "rm/accuracy"})
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        scores = self.model(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])  # (N,) held-out completions
        pairs = batch["pairs"]  # (M, 2) rows of (chosen, rejected)
        if len(pairs):
            diff = scores[pairs[:, 0]] - scores[pairs[:, 1]]  # (M,)
            self.val_accuracy.update((diff > 0).float())
            self.val_loss.update(-F.logsigmoid(diff))
        self.val_scores.update(scores)
        self.val_labels.update(batch["labels"])

    def on_validation_epoch_end(self) -> None:
        if self.val_accuracy.update_called:
            self.log("eval/rm_accuracy", self.val_accuracy.compute(), prog_bar=True)
            self.log("eval/rm_loss", self.val_loss.compute())
        if self.val_scores.update_called:
            scores, labels = self.val_scores.compute(), self.val_labels.compute()  # (N,), (N,)
            self.reward_mean, self.reward_std = float(scores.mean()), float(scores.std(unbiased=False))
            self.log("eval/rm_reward_mean", self.reward_mean)
            self.log("eval/rm_reward_std", self.reward_std)
            known = ~labels.isnan()
            auroc = binary_auroc(scores[known], labels[known])
            if not math.isnan(auroc):
                self.log("eval/rm_auroc", auroc, prog_bar=True)
        for metric in (self.val_accuracy, self.val_loss, self.val_scores, self.val_labels):
            metric.reset()

    def configure_model(self) -> None:
        """Sharded (`StageModule.configure_model`; a model with no block, mean_embedding, is refused), then
        `score_and_logprobs`, which the training step calls instead of `forward`, registered as a forward of the
        sharded root: the root's own weights (embeddings, heads) are gathered before it and freed after."""
        super().configure_model()
        if is_sharded(self.model) and "score_and_logprobs" not in vars(self.model):  # not yet registered
            from torch.distributed.fsdp import register_fsdp_forward_method

            register_fsdp_forward_method(self.model, "score_and_logprobs")

    def configure_optimizers(self):
        return adamw_warmup_cosine(self.optim_cfg, self.model, self.trainer.estimated_stepping_batches)

    def checkpoint_meta(self) -> dict[str, Any]:
        return {
            "model": dict(self.hparams.model),
            "tokenizer": dict(self.hparams.tokenizer),
            "reward_mean": float(self.reward_mean),
            "reward_std": float(self.reward_std),
            "sft_ckpt": self.hparams.sft_ckpt,
            "sft_sha256": self.sft_sha256,
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # `rlhf` metadata; the adapters alone under LoRA
        if self.lora is not None:
            return
        # Self-describing: `load_from_checkpoint` rebuilds from the resolved model and tokenizer above and
        # never needs the SFT file again (its weights are in the state dict).
        checkpoint["hyper_parameters"] = {**checkpoint.get("hyper_parameters", {}), "sft_ckpt": None, "init_from_sft": False}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("rlhf", {})
        self.reward_mean = float(meta.get("reward_mean", self.reward_mean))
        self.reward_std = float(meta.get("reward_std", self.reward_std))
