"""Every use of PyTorch Lightning's private state in this project, each a small function.

Lightning (2.6) offers no public route to these; each docstring says what it relies on and why no public API
does it. `tests/test_lightning_internals.py` checks each behaviour relied on against the installed Lightning, so
an upgrade that changes one fails there, by name, instead of somewhere inside a resumed run. Everything else in
the package uses Lightning's public API, except the protected members two subclasses override or call as
documented extension points of their base classes (`ModelCheckpoint._save_checkpoint`, `_save_last_checkpoint`,
`_monitor_candidates`, `_last_global_step_saved` in `resume_checkpoint.ResumeCheckpoint`; `RichProgressBar._update`
in `progress_bar.SteadyRichProgressBar`), which that test file checks as well.

The logging step. Lightning's loggers put a training step's metrics at its count of training batches that stepped
an optimizer (`fit_loop.epoch_loop._batches_that_stepped`), not at `trainer.global_step`, which counts optimizer
steps (several per PPO rollout). A checkpoint records the count; a resumed run continues it.
"""

from __future__ import annotations

from typing import Any

import lightning as L


def batches_that_stepped(trainer: L.Trainer) -> int:
    """The step at which Lightning's loggers put what is logged now: its count of training batches that stepped.

    Relies on `trainer.fit_loop.epoch_loop._batches_that_stepped`, the value Lightning's own logger connector,
    `LearningRateMonitor` and `DeviceStatsMonitor` pass to `logger.log_metrics(step=...)`; it is one behind during
    a batch, counted at the batch's end. No public property holds it: `trainer.global_step` counts optimizer steps
    (several per PPO rollout, and already counted in the batch's `on_train_batch_end`). Metrics written outside
    `self.log` must use it to land at the same step as those Lightning writes (`eval/*` from validation).
    """
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def _fit_loop_state(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    return checkpoint.get("loops", {}).get("fit_loop")


def as_written_after_the_step(checkpoint: dict[str, Any]) -> None:
    """Make a checkpoint written in the next batch's `on_train_batch_start` the one written at the end of the step
    before it: the batch being started is not counted as fetched.

    Lightning calls no hook between the end of a step (after its validation, its LR schedulers, its loggers'
    flush, its count in the logging step) and the next batch; the first one after is that batch's
    `on_train_batch_start`, once the batch is fetched and counted `ready` in the fit loop's batch progress. The
    batch has not started, read nothing from the RNGs and is not in the DataModule's position (which counts
    `processed` batches), so the checkpoint is the end of the step but for that count.

    Relies on the fit loop's state in the checkpoint (`checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]`:
    `total` and `current` counters `ready`/`started`/`processed`/`completed`, and `is_last_batch`) and on Lightning's
    restore: with every counter equal it resumes after a complete step (`RESTARTED_ON_LAST`), as from a checkpoint
    written at the end of an epoch; with `ready` one ahead it would count the step again in the logging step.
    No-op when no batch is ready beyond the started ones.
    """
    loop = _fit_loop_state(checkpoint)
    progress = loop.get("epoch_loop.batch_progress") if loop is not None else None
    if progress is None or progress["total"]["ready"] == progress["total"]["started"]:
        return
    for counts in (progress["total"], progress["current"]):
        counts["ready"] = counts["started"]
    progress["is_last_batch"] = False  # the epoch went on after the step: its batch was not the last


def uncount_step(checkpoint: dict[str, Any]) -> bool:
    """Save the last step uncounted in the logging step, for a checkpoint written after that step's validation.

    Lightning resumed from a checkpoint written after a complete step at which validation was due skips that
    validation as done, in a loop iteration that trains nothing but counts a step for the loggers again
    (`_skip_next_val`); saved one lower, the resumed run's logging step continues where the run left it.
    Relies on `checkpoint["loops"]["fit_loop"]["epoch_loop.state_dict"]["_batches_that_stepped"]`, the count
    `batches_that_stepped` reads, as Lightning saves and restores it. No public route sets it. Returns whether the
    checkpoint held the count (a checkpoint without the fit loop's state, `weights_only`, is left as it is).
    """
    loop = _fit_loop_state(checkpoint)
    state = loop.get("epoch_loop.state_dict") if loop is not None else None
    if state is None or "_batches_that_stepped" not in state:
        return False
    state["_batches_that_stepped"] -= 1
    return True


def first_logged_step(checkpoint: dict[str, Any], uncounted: bool = False) -> int:
    """The logging step of the first batch a run resumed from `checkpoint` trains (TensorBoard's `purge_step`).

    `uncounted`: the checkpoint was saved with `uncount_step`. Relies on the fit loop's saved state, as
    `as_written_after_the_step` and `uncount_step` do: the count `_batches_that_stepped`, plus one for a checkpoint
    written in a batch's `on_train_batch_end` (ModelCheckpoint's own point: the batch is processed, not completed,
    and Lightning counts it when it resumes) or for an uncounted one.
    """
    loop = checkpoint["loops"]["fit_loop"]
    stepped = loop["epoch_loop.state_dict"]["_batches_that_stepped"]
    progress = loop["epoch_loop.batch_progress"]["total"]
    return stepped + int(progress["completed"] == progress["processed"] - 1) + int(uncounted)


def tensorboard_prefix(logger: Any) -> str:
    """The tag prefix a `TensorBoardLogger` puts before metric names (its `prefix=` argument).

    Relies on `TensorBoardLogger._prefix` (no public property holds it). Read only to write a step's scalars as
    one TensorBoard event instead of one per scalar (`step_metrics`), with the tags `log_metrics` would write.
    """
    return logger._prefix


def set_data_parallel_size(strategy: Any, size: int) -> None:
    """Give a `ModelParallelStrategy` its data-parallel size once the world size is known.

    Relies on `ModelParallelStrategy._data_parallel_size`, which its `setup_environment` reads to build the device
    mesh ("auto" there means the number of nodes: one node's processes would all be tensor-parallel). The sharded
    strategy (`strategy.ShardedStrategy`) means "auto" as every process, which is known only after the Trainer gave
    the strategy its devices and nodes; the constructor argument is the only public route and comes too early.
    """
    strategy._data_parallel_size = size
