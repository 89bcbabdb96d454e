"""`last.ckpt` for exact resume: written once a step is complete, atomically, with the RNG states, on signals too."""

from __future__ import annotations

import random
import signal
from pathlib import Path
from typing import Any
from weakref import proxy

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from rlhf_lightning.callbacks.final_checkpoint import save_checkpoint_atomically
from rlhf_lightning.callbacks.lightning_internals import as_written_after_the_step, uncount_step
from rlhf_lightning.callbacks.signals import StopRequest, exit_status
from rlhf_lightning.distributed import own_entry, per_rank


def random_states() -> dict[str, Any]:
    """This process's torch, Python and CUDA random generator states."""
    return {
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


class ResumeCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` for exact resume: `last.ckpt` written atomically, with the RNG states, on signals too.

    - A checkpoint due at a training step is written once that step is complete: trained, its metrics logged,
      validation (if due) run, the LR schedulers stepped. That is in the next batch's `on_train_batch_start`, the
      first hook Lightning calls after a step (saved as of the step's end), or at the epoch's end for its last
      step. A kill at any point then loses nothing the checkpoint claims: a resumed run continues with the next
      step and logs each step exactly once.
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
        self._stop = StopRequest()
        self._pending: list[str] = []  # checkpoints due at the current step, written when the step is complete
        self._in_batch_end = False
        self._step_ended = False  # a training step ended and its checkpoints are not written yet
        self._after_step = False  # writing at the end of a complete step
        self._validated_after: int | None = None  # training batches completed when validation last ran

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if self._in_batch_end:
            self._pending.append(filepath)  # the step is not complete yet: written by `_write_due`
        else:
            self._write(trainer, filepath)

    def _write(self, trainer: L.Trainer, filepath: str) -> None:
        save_checkpoint_atomically(trainer, filepath, self.save_weights_only)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        rngs = random_states()
        checkpoint["resume"] = {
            **rngs,  # rank 0's, as a one-process run reads them
            "logger_version": trainer.logger.version if trainer.logger is not None else None,
        }
        if trainer.world_size > 1:  # ranks draw apart (dropout over rows of other lengths): each resumes its own
            checkpoint["resume"]["per_rank_rng"] = per_rank(rngs)
        if self._after_step:
            as_written_after_the_step(checkpoint)  # written in the next batch's first hook: as of this step's end
            # Written after this step's validation and after Lightning counted the step for its loggers: a run
            # resumed here skips that validation as done and counts the step again, so it is saved uncounted.
            validated = self._validated_after == trainer.fit_loop.epoch_loop.batch_progress.total.completed
            if validated and uncount_step(checkpoint):
                checkpoint["resume"]["uncounted_step"] = True  # its logging step is still this step's
        super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Restored before the fit loop starts: the first thing to draw from them is the resumed epoch's shuffle
        # or the next training step, as in the uninterrupted run.
        state = checkpoint.get("resume")
        if state:
            state = own_entry(state.get("per_rank_rng")) or state  # this rank's (rank 0's in older checkpoints)
            torch.set_rng_state(state["torch_rng"])
            random.setstate(state["python_rng"])
            if state["cuda_rng"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda_rng"])
        super().on_load_checkpoint(trainer, pl_module, checkpoint)

    # ------------------------------------------------------------------ the end of a step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.dirpath and trainer.is_global_zero:  # temporary files of killed runs
            for stale in Path(self.dirpath).glob(f".{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}.*.tmp"):
                stale.unlink(missing_ok=True)
        self._stop.install()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._in_batch_end = True
        try:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        finally:
            self._in_batch_end = False
        self._step_ended = True

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not trainer.sanity_checking:
            self._validated_after = trainer.fit_loop.epoch_loop.batch_progress.total.completed

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        # Lightning has no callback hook after a step's metrics are logged and its validation run: the first one
        # after that is the next batch's start (an epoch's last step ends in `on_train_epoch_end`)
        if self._step_ended:
            self._finish_step(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._finish_step(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        # SIGTERM: Lightning raises SIGTERMException once the step in progress is complete (or during validation,
        # which leaves no complete step to write)
        if not isinstance(exception, SIGTERMException) or trainer.validating or trainer.sanity_checking:
            return
        if self._write_due(trainer) is not None:
            self._stopped(trainer, signal.SIGTERM)
            exception.code = exit_status(signal.SIGTERM)  # the exception Lightning raises on after its teardown

    def _finish_step(self, trainer: L.Trainer) -> None:
        """Write the checkpoints due, then stop if a signal asked to (with a last.ckpt of this point)."""
        self._step_ended = False
        signum = self._write_due(trainer)
        if signum is not None:
            self._stopped(trainer, signum)
            raise SystemExit(exit_status(signum))

    def _write_due(self, trainer: L.Trainer) -> int | None:
        """Write the checkpoints due at the step just completed, and last.ckpt if a signal asks to stop; the signal."""
        self._after_step = True
        try:
            pending, self._pending = self._pending, []
            for filepath in pending:
                self._write(trainer, filepath)
            signum = self._stop.signum(trainer)
            if signum is not None and (self._last_global_step_saved != trainer.global_step or not self.last_model_path):
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            return signum
        finally:
            self._after_step = False

    def _stopped(self, trainer: L.Trainer, signum: int) -> None:
        rank_zero_info(f"stopped by {signal.Signals(signum).name} at step {trainer.global_step}: {self.last_model_path}; resume with --ckpt_path last")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._stop.uninstall()
        self._pending.clear()
        self._step_ended = False
        self._validated_after = None
