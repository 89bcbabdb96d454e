"""Prompts for PPO: one batch of prompts per rollout, and the held-out prompts it is evaluated on."""

from __future__ import annotations

from torch.utils.data import DataLoader

from rlhf_lightning.data.base import TokenizedDataModule

from rlhf_lightning.data.prompts import PromptDataset, load_prompts


class PromptDataModule(TokenizedDataModule):
    """`train` prompts (the task's split or a JSONL file of `{"prompt"}` lines) and `val` prompts.

    Each training batch is the prompts of one rollout; the module samples several completions per prompt.
    Under DDP, Lightning's distributed sampler hands each rank whole prompts, so all samples of a prompt
    stay on one rank. Evaluation prompts come from `eval_dataloader()`, which the PPO module calls itself
    (before the first update, every few rollouts and at the end), not from Lightning's validation loop.
    """

    context_attr = "prompt_context_length"  # prompts leave room for max_new_tokens

    def __init__(
        self,
        task: str = "toy",
        train_file: str | None = None,
        val_file: str | None = None,
        batch_size: int = 64,
        eval_batch_size: int = 1024,
        max_train_prompts: int | None = None,
        max_val_prompts: int | None = None,
        num_workers: int = 0,
    ) -> None:
        """
        Args:
            task: "toy" (two-digit arithmetic with hash splits) or "seed" (the seed's 8 prompts).
            train_file: JSONL of {"prompt"[, "completion" as gold]} lines; replaces the task's `train` prompts.
            val_file: JSONL of {"prompt"[, "completion"]} lines for evaluation; default: the task's `val`.
            batch_size: prompts per rollout (per rank under DDP); each gets `samples_per_prompt` completions.
            eval_batch_size: prompts per batch of greedy evaluation.
            max_train_prompts: use the first N training prompts only (None: all).
            max_val_prompts: evaluate on the first N `val` prompts only (None: all).
            num_workers: DataLoader workers.
        """
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        tokenizer, context = self.module_tokenizer()
        hp = self.hparams
        if stage == "fit":
            records = load_prompts(hp.task, "train", hp.train_file, hp.max_train_prompts)
            self.train_set = PromptDataset(tokenizer, records, context)
        self.val_set = PromptDataset(tokenizer, load_prompts(hp.task, "val", hp.val_file, hp.max_val_prompts), context)

    def train_dataloader(self) -> DataLoader:
        # drop_last: equal rollouts (and equal ranks under DDP)
        return self.loader(self.train_set, self.hparams.batch_size, shuffle=True, drop_last=len(self.train_set) >= self.hparams.batch_size)

    def eval_dataloader(self) -> DataLoader:
        return self.loader(self.val_set, self.hparams.eval_batch_size)
