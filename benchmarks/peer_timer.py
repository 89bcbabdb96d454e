"""A Callback for benchmarks/peer.py: wall times of the training steps inside `Trainer.fit`, written as JSON at the end.

`step_s`: on_train_batch_start -> on_train_batch_end of each step; `interval_s`: one step's start to the
next one's (the whole loop: data, hooks, logging); `first_step_epoch_s`: `time.time()` at the first step;
`completion_len`: each step's logged mean completion length (`rollout/completion_len`, EOS included).
"""

from __future__ import annotations

import json
import time

import torch
from lightning.pytorch.callbacks import Callback


class StepTimer(Callback):
    def __init__(self, out: str, threads: int = 2) -> None:
        self.out, self.threads = out, threads
        self.starts: list[float] = []
        self.steps: list[float] = []
        self.first_step_epoch_s: float | None = None
        self.completion_len: list[float] = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        torch.set_num_threads(self.threads)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.first_step_epoch_s is None:
            self.first_step_epoch_s = time.time()
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append(time.perf_counter() - self.starts[-1])
        length = trainer.callback_metrics.get("rollout/completion_len")
        if length is not None:
            self.completion_len.append(float(length))

    def on_train_end(self, trainer, pl_module) -> None:
        intervals = [b - a for a, b in zip(self.starts, self.starts[1:])]
        with open(self.out, "w") as f:
            json.dump({"step_s": self.steps, "interval_s": intervals, "first_step_epoch_s": self.first_step_epoch_s,
                       "threads": torch.get_num_threads(), "completion_len": self.completion_len}, f)
