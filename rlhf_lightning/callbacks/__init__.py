"""Callbacks and logging helpers shared by the stages, one job a module; every name is importable from here (and
configs name the callbacks as `rlhf_lightning.callbacks.ResumeCheckpoint`, `rlhf_lightning.callbacks.FinalCheckpoint`).

- `final_checkpoint`: the stage's checkpoint at a fixed path; the atomic write of every checkpoint.
- `resume_checkpoint`: `last.ckpt` for exact resume, written once a step is complete, on signals too (`signals`).
- `stage_log`, `memory`: a log line per phase of a stage, with the memory a stage holds before activations.
- `progress_bar`: Lightning's Rich bar, redrawn at most every 0.1 s.
- `step_metrics`: a step's scalars, kept on the device and written at Lightning's steps and cadence.
- `samples`: sample completions as a table in TensorBoard's Text tab.
- `lightning_internals`: every use of Lightning's private state, each with a test (tests/test_lightning_internals.py).
"""

from rlhf_lightning.callbacks.final_checkpoint import FinalCheckpoint, save_checkpoint_atomically
from rlhf_lightning.callbacks.memory import memory_estimate
from rlhf_lightning.callbacks.progress_bar import SteadyRichProgressBar, steady_progress_bar
from rlhf_lightning.callbacks.resume_checkpoint import ResumeCheckpoint
from rlhf_lightning.callbacks.samples import log_samples
from rlhf_lightning.callbacks.stage_log import StageLog
from rlhf_lightning.callbacks.step_metrics import attached_trainer, log_step_metrics, logging_step, write_step_metrics

__all__ = [
    "FinalCheckpoint", "ResumeCheckpoint", "StageLog", "SteadyRichProgressBar", "attached_trainer", "log_samples", "log_step_metrics",
    "logging_step", "memory_estimate", "save_checkpoint_atomically", "steady_progress_bar", "write_step_metrics",
]
