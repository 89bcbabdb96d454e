"""What every stage's DataModule shares: the tokenizer and length limit it is given, and resumable loaders."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

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

    @property
    def epoch_seed(self) -> int | None:
        """The seed of the epoch being iterated (None before the first), as `resume` takes it."""
        return self.seed

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


class ResumableDistributedSampler(DistributedSampler):
    """One rank's share of a resumable order under several processes, resumable mid-epoch.

    The epoch's order is `order.epoch_order` (a permutation, or the stratum-weighted draw) from a generator seeded
    with `seed + epoch`, as torch's `DistributedSampler` seeds its permutation (Lightning's `set_epoch` sets the
    epoch); it is padded to a multiple of the ranks and dealt out as `DistributedSampler` does (rank r takes
    positions r, r + W, ...). With `ResumableRandomSampler`'s order this is exactly the order of the
    `DistributedSampler` Lightning would put in (`seed`: `PL_GLOBAL_SEED`), and being one, Lightning leaves it in
    place. Nothing is drawn from torch's global RNG, whose state may differ between the ranks.
    `resume(seed, start)` makes the next iteration continue the epoch of `seed` at position `start` of this
    rank's share: global batch k covers the same positions k * batch_size ... on every rank.

    >>> ranks = [list(ResumableDistributedSampler(range(5), ResumableRandomSampler(5), num_replicas=2, rank=r)) for r in (0, 1)]
    >>> ranks == [list(DistributedSampler(range(5), num_replicas=2, rank=r, seed=0)) for r in (0, 1)]
    True
    """

    def __init__(self, dataset: Dataset, order: ResumableRandomSampler, num_replicas: int, rank: int, seed: int = 0) -> None:
        if len(order) != len(dataset):
            raise ValueError(f"the order draws {len(order)} indices an epoch for a dataset of {len(dataset)}")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.order = order
        self.epoch_seed: int | None = None  # of the epoch being iterated
        self._resume: tuple[int, int] | None = None

    def resume(self, seed: int, start: int) -> None:
        self._resume = (seed, start)

    def __iter__(self) -> Iterator[int]:
        if self._resume is not None:
            (self.epoch_seed, start), self._resume = self._resume, None
        else:
            self.epoch_seed, start = self.seed + self.epoch, 0
        indices = self.order.epoch_order(torch.Generator().manual_seed(self.epoch_seed)).tolist()  # (N,)
        padding = self.total_size - len(indices)  # repeat the first indices: every rank gets num_samples
        indices += (indices * -(-padding // len(indices)))[:padding]
        yield from indices[self.rank : self.total_size : self.num_replicas][start:]


class TokenizedDataModule(L.LightningDataModule):
    """The tokenizer belongs to the LightningModule (it travels inside the checkpoint). A DataModule is given it,
    and the longest sequence the module takes, as the constructor arguments `tokenizer` and `max_length`
    (`rlhf fit` links them from `model.tokenizer` and `model.data_max_length`); they are not hyperparameters.

    The training order is resumable: `state_dict()` records the epoch's shuffle seed, how many (global) batches
    the training loop has consumed and the number of ranks, and a resumed run's training loader continues there.
    Under several processes (DDP, the sharded strategy) the training loader carries its own
    `ResumableDistributedSampler`; a run resumed with another number of ranks starts its epoch's order over.
    """

    _train_order: ResumableRandomSampler | ResumableDistributedSampler | None = None
    _resume_order: dict[str, int] | None = None
    _train_batch_size: int = 1

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

        The training order, `shuffle=True` or a `ResumableRandomSampler` (such as `StratumWeightedSampler`), is
        the one `state_dict()` records and a resumed run continues; under several processes each rank takes its
        share of it through a `ResumableDistributedSampler`.
        """
        world = 1 if self.trainer is None else self.trainer.world_size
        ranks = self.trainer.distributed_sampler_kwargs if world > 1 else None  # {"num_replicas", "rank"}
        resumable = world == 1 or ranks is not None
        if shuffle and sampler is None and resumable:
            sampler, shuffle = ResumableRandomSampler(len(dataset)), False
        generator = None
        if isinstance(sampler, ResumableRandomSampler) and resumable:
            if ranks is not None:  # the seed Lightning's own DistributedSampler would take
                sampler = ResumableDistributedSampler(dataset, sampler, seed=int(os.environ.get("PL_GLOBAL_SEED", 0)), **ranks)
            generator = torch.Generator()  # the workers' base seed, so that iterating draws nothing from the global RNG
            self._train_order, self._train_batch_size = sampler, batch_size
            self._continue_order()
        return DataLoader(
            dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, drop_last=drop_last, collate_fn=dataset.collate,
            num_workers=self.hparams.get("num_workers", 0) if shuffle or sampler is not None else 0, generator=generator,
        )

    def state_dict(self) -> dict[str, Any]:
        """{"train_order": {"seed", "batches", "ranks"}} mid-epoch, {"train_order": None} at an epoch's end.

        `batches` counts global batches: each rank's loader has consumed as many of its share."""
        if self._train_order is None or self.trainer is None:
            return {}
        # batches whose training step ran; the loader itself is one batch ahead (Lightning prefetches one)
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if self._train_order.epoch_seed is None or done >= self.trainer.num_training_batches:
            return {"train_order": None}
        return {"train_order": {"seed": self._train_order.epoch_seed, "batches": done, "ranks": self.trainer.world_size}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_order = state_dict.get("train_order")
        # The sharded strategy restores checkpoints after the optimizers are configured, and a schedule's total
        # steps (`trainer.estimated_stepping_batches`) may have built the training loader by then: continue its order.
        self._continue_order()

    def _continue_order(self) -> None:
        """Make the training loader's next iteration continue the recorded order, once both exist (a loader
        already iterated, of an earlier fit, is left alone: the order waits for the next one built)."""
        if self._train_order is None or self._train_order.epoch_seed is not None or self._resume_order is None:
            return
        resume, self._resume_order = self._resume_order, None
        world = 1 if self.trainer is None else self.trainer.world_size
        if resume.get("ranks", 1) != world:
            rank_zero_warn(f"the training order was recorded by {resume.get('ranks', 1)} processes and this run has {world}: "
                           "the resumed epoch's order starts over")
            return
        self._train_order.resume(resume["seed"], resume["batches"] * self._train_batch_size)
