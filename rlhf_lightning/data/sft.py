"""SFT demonstrations: (prompt, completion) pairs from the toy task or a JSONL file."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from rlhf_lightning.data.base import TokenizedDataModule
from rlhf_lightning.padding import right_pad
from rlhf_lightning.data.jsonl import DataError, read_jsonl
from rlhf_lightning.data.prompts import PromptDataset, load_prompts, read_group
from rlhf_lightning.data.stratum_weights import StratumWeightedSampler, check_stratum_weights, example_weights
from rlhf_lightning.options import DATA, check_choice, check_number
from rlhf_lightning.tasks.arithmetic import TASKS, demonstration_problems, task_problems
from rlhf_lightning.tasks.strata import prompt_strata, task_strata_names
from rlhf_lightning.tokenizer import Tokenizer


class SFTDataset(Dataset):
    """Each example is BOS + prompt + completion + EOS and a mask of the tokens the loss predicts."""

    def __init__(self, tokenizer: Tokenizer, pairs: list[tuple[str, str, str]], max_len: int) -> None:
        self.pad_id = tokenizer.pad_id
        self.examples = []
        for prompt, completion, where in pairs:
            p = tokenizer.encode_prompt(prompt, where=f"{where}: field 'prompt'")
            c = tokenizer.encode_completion(completion, where=f"{where}: field 'completion'")
            if len(p) + len(c) > max_len:
                raise DataError(
                    f"prompt + completion is {len(p) + len(c)} tokens, the model's context is {max_len}",
                    path=where, field="completion",
                )
            self.examples.append((p + c, len(p)))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple[list[int], int]:
        return self.examples[i]

    def collate(self, items: list[tuple[list[int], int]]) -> dict:
        input_ids, attention_mask = right_pad([ids for ids, _ in items], self.pad_id)  # (B, T) each
        pos = torch.arange(input_ids.size(1))[None, :]  # (1, T)
        prompt_len = torch.tensor([p for _, p in items])[:, None]  # (B, 1)
        # token t is predicted from tokens < t; BOS (t = 0) is never a target
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "loss_mask": attention_mask & (pos >= prompt_len),  # (B, T) the completion, EOS included
            "prompt_loss_mask": attention_mask & (pos > 0) & (pos < prompt_len),  # (B, T) the prompt after BOS
        }


class SFTDataModule(TokenizedDataModule):
    """Demonstrations for `train`, the task's `val` prompts (or a JSONL file) for greedy evaluation.

    Each example carries two masks of predicted tokens, the completion's (`loss_mask`) and the prompt's
    (`prompt_loss_mask`): the module chooses which it trains on (`SFTModule(prompt_loss=...)`).
    """

    def __init__(
        self,
        task: str = "toy",
        train_file: str | None = None,
        val_file: str | None = None,
        demo_fraction: float = 1.0,
        batch_size: int = 128,
        eval_batch_size: int = 1024,
        max_val_prompts: int | None = None,
        stratum_weights: dict[str, float] | None = None,
        num_workers: int = 0,
        tokenizer: Tokenizer | None = None,
        max_length: int | None = None,
    ) -> None:
        """
        Args:
            task: "toy" (two-digit arithmetic with hash splits) or "seed" (the seed task's 8 prompts).
            train_file: JSONL of {"prompt", "completion"[, "group"]} lines; replaces the task's demonstrations.
            val_file: JSONL of {"prompt"[, "completion"]} lines for evaluation; default: the task's `val`.
            demo_fraction: fraction of `train` prompts that have a demonstration (toy task only).
            batch_size: demonstrations per optimizer step.
            eval_batch_size: prompts per batch of greedy evaluation.
            max_val_prompts: evaluate on the first N `val` prompts only (None: all).
            stratum_weights: draw demonstrations by stratum (`rlhf_lightning.tasks.strata`), e.g.
                {"digits/1+1": 8, "digits/2+2": 0.5}: a demonstration's weight is the product of its strata's
                weights (1 where none is given); each epoch draws as many demonstrations as there are, with
                replacement, in proportion. None: every demonstration once per epoch, shuffled.
            num_workers: DataLoader workers.
            tokenizer, max_length: the module's, linked by `rlhf fit` (see `TokenizedDataModule`).
        """
        super().__init__(tokenizer, max_length)
        check_choice("task", task, TASKS, prefix=DATA)
        check_number("demo_fraction", demo_fraction, low=0, high=1, low_open=True, prefix=DATA)
        check_number("batch_size", batch_size, low=1, integer=True, prefix=DATA)
        check_number("eval_batch_size", eval_batch_size, low=1, integer=True, prefix=DATA)
        check_number("max_val_prompts", max_val_prompts, low=1, integer=True, allow_none="all", prefix=DATA)
        check_number("num_workers", num_workers, low=0, integer=True, prefix=DATA)
        self.save_hyperparameters(ignore=["tokenizer", "max_length"])
        check_stratum_weights(stratum_weights, "data.init_args.stratum_weights")

    def _pairs(self) -> tuple[list[tuple[str, str, str]], list[tuple[str, ...]]]:
        """(prompt, completion, where) per demonstration, and its strata."""
        hp = self.hparams
        if hp.train_file is not None:
            rows = read_jsonl(hp.train_file, required=["prompt", "completion"], optional={"group": str})
            pairs = [(r["prompt"], r["completion"], f"{hp.train_file}:{n}") for n, r in rows]
            return pairs, [prompt_strata(r["prompt"], read_group(hp.train_file, n, r)) for n, r in rows]
        problems = demonstration_problems(hp.demo_fraction) if hp.task == "toy" else task_problems(hp.task, "train")
        return [(p.prompt, p.answer, f"{hp.task}:train") for p in problems], [prompt_strata(p.prompt) for p in problems]

    def setup(self, stage: str) -> None:
        tokenizer, context = self.tokenizer_and_length()
        hp = self.hparams
        if stage == "fit":
            pairs, strata = self._pairs()
            self.train_set = SFTDataset(tokenizer, pairs, context)
            weights = check_stratum_weights(hp.stratum_weights, "data.init_args.stratum_weights")
            option, known = "data.init_args.stratum_weights", task_strata_names(hp.task)
            self.train_sampler = StratumWeightedSampler(example_weights(strata, weights, option, known)) if weights else None
        records = load_prompts(hp.task, "val", hp.val_file, hp.max_val_prompts)
        self.val_set = PromptDataset(tokenizer, records, context)

    def train_dataloader(self) -> DataLoader:
        return self.loader(self.train_set, self.hparams.batch_size, shuffle=self.train_sampler is None, sampler=self.train_sampler)

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.val_set, self.hparams.eval_batch_size)
