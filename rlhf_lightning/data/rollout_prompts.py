"""Prompts for the stages that sample their own completions (PPO's rollouts, online DPO's refreshes): one batch
of `train` prompts per training step, further prompts drawn on demand, and the `val` prompts they are evaluated on.
(Formerly `rlhf_lightning.data.ppo`.)"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader

from rlhf_lightning.data.base import TokenizedDataModule
from rlhf_lightning.data.prompts import PromptDataset, load_prompts, source_options
from rlhf_lightning.options import DATA, SEED_MAX, check_choice, check_number
from rlhf_lightning.tasks.arithmetic import TASKS
from rlhf_lightning.tokenizer import Tokenizer

__all__ = ["PromptDataModule", "PromptStream"]


class PromptStream:
    """An endless stream of dataset indices: epoch e is a permutation seeded by (seed, e).

    Its state is three integers, so a run that restores it draws exactly the prompts an uninterrupted run
    would have drawn. Under DDP every rank holds the same stream and takes its own slice of each draw.

    >>> stream = PromptStream(size=3, seed=0)
    >>> sorted(stream.take(3)) == [0, 1, 2] and stream.state_dict() == {"seed": 0, "epoch": 1, "position": 0}
    True
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        if size < 1:
            raise ValueError("PromptStream needs at least one prompt")
        self.size, self.seed, self.epoch, self.position = size, seed, 0, 0
        self._order: list[int] | None = None

    def _permutation(self) -> list[int]:
        if self._order is None:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._order = torch.randperm(self.size, generator=generator).tolist()
        return self._order

    def take(self, n: int) -> list[int]:
        """The next `n` indices (crossing into the next epoch's permutation when this one runs out)."""
        out: list[int] = []
        while len(out) < n:
            order = self._permutation()
            chunk = order[self.position : self.position + n - len(out)]
            out += chunk
            self.position += len(chunk)
            if self.position == self.size:
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
        return out

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])
        self._order = None


class PromptDataModule(TokenizedDataModule):
    """`train` prompts (the task's split or a JSONL file of `{"prompt"}` lines) and `val` prompts.

    Each training batch is the prompts of one rollout; the module samples several completions per prompt.
    Under DDP, Lightning's distributed sampler hands each rank whole prompts, so all samples of a prompt
    stay on one rank. `draw_prompts(n)` hands out further `train` prompts from a separate seeded stream
    (dynamic sampling's extra rounds); its position is part of the DataModule's `state_dict`, which
    Lightning saves in checkpoints and restores on resume. Evaluation prompts come from `eval_dataloader()`, which the PPO module calls itself
    (before the first update, every few rollouts and at the end), not from Lightning's validation loop.
    """

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
        seed: int = 0,
        split: str = "train",
        val_split: str = "train",
        fields: dict[str, str] | None = None,
        shuffle_seed: int | None = None,
        tokenizer: Tokenizer | None = None,
        max_length: int | None = None,
    ) -> None:
        """
        Args:
            task: "toy" (two-digit arithmetic with hash splits), "toy_chat" (the same in conversational form) or
                "seed" (the seed task's 8 prompts).
            train_file: prompts replacing the task's `train` prompts: {"prompt"[, "completion" as gold]} records, or
                conversational ones ({"prompt": [messages ending in a user turn][, "gold"]}, or {"messages": [...]}
                ending in the gold reply); a JSONL file or a `datasets` source (`[data]` extra).
            val_file: evaluation prompts, in the same forms; default: the task's `val`.
            batch_size: prompts per rollout (per rank under DDP); each gets `samples_per_prompt` completions.
            eval_batch_size: prompts per batch of greedy evaluation.
            max_train_prompts: use the first N training prompts only (None: all).
            max_val_prompts: evaluate on the first N `val` prompts only (None: all).
            num_workers: DataLoader workers.
            seed: seed of the stream that `draw_prompts` takes extra `train` prompts from.
            split, val_split: the split of a `datasets` source read for `train_file` and `val_file`.
            fields: record fields -> the source's column names, e.g. {"prompt": "question"} (`datasets` sources).
            shuffle_seed: shuffle a `datasets` source's rows with this seed (None: its order).
            tokenizer, max_length: the module's, linked by `rlhf fit` (see `TokenizedDataModule`); here the
                longest prompt that leaves room for the completion.
        """
        super().__init__(tokenizer, max_length)
        check_choice("task", task, TASKS, prefix=DATA)
        check_number("batch_size", batch_size, low=1, integer=True, prefix=DATA)
        check_number("eval_batch_size", eval_batch_size, low=1, integer=True, prefix=DATA)
        check_number("max_train_prompts", max_train_prompts, low=1, integer=True, allow_none="all", prefix=DATA)
        check_number("max_val_prompts", max_val_prompts, low=1, integer=True, allow_none="all", prefix=DATA)
        check_number("num_workers", num_workers, low=0, integer=True, prefix=DATA)
        check_number("seed", seed, low=0, high=SEED_MAX, integer=True, prefix=DATA)
        source_options(split, fields, shuffle_seed)
        source_options(val_split)
        self.save_hyperparameters(ignore=["tokenizer", "max_length"])
        self.stream: PromptStream | None = None
        self._stream_state: dict[str, int] | None = None

    def setup(self, stage: str) -> None:
        tokenizer, context = self.tokenizer_and_length()
        hp = self.hparams
        if stage == "fit":
            records = load_prompts(hp.task, "train", hp.train_file, hp.max_train_prompts, source_options(hp.split, hp.fields, hp.shuffle_seed))
            self.train_set = PromptDataset(tokenizer, records, context)
            self.stream = PromptStream(len(self.train_set), hp.seed)
            if self._stream_state is not None:
                self.stream.load_state_dict(self._stream_state)
        val = load_prompts(hp.task, "val", hp.val_file, hp.max_val_prompts, source_options(hp.val_split, hp.fields, hp.shuffle_seed))
        self.val_set = PromptDataset(tokenizer, val, context)

    def train_dataloader(self) -> DataLoader:
        # drop_last: equal rollouts (and equal ranks under DDP)
        return self.loader(self.train_set, self.hparams.batch_size, shuffle=True, drop_last=len(self.train_set) >= self.hparams.batch_size)

    def eval_dataloader(self) -> DataLoader:
        return self.loader(self.val_set, self.hparams.eval_batch_size)

    def draw_prompts(self, n: int) -> dict:
        """A batch of `n` further `train` prompts for this rank, from the seeded stream (CPU tensors)."""
        if self.stream is None:
            raise RuntimeError("draw_prompts needs setup('fit') first")
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        indices = self.stream.take(n * world)[rank * n : (rank + 1) * n]  # every rank advances the same stream
        return self.train_set.collate([self.train_set[i] for i in indices])

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()  # the rollout batches' order and position
        return {**state, "prompt_stream": self.stream.state_dict()} if self.stream is not None else state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        state = state_dict.get("prompt_stream")
        if state is None:
            return
        if self.stream is not None:
            self.stream.load_state_dict(state)
        else:
            self._stream_state = dict(state)
