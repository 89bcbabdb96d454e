"""Callbacks and logging helpers shared by the stages."""

from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.callbacks import Callback

from rlhf_lightning.checkpoints import temporary_path


class FinalCheckpoint(Callback):
    """Write the stage's checkpoint to a fixed path at the end of training (e.g. `checkpoints/toy/sft.ckpt`).

    Written under a temporary name in the same folder and renamed, so a crash never leaves a truncated
    file under the final name and a rerun overwrites the previous file (no `-v1` suffix).
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted:  # Ctrl-C: keep the previous final checkpoint
            return
        tmp = trainer.strategy.broadcast(str(temporary_path(self.path)))
        trainer.save_checkpoint(tmp, weights_only=False)
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
        trainer.strategy.barrier("final_checkpoint")


def log_samples(module: L.LightningModule, tag: str, prompts: list[str], completions: list[str], golds: list[str | None], limit: int = 8) -> None:
    """A few prompt/completion/gold rows as a Markdown table in TensorBoard's Text tab."""
    logger = module.logger
    experiment = getattr(logger, "experiment", None) if logger is not None else None
    if experiment is None or not hasattr(experiment, "add_text") or limit <= 0:
        return

    def cell(text: str | None) -> str:
        return "" if text is None else text.replace("\n", "\\n").replace("|", "\\|")

    rows = ["| prompt | completion | gold |", "| --- | --- | --- |"]
    rows += [f"| {cell(p)} | {cell(c)} | {cell(g)} |" for p, c, g in list(zip(prompts, completions, golds))[:limit]]
    experiment.add_text(tag, "\n".join(rows), global_step=module.global_step)
