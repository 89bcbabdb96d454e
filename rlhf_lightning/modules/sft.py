"""Supervised fine-tuning: maximize the log-likelihood of demonstrated completions."""

from __future__ import annotations

from typing import Any

import torch

from rlhf_lightning.callbacks import log_samples, log_step_metrics
from rlhf_lightning.distributed import sum_over_ranks, world_size
from rlhf_lightning.losses import masked_mean
from rlhf_lightning.optim import adamw_warmup_cosine
from rlhf_lightning.lora import add_adapters, lora_settings, require_peft
from rlhf_lightning.modules.stage import StageModule
from rlhf_lightning.option_groups import OptimConfig, as_group
from rlhf_lightning.options import ConfigError, check_lora, check_number
from rlhf_lightning.policy import base_record, build_policy, context_length, load_plain_policy, load_policy
from rlhf_lightning.evaluation import Evaluation, answer
from rlhf_lightning.scoring import token_logprobs
from rlhf_lightning.tasks.arithmetic import EVAL_MAX_NEW_TOKENS


class SFTModule(StageModule):
    """Negative log-likelihood of completion tokens (optionally prompt tokens too), mean over real tokens."""

    stage = "sft"

    def __init__(
        self,
        model: dict[str, Any] | None = None,
        tokenizer: dict[str, Any] | None = None,
        prompt_loss: bool = False,
        optim: OptimConfig = OptimConfig(lr=3e-3, weight_decay=0.1, warmup_steps=50, min_lr_ratio=0.1),
        max_new_tokens: int = EVAL_MAX_NEW_TOKENS,
        num_logged_samples: int = 8,
        init_ckpt: str | None = None,
        lora: dict[str, Any] | None = None,
        base_ckpt: str | None = None,
    ) -> None:
        """
        Args:
            model: plain config of the causal LM, e.g. {"type": "gpt", "n_layer": 2, "n_embd": 64};
                `vocab_size` is taken from the tokenizer.
            tokenizer: `CharTokenizer.to_dict()` output; default: the toy task's alphabet.
            prompt_loss: also train on prompt tokens (default: completion tokens only).
            optim: AdamW, its warm-up and cosine decay over the run's optimizer steps (`OptimConfig`).
            max_new_tokens: completion budget of greedy evaluation.
            num_logged_samples: evaluation completions written to TensorBoard as text.
            init_ckpt: start from the policy in this SFT or PPO checkpoint (or exported folder) instead of
                a fresh model: continued SFT with a fresh optimizer and schedule; `model` and `tokenizer`
                are then taken from the checkpoint.
            lora: train LoRA adapters instead of every weight: {r, alpha (default 2 r), dropout,
                target_modules (default: the attention and MLP projections)}; needs a trained base.
            base_ckpt: the base of the adapters: an SFT or PPO checkpoint (adapters it holds are merged in) or
                an exported folder; an HF model (`model.type: hf`) is its own base.
        """
        super().__init__()
        self.optim_cfg = as_group(OptimConfig, optim, OptimConfig(lr=3e-3, weight_decay=0.1, warmup_steps=50, min_lr_ratio=0.1))
        check_number("max_new_tokens", max_new_tokens, low=1, integer=True)
        check_number("num_logged_samples", num_logged_samples, low=0, integer=True)
        check_lora(lora)
        record: dict[str, Any] | None = None  # resolved LoRA settings and the base's record, if adapters train
        if lora is not None:
            require_peft("model.init_args.lora")
            settings = lora_settings(lora)
            if base_ckpt is not None:
                self.model, self.tokenizer, meta = load_plain_policy(base_ckpt, role="model.init_args.base_ckpt")
                model_config, base = meta["model"], base_record(base_ckpt, "checkpoint")
            elif (model or {}).get("type") == "hf":
                self.model, self.tokenizer, model_config = build_policy(model, tokenizer)
                base = base_record(model_config["path"], "hf")
            else:
                raise ConfigError(
                    "model.init_args.lora: adapters need a trained base: set model.init_args.base_ckpt "
                    "(an SFT or PPO checkpoint) or use an HF model folder (model.type: hf)"
                )
            record = {"lora": add_adapters(self.model, settings), "base": base}
        elif base_ckpt is not None:
            raise ConfigError("model.init_args.base_ckpt: is the base of LoRA adapters and needs model.init_args.lora (continued full SFT: init_ckpt)")
        elif init_ckpt is not None:
            self.model, self.tokenizer, meta = load_policy(init_ckpt, role="model.init_args.init_ckpt")
            model_config = meta["model"]
        else:
            self.model, self.tokenizer, model_config = build_policy(model, tokenizer)
        self.train_adapters(record)
        self.save_options({"optim": self.optim_cfg})
        self.hparams.model = model_config  # resolved: the checkpoint rebuilds exactly this model
        self.hparams.tokenizer = self.tokenizer.to_dict()
        self.val_answers = Evaluation()  # this validation's answers so far

    @property
    def data_max_length(self) -> int:
        """The longest demonstration or prompt its DataModule may produce: the model's context."""
        return context_length(self.model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, attention_mask)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        ids = batch["input_ids"]
        # Right-padded rows: causal attention alone keeps real tokens from seeing the padding after them,
        # so no explicit mask is needed (and the fused causal kernel is used).
        logprobs, logits = token_logprobs(self.model, ids, None, return_logits=True)  # (B, T), (B, T-1, V)
        loss_mask = batch["loss_mask"] | batch["prompt_loss_mask"] if self.hparams.prompt_loss else batch["loss_mask"]  # (B, T)
        targets, loss_mask = ids[:, 1:], loss_mask[:, 1:]  # (B, T-1): position t predicts token t+1
        loss = -masked_mean(logprobs[:, 1:], loss_mask)
        metrics = {"sft/loss": loss.detach(), "sft/token_accuracy": masked_mean((logits.argmax(-1) == targets).float(), loss_mask)}
        if world_size() > 1:
            # the rank's token sum over a rank's mean token count: the ranks' mean gradient (DDP's, FSDP2's) is then
            # the one a single process takes on the global batch, however the tokens fall across the ranks
            loss = -masked_mean(logprobs[:, 1:], loss_mask, total=sum_over_ranks(loss_mask.sum()) / world_size())
        log_step_metrics(self, metrics, prog_bar={name: name for name in metrics})  # rank 0's values, as self.log without sync_dist
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        answers = answer(self.model, self.tokenizer, batch, self.hparams.max_new_tokens)  # greedy, judged
        self.val_answers.add(answers)
        if batch_idx == 0:
            log_samples(self, "samples/val", answers.prompts, answers.completions, answers.golds, self.hparams.num_logged_samples)

    def on_validation_epoch_end(self) -> None:
        evaluation, self.val_answers = self.val_answers.gather(), Evaluation()  # every rank's prompts
        if not evaluation.parts:
            return
        for name, value in evaluation.metrics().items():
            self.log(name, value, prog_bar=name == "eval/accuracy")

    def configure_optimizers(self):
        return adamw_warmup_cosine(self.optim_cfg, self.model, self.trainer.estimated_stepping_batches)

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"model": dict(self.hparams.model), "tokenizer": dict(self.hparams.tokenizer)}
