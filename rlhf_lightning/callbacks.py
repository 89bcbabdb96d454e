"""Callbacks and logging helpers shared by the stages."""

from __future__ import annotations

import os
import random
import signal
import threading
from pathlib import Path
from typing import Any
from weakref import proxy

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from rlhf_lightning.checkpoints import replace_atomically, temporary_path


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
        finalize = getattr(pl_module, "finalize_policy", None)
        if callable(finalize):  # e.g. PPO: the final evaluation, then the best policy on `val`
            finalize()
        tmp = trainer.strategy.broadcast(str(temporary_path(self.path)))
        trainer.save_checkpoint(tmp, weights_only=False)
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
        trainer.strategy.barrier("final_checkpoint")


class ResumeCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` for exact resume: `last.ckpt` written atomically, with the RNG states, on signals too.

    - Every checkpoint is written under a temporary name in the same folder and renamed, so a kill during the
      write leaves the previous file intact (`RLHF_FAULT_KILL_BEFORE_RENAME` tests that, see `checkpoints.py`).
    - Checkpoints carry `checkpoint["resume"]`: torch's global RNG (shuffling, dropout), Python's, CUDA's, and
      the logger's version, so a resumed run draws the same numbers and logs into the same run folder.
    - SIGTERM or Ctrl-C during training: the current step finishes, `last.ckpt` is written, and the process
      exits with 128 + the signal number (a second Ctrl-C stops at once). `--ckpt_path last` resumes it.

    Defaults suit a resume checkpoint: `save_last=True`, `save_top_k=0`, and no `-v1` suffix on a rerun.
    """

    def __init__(self, *args: Any, save_last: bool = True, save_top_k: int = 0, enable_version_counter: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, save_last=save_last, save_top_k=save_top_k, enable_version_counter=enable_version_counter, **kwargs)
        self._stop_signal: int | None = None
        self._previous_sigint = None

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        tmp = trainer.strategy.broadcast(str(temporary_path(filepath)))
        trainer.save_checkpoint(tmp, self.save_weights_only)
        if trainer.is_global_zero:
            replace_atomically(tmp, filepath)
        trainer.strategy.barrier("resume_checkpoint")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint["resume"] = {
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "logger_version": trainer.logger.version if trainer.logger is not None else None,
        }
        super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Restored before the fit loop starts: the first thing to draw from them is the resumed epoch's shuffle
        # or the next training step, as in the uninterrupted run.
        state = checkpoint.get("resume")
        if state:
            torch.set_rng_state(state["torch_rng"])
            random.setstate(state["python_rng"])
            if state["cuda_rng"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda_rng"])
        super().on_load_checkpoint(trainer, pl_module, checkpoint)

    # ------------------------------------------------------------------ signals

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.dirpath and trainer.is_global_zero:  # temporary files of killed runs
            for stale in Path(self.dirpath).glob(f".{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}.*.tmp"):
                stale.unlink(missing_ok=True)
        if threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._stop_signal is not None:
            raise KeyboardInterrupt
        self._stop_signal = signum
        rank_zero_info("Ctrl-C: stopping after this step with a last.ckpt (Ctrl-C again: stop now, without it)")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        signum = signal.SIGTERM if trainer.received_sigterm else self._stop_signal
        if signum is None:
            return
        if self._last_global_step_saved != trainer.global_step or not self.last_model_path:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        rank_zero_info(f"stopped by {signal.Signals(signum).name} at step {trainer.global_step}: {self.last_model_path}; resume with --ckpt_path last")
        raise SystemExit(128 + signum)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None
        self._stop_signal = None


class StageLog(Callback):
    """One line per phase of a stage: training (or resuming), and each evaluation on `val`.

    The `rlhf` command adds it to every `fit`; sampling preference pairs says so in its DataModule.
    """

    @staticmethod
    def stage(pl_module: L.LightningModule) -> str:
        return type(pl_module).__name__.lower().removesuffix("module")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        resumed = f", resumed at step {trainer.global_step}" if trainer.ckpt_path else ""
        rank_zero_info(f"[{self.stage(pl_module)}] training: {trainer.estimated_stepping_batches} batches{resumed}")

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            rank_zero_info(f"[{self.stage(pl_module)}] evaluating on val at step {trainer.global_step}")


def logging_step(module: L.LightningModule) -> int:
    """The x of what `module.log` logs now: Lightning's count of stepped batches (PPO: rollouts), which a
    resumed run continues; `global_step` counts optimizer steps (several per PPO rollout)."""
    if module._trainer is None:
        return module.global_step
    return module.trainer.fit_loop.epoch_loop._batches_that_stepped


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
    experiment.add_text(tag, "\n".join(rows), global_step=logging_step(module))
