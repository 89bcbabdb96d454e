"""`PreferenceDataModule`: preference pairs from a pair source, for the reward model and DPO."""

from __future__ import annotations

import sys

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from rlhf_lightning.data.base import TokenizedDataModule
from rlhf_lightning.data.jsonl import DataError, write_jsonl
from rlhf_lightning.data.preferences.datasets import PairDataset, SampleGroupDataset
from rlhf_lightning.data.preferences.records import PreferencePair, group_pairs, render_group, render_pair
from rlhf_lightning.data.preferences.sources import PairSource
from rlhf_lightning.options import DATA, SEED_MAX, check_choice, check_number
from rlhf_lightning.tasks.arithmetic import TASKS
from rlhf_lightning.tokenizer import Tokenizer

__all__ = ["PreferenceDataModule"]


def class_path(cls: type) -> str:
    """`cls`'s import path through the shortest module that exports it, as jsonargparse writes a class_path:
    `rlhf_lightning.data.preferences.SampledPairs`, the path configs name and checkpoints record (a resume
    compares the recorded options), not the file that defines the class.

    >>> from rlhf_lightning.data.preferences.sources import SampledPairs
    >>> class_path(SampledPairs)
    'rlhf_lightning.data.preferences.SampledPairs'
    """
    parts = cls.__module__.split(".")
    for n in range(1, len(parts)):
        module = ".".join(parts[:n])
        if getattr(sys.modules.get(module), cls.__qualname__, None) is cls:
            return f"{module}.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


class PreferenceDataModule(TokenizedDataModule):
    """Preference pairs from a pair source (`JsonlPairs` or `SampledPairs`), loaded in `setup`.

    Sampled pairs are written to `<run dir>/preferences_{train,val}.jsonl`, readable back with `JsonlPairs`.
    """

    def __init__(
        self,
        pairs: PairSource,
        task: str = "toy",
        seed: int = 0,
        batch_size: int = 128,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        tokenizer: Tokenizer | None = None,
        max_length: int | None = None,
    ) -> None:
        """
        Args:
            pairs: the pair source, by class_path: `rlhf_lightning.data.preferences.JsonlPairs` (files) or
                `rlhf_lightning.data.preferences.SampledPairs` (sampled from a policy checkpoint and judged).
            task: prompts to sample from: "toy" (hash splits), "toy_chat" (the same in conversational form) or
                "seed" (the seed task's 8 prompts).
            seed: seed of the sampling and of the prompt subsets (independent of the global seed, so a resumed
                run sees the same pairs).
            batch_size: pairs per optimizer step.
            eval_batch_size: held-out prompts (groups of completions) per batch.
            num_workers: DataLoader workers.
            tokenizer, max_length: the module's, linked by `rlhf fit` (see `TokenizedDataModule`).
        """
        super().__init__(tokenizer, max_length)
        check_choice("task", task, TASKS, prefix=DATA)
        check_number("seed", seed, low=0, high=SEED_MAX, integer=True, prefix=DATA)
        check_number("batch_size", batch_size, low=1, integer=True, prefix=DATA)
        check_number("eval_batch_size", eval_batch_size, low=1, integer=True, prefix=DATA)
        check_number("num_workers", num_workers, low=0, integer=True, prefix=DATA)
        self.save_hyperparameters(ignore=["tokenizer", "max_length", "pairs"])
        self.pairs = pairs
        self.hparams["pairs"] = {"class_path": class_path(type(pairs)), "init_args": dict(vars(pairs))}

    def _run_dir(self) -> str:
        trainer = self.trainer
        return (trainer.log_dir if trainer.loggers else None) or trainer.default_root_dir

    def _write(self, name: str, pairs: list[PreferencePair]) -> None:
        if self.trainer is not None and self.trainer.is_global_zero:
            write_jsonl(f"{self._run_dir()}/{name}", [p.to_record() for p in pairs])

    def setup(self, stage: str) -> None:
        hp = self.hparams
        tokenizer, max_len = self.tokenizer_and_length()
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        train_pairs, val_groups = self.pairs.load(hp.task, hp.seed, device)
        # conversational prompts: the chat template's text from here on (what the reward model and DPO score)
        train_pairs = [render_pair(tokenizer, p) for p in train_pairs]
        val_groups = [render_group(tokenizer, g) for g in val_groups]
        if self.pairs.generated:
            self._write("preferences_train.jsonl", train_pairs)
            self._write("preferences_val.jsonl", group_pairs(val_groups))
        if not train_pairs:
            where = getattr(self.pairs, "train_file", None) or f"{hp.task}:train"
            raise DataError("no preference pairs to train on (every sampled pair was a tie?)", path=where)
        self.train_set = PairDataset(tokenizer, train_pairs, max_len)
        self.val_set = SampleGroupDataset(tokenizer, val_groups, max_len)
        written = f", written to {self._run_dir()}/preferences_*.jsonl" if self.pairs.generated and self.trainer is not None else ""
        rank_zero_info(
            f"[reward] preference pairs: {len(self.train_set)} train, {sum(len(g.pairs) for g in val_groups)} held out "
            f"({sum(len(g.completions) for g in val_groups)} held-out completions){written}"
        )

    def train_dataloader(self) -> DataLoader:
        return self.loader(self.train_set, self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.val_set, self.hparams.eval_batch_size)
