"""One log line per phase of a stage: training (or resuming), and each evaluation on `val`."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from rlhf_lightning.callbacks.memory import memory_estimate


class StageLog(Callback):
    """One line per phase of a stage: training (or resuming), and each evaluation on `val`.

    The `rlhf` command adds it to every `fit`; sampling preference pairs says so in its DataModule.
    """

    @staticmethod
    def stage(pl_module: L.LightningModule) -> str:
        return type(pl_module).__name__.lower().removesuffix("module")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        resumed = f", resumed at step {trainer.global_step}" if trainer.ckpt_path else ""
        rank_zero_info(f"[{self.stage(pl_module)}] {memory_estimate(pl_module)}")
        rank_zero_info(f"[{self.stage(pl_module)}] training: {trainer.estimated_stepping_batches} batches{resumed}")

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            rank_zero_info(f"[{self.stage(pl_module)}] evaluating on val at step {trainer.global_step}")
