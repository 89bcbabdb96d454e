"""What every stage's DataModule shares: the tokenizer and length limit it is given, and resumable loaders."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from rlhf_lightning.tokenizer import Tokenizer


class ResumableRandomSampler(Sampler[int]):
    """`RandomSampler`'s order that can continue mid-epoch: a permutation per epoch from a seed, resumable at a position.

    Each epoch's seed is drawn from torch's global RNG when the epoch's iteration starts, with the same two draws
    a `DataLoader(shuffle=True)` makes (its workers' base seed, then its sampler's seed), so runs shuffle exactly
    as they did with `shuffle=True`. `resume(seed, start)` makes the next iteration continue the permutation of
    `seed` at index `start`, drawing nothing.
    """

    def __init__(self, num_samples: int) -> None:
        self.num_samples = num_samples
        self.seed: int | None = None  # of the epoch being iterated
        self._resume: tuple[int, int] | None = None

    def __len__(self) -> int:
        return self.num_samples

    def resume(self, seed: int, start: int) -> None:
        self._resume = (seed, start)

    def __iter__(self) -> Iterator[int]:
        if self._resume is not None:
            (self.seed, start), self._resume = self._resume, None
        else:
            self.seed, start = self.draw_epoch_seed(), 0
        yield from self.epoch_order(torch.Generator().manual_seed(self.seed))[start:].tolist()

    def draw_epoch_seed(self) -> int:
        """A new epoch's seed from torch's global RNG."""
        torch.empty((), dtype=torch.int64).random_()  # the draw DataLoader makes for its workers' base seed
        return int(torch.empty((), dtype=torch.int64).random_().item())

    def epoch_order(self, generator: torch.Generator) -> torch.Tensor:
        """The epoch's indices (N,), drawn with `generator` only."""
        return torch.randperm(self.num_samples, generator=generator)


class TokenizedDataModule(L.LightningDataModule):
    """The tokenizer belongs to the LightningModule (it travels inside the checkpoint). A DataModule is given it,
    and the longest sequence the module takes, as the constructor arguments `tokenizer` and `max_length`
    (`rlhf fit` links them from `model.tokenizer` and `model.data_max_length`); they are not hyperparameters.

    The training order is resumable: `state_dict()` records the epoch's shuffle seed and how many batches the
    training loop has consumed, and a resumed run's training loader continues there (one process only; under
    DDP Lightning's distributed sampler shuffles and a resumed run starts its epoch over).
    """

    _train_order: ResumableRandomSampler | None = None
    _resume_order: dict[str, int] | None = None

    def __init__(self, tokenizer: Tokenizer | None = None, max_length: int | None = None) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.max_length = max_length

    def tokenizer_and_length(self) -> tuple[Tokenizer, int]:
        """(tokenizer, longest sequence) given to the constructor; a clear error when no tokenizer was."""
        if self.tokenizer is None:
            raise RuntimeError(
                f"{type(self).__name__} needs the module's tokenizer: pass tokenizer= (and max_length=), as `rlhf fit` does"
            )
        return self.tokenizer, self.max_length or (1 << 30)

    def loader(self, dataset: Dataset, batch_size: int, shuffle: bool = False, drop_last: bool = False, sampler: Sampler | None = None) -> DataLoader:
        """Batches of `dataset` through its own `collate`.

        The training order, `shuffle=True` or a `sampler` with `ResumableRandomSampler`'s `seed` and
        `resume(seed, start)`, is the one `state_dict()` records and a resumed run continues.
        """
        single = self.trainer is None or self.trainer.world_size == 1
        if shuffle and sampler is None and single:
            sampler, shuffle = ResumableRandomSampler(len(dataset)), False
        generator = None
        if sampler is not None and hasattr(sampler, "resume") and single:
            generator = torch.Generator()  # the workers' base seed, so that iterating draws nothing from the global RNG
            self._train_order = sampler
            if self._resume_order is not None:
                sampler.resume(self._resume_order["seed"], self._resume_order["batches"] * batch_size)
                self._resume_order = None
        return DataLoader(
            dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, drop_last=drop_last, collate_fn=dataset.collate,
            num_workers=self.hparams.get("num_workers", 0) if shuffle or sampler is not None else 0, generator=generator,
        )

    def state_dict(self) -> dict[str, Any]:
        """{"train_order": {"seed", "batches"}} mid-epoch, {"train_order": None} at an epoch's end."""
        if self._train_order is None or self.trainer is None:
            return {}
        # batches whose training step ran; the loader itself is one batch ahead (Lightning prefetches one)
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if self._train_order.seed is None or done >= self.trainer.num_training_batches:
            return {"train_order": None}
        return {"train_order": {"seed": self._train_order.seed, "batches": done}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_order = state_dict.get("train_order")
