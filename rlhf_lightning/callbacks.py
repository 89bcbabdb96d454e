"""Callbacks and logging helpers shared by the stages."""

from __future__ import annotations

import random
import signal
import threading
import time
from pathlib import Path
from typing import Any
from weakref import proxy

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar
from lightning.pytorch.utilities import rank_zero_info

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
        save_checkpoint_atomically(trainer, self.path)


class ResumeCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` for exact resume: `last.ckpt` written atomically, with the RNG states, on signals too.

    - A checkpoint due at a training step is written once that step is complete: trained, its metrics logged
      and flushed, validation (if due) run, the LR scheduler stepped. A kill at any point then loses nothing
      the checkpoint claims: a resumed run continues with the next step and logs each step exactly once.
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
        self._pending: list[str] = []  # checkpoints due at the current step, written when the step is complete
        self._in_batch_end = False
        self._after_step = False
        self._step_end_hook: tuple[Any, Any] | None = None

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if self._in_batch_end and self._step_end_hook is not None:
            self._pending.append(filepath)  # the step's metrics are not logged yet: see `_on_step_complete`
        else:
            self._write(trainer, filepath)

    def _write(self, trainer: L.Trainer, filepath: str) -> None:
        save_checkpoint_atomically(trainer, filepath, self.save_weights_only)
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
        if self._after_step and self._val_checked_at_this_step(trainer):
            # Written after this step's validation and after Lightning counted the step for its loggers; a run
            # resumed here skips that validation as done and counts the step again, so it is saved uncounted.
            loop = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict")
            if loop is not None and "_batches_that_stepped" in loop:
                loop["_batches_that_stepped"] -= 1
                checkpoint["resume"]["uncounted_step"] = True  # its logging step is still this step's
        super().on_save_checkpoint(trainer, pl_module, checkpoint)

    @staticmethod
    def _val_checked_at_this_step(trainer: L.Trainer) -> bool:
        loop = trainer.fit_loop.epoch_loop
        return bool(loop._should_check_val_fx(trainer.fit_loop._data_fetcher)) if trainer.fit_loop._data_fetcher is not None else False

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

    # ------------------------------------------------------------------ the end of a step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.dirpath and trainer.is_global_zero:  # temporary files of killed runs
            for stale in Path(self.dirpath).glob(f".{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}.*.tmp"):
                stale.unlink(missing_ok=True)
        if threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)
        # Lightning has no callback hook after a step's metrics are logged: the last thing its training loop
        # does for a step is flushing the loggers, and the checkpoint is written right after that.
        loop = trainer.fit_loop.epoch_loop
        flush = getattr(loop, "_save_loggers_on_train_batch_end", None)
        if callable(flush):

            def flush_then_checkpoint() -> None:
                flush()
                self._on_step_complete(trainer)

            self._step_end_hook = (loop, flush)
            loop._save_loggers_on_train_batch_end = flush_then_checkpoint

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._in_batch_end = True
        try:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        finally:
            self._in_batch_end = False
        if self._step_end_hook is None:
            self._write_pending(trainer)

    def _on_step_complete(self, trainer: L.Trainer) -> None:
        progress = trainer.fit_loop.epoch_loop.batch_progress
        if progress.is_last_batch or progress.current.completed >= trainer.num_training_batches:
            return  # the epoch's last step: written at the epoch's end, the point Lightning resumes from
        self._write_pending(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._write_pending(trainer)

    def _write_pending(self, trainer: L.Trainer) -> None:
        """Write the checkpoints due, then stop if a signal asked to (with a last.ckpt of this point)."""
        self._after_step = self._step_end_hook is not None
        try:
            pending, self._pending = self._pending, []
            for filepath in pending:
                self._write(trainer, filepath)
            signum = signal.SIGTERM if trainer.received_sigterm else self._stop_signal
            if signum is None:
                return
            if self._last_global_step_saved != trainer.global_step or not self.last_model_path:
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        finally:
            self._after_step = False
        rank_zero_info(f"stopped by {signal.Signals(signum).name} at step {trainer.global_step}: {self.last_model_path}; resume with --ckpt_path last")
        raise SystemExit(128 + signum)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._stop_signal is not None:
            raise KeyboardInterrupt
        self._stop_signal = signum
        rank_zero_info("Ctrl-C: stopping after this step with a last.ckpt (Ctrl-C again: stop now, without it)")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None
        if self._step_end_hook is not None:
            loop, flush = self._step_end_hook
            loop._save_loggers_on_train_batch_end = flush
            self._step_end_hook = None
        self._stop_signal = None
        self._pending.clear()


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


class SteadyRichProgressBar(RichProgressBar):
    """Lightning's Rich progress bar, updated from training batches at most every `min_interval` seconds (and at
    an epoch's last batch). Rich's update of the bar and its metrics costs about 0.4 ms a batch: 2-3% of a toy
    SFT step on CPU, for redraws no one can read. `rlhf fit` uses it where Lightning would use its own."""

    def __init__(self, *args: Any, min_interval: float = 0.1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.min_interval = min_interval
        self._last_update = float("-inf")

    def due(self, batch_idx: int) -> bool:
        """Whether the bar redraws after this training batch (`log_step_metrics` reads the bar's values back from
        the device only then)."""
        return time.monotonic() - self._last_update >= self.min_interval or batch_idx + 1 == self.total_train_batches

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.due(batch_idx):
            return
        self._last_update = time.monotonic()
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the count reached, whatever ended the epoch (max_steps, an iterable dataset without a length)
        self._update(self.train_progress_bar_id, trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        super().on_train_epoch_end(trainer, pl_module)


def steady_progress_bar(trainer: L.Trainer) -> None:
    """Swap the Rich bar Lightning chose by default (exactly `RichProgressBar`, default settings) for the steady one."""
    for i, callback in enumerate(trainer.callbacks):
        if type(callback) is RichProgressBar and callback._refresh_rate == 100 and not callback._leave:
            trainer.callbacks[i] = SteadyRichProgressBar(theme=callback.theme, console_kwargs=callback._console_kwargs)


def memory_estimate(pl_module: L.LightningModule) -> str:
    """What the stage holds in weights and training state before activations: parameters (trainable and
    frozen), their gradients, AdamW's two float32 moments per trainable parameter, and frozen models outside the
    models (`pl_module.frozen_models()`, e.g. PPO's reference and reward model), counted once."""

    def mb(n: float) -> str:
        for unit in ("B", "KB", "MB"):
            if n < 1024:
                return f"{n:,.1f} {unit}"
            n /= 1024
        return f"{n:,.1f} GB"

    frozen_models = pl_module.frozen_models() if hasattr(pl_module, "frozen_models") else []
    frozen_params = {id(p): p for m in frozen_models for p in m.parameters()}
    params = [p for p in pl_module.parameters() if id(p) not in frozen_params]
    trainable = [p for p in params if p.requires_grad]
    frozen = sum(p.numel() * p.element_size() for p in frozen_params.values())
    weights = sum(p.numel() * p.element_size() for p in params)
    grads = sum(p.numel() * p.element_size() for p in trainable)
    optimizer = sum(2 * p.numel() * 4 for p in trainable)
    return (
        f"memory before activations: parameters {mb(weights)} ({sum(p.numel() for p in trainable):,} trainable of "
        f"{sum(p.numel() for p in params):,}), gradients {mb(grads)}, optimizer state {mb(optimizer)}, frozen models {mb(frozen)}"
    )


def logging_step(module: L.LightningModule) -> int:
    """The x of what `module.log` logs now: Lightning's count of stepped batches (PPO: rollouts), which a
    resumed run continues; `global_step` counts optimizer steps (several per PPO rollout)."""
    if module._trainer is None:
        return module.global_step
    return module.trainer.fit_loop.epoch_loop._batches_that_stepped


def log_step_metrics(
    module: L.LightningModule,
    metrics: dict[str, torch.Tensor | float],
    mean_over_ranks: bool = False,
    prog_bar: dict[str, str] | None = None,
) -> None:
    """One training step's scalars, as `module.log(name, value)` from `training_step` handles them (the same
    TensorBoard tags, steps and values, `trainer.callback_metrics` and `trainer.logged_metrics`), for a fraction
    of the cost. The module's `on_train_batch_end` calls `write_step_metrics` for the loggers' part.

    `LightningModule.log` rebuilds its result entry at each call: about 0.4 ms a metric on CPU, 6 ms of a 24 ms
    PPO step for its 16 metrics. Here the values are stacked on the device (averaged over ranks in one
    all-reduce with `mean_over_ranks`; without it, each rank keeps its own, as `self.log` without `sync_dist`)
    and read back to the host once, only when something shows them: a logger write, or a progress bar that
    shows `prog_bar` ({label on the bar: metric name}; the labels also go to `callback_metrics`).
    """
    if module._trainer is None or not metrics:
        return
    trainer = module.trainer
    names = list(metrics)
    values = torch.stack([torch.as_tensor(v, dtype=torch.float32).to(module.device) for v in metrics.values()])  # (M,)
    if mean_over_ranks and trainer.world_size > 1:
        values = trainer.strategy.reduce(values, reduce_op="mean")
    by_name = dict(zip(names, values.unbind()))
    trainer.callback_metrics.update(by_name)
    trainer.logged_metrics.update(by_name)  # Lightning's view holds the latest values whether or not written
    if prog_bar:
        trainer.callback_metrics.update({label: by_name[name] for label, name in prog_bar.items()})
        bar = trainer.progress_bar_callback
        if bar is not None and (not isinstance(bar, SteadyRichProgressBar) or bar.due(trainer.fit_loop.epoch_loop.batch_idx)):
            shown = torch.stack([by_name[name] for name in prog_bar.values()]).tolist()  # one read, when the bar draws
            trainer.progress_bar_metrics.update(zip(prog_bar, shown))
    module._step_metrics = (names, values)


def write_step_metrics(module: L.LightningModule) -> None:
    """Write what `log_step_metrics` kept for this step to the loggers when Lightning writes its own: from the
    module's `on_train_batch_end` (after the callbacks', which may stop training: a `max_time` Timer), at
    Lightning's step, every `log_every_n_steps` steps and at the step where training stops, never while
    gradients accumulate."""
    kept = getattr(module, "_step_metrics", None)
    module._step_metrics = None
    if kept is None or module._trainer is None:
        return
    trainer = module.trainer
    n = trainer.log_every_n_steps
    step = logging_step(module)  # Lightning writes the step's metrics before it counts the step
    accumulating = module.automatic_optimization and trainer.fit_loop._should_accumulate()
    if not trainer.loggers or n == 0 or accumulating or ((step + 1) % n and not trainer.should_stop):
        return
    names, values = kept
    host = dict(zip(names, values.tolist()))  # the one read back to the host
    for logger in trainer.loggers:
        _log_scalars(logger, {**host, "epoch": trainer.current_epoch}, step, trainer.is_global_zero)


def _log_scalars(logger: Any, metrics: dict[str, float], step: int, global_zero: bool) -> None:
    """`logger.log_metrics(metrics, step)`, except for Lightning's TensorBoard logger: one event holding every
    scalar, where `add_scalar` writes one event per scalar (about 60 us each on CPU; 0.8 ms of a 16 ms peer PPO
    step). TensorBoard reads the same tags, steps and values."""
    from lightning.pytorch.loggers import TensorBoardLogger

    writer = getattr(logger.experiment, "_get_file_writer", None) if type(logger) is TensorBoardLogger and not logger._prefix else None
    if writer is None:  # any other logger, a subclass, or a tag prefix: the logger's own path
        logger.log_metrics(metrics, step=step)
        return
    if not global_zero:  # as Lightning's `log_metrics`, rank zero only
        return
    from tensorboard.compat.proto.summary_pb2 import Summary

    writer().add_summary(Summary(value=[Summary.Value(tag=k, simple_value=float(v)) for k, v in metrics.items()]), step)


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
