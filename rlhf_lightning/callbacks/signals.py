"""Stop requests by signal during training: Ctrl-C (SIGINT) and SIGTERM stop a run after the step in progress."""

from __future__ import annotations

import signal
import threading
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info


class StopRequest:
    """Ctrl-C asks to stop after the step in progress (a second Ctrl-C stops at once: KeyboardInterrupt); SIGTERM
    goes through Lightning's own handler (`trainer.received_sigterm`). `signum(trainer)` says which, if any.

    The SIGINT handler is installed by `install()` (in the main thread only, where Python delivers signals) and the
    previous one put back by `uninstall()`.
    """

    def __init__(self) -> None:
        self.sigint: int | None = None
        self._previous: Any = None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
        self.sigint = None

    def signum(self, trainer: L.Trainer) -> int | None:
        """The signal that asked this run to stop, or None."""
        return signal.SIGTERM if trainer.received_sigterm else self.sigint

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.sigint is not None:
            raise KeyboardInterrupt
        self.sigint = signum
        rank_zero_info("Ctrl-C: stopping after this step with a last.ckpt (Ctrl-C again: stop now, without it)")


def exit_status(signum: int) -> int:
    """A process stopped by `signum` exits with 128 + its number, as a shell reports a process killed by it."""
    return 128 + int(signum)
