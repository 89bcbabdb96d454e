"""The stage's final checkpoint at a fixed path, and the atomic write every checkpoint of the package uses."""

from __future__ import annotations

import contextlib

import lightning as L
from lightning.pytorch.callbacks import Callback

from rlhf_lightning.files import commit, temporary_path


def save_checkpoint_atomically(trainer: L.Trainer, path: str, weights_only: bool = False) -> None:
    """`trainer.save_checkpoint` to a temporary name beside `path` (the same on every rank), renamed over `path` by
    rank 0 (`files.commit`); every rank waits for the rename."""
    tmp = trainer.strategy.broadcast(str(temporary_path(path)))
    trainer.save_checkpoint(tmp, weights_only)
    if trainer.is_global_zero:
        commit(tmp, path)
    trainer.strategy.barrier("checkpoint_written")


class FinalCheckpoint(Callback):
    """Write the stage's checkpoint to a fixed path at the end of training (e.g. `checkpoints/toy/sft.ckpt`).

    Written under a temporary name in the same folder and renamed, so a crash never leaves a truncated
    file under the final name and a rerun overwrites the previous file (no `-v1` suffix).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._written = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._written = False

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Resumed from a last.ckpt of the final step (killed before this file was written), Lightning has nothing
        # left to train and skips the training loop, `on_train_end` included: the checkpoint is written here.
        if not self._written and trainer.global_step > 0:
            self.on_train_end(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted:  # Ctrl-C: keep the previous final checkpoint
            return
        self._written = True
        finalize = getattr(pl_module, "finalize_policy", None)
        if callable(finalize):  # e.g. PPO: the final evaluation, then the best policy on `val`
            finalize()
        # a sharded strategy (`strategy.ShardedStrategy`) gathers this one whole: a file read with no process group
        with getattr(trainer.strategy, "full_checkpoint", contextlib.nullcontext)():
            save_checkpoint_atomically(trainer, self.path)
