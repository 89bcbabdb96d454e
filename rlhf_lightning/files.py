"""Files written whole or not at all: every final file (checkpoints, JSON, JSONL, exported folders) goes here.

A file is written under a temporary name in its own folder and renamed over the final name once complete, so
no half-written file ever carries a final name and a failure leaves the previous file untouched.

>>> import tempfile, pathlib
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> atomic_write_text(folder / "a.json", ['{"x": 1}', "\\n"]).read_text()
'{"x": 1}\\n'
>>> sorted(p.name for p in folder.iterdir())  # no temporary file left behind
['a.json']
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = ["FAULT_ENV", "atomic_write", "atomic_write_text", "commit", "temporary_path"]

# Fault injection for tests: "last.ckpt:2" kills this process with SIGKILL right before the 2nd rename onto a
# file named last.ckpt, i.e. while a checkpoint is being written (the temporary file is complete, the rename
# has not happened).
FAULT_ENV = "RLHF_FAULT_KILL_BEFORE_RENAME"
_renames: dict[str, int] = {}


def temporary_path(final: str | os.PathLike[str]) -> Path:
    """A temporary name beside `final` (its folder created), unique to this process."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    return final.with_name(f".{final.name}.{os.getpid()}.tmp")


def commit(tmp: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """Rename a complete temporary file or folder over `final` (same folder, so a file's rename is atomic).

    An existing folder at `final` is moved aside first and deleted after the rename.
    """
    fault = os.environ.get(FAULT_ENV)
    if fault:
        name, _, count = fault.partition(":")
        if Path(final).name == name:
            _renames[name] = _renames.get(name, 0) + 1
            if _renames[name] == int(count or 1):
                os.kill(os.getpid(), signal.SIGKILL)
    final = Path(final)
    if Path(tmp).is_dir() and final.is_dir():
        old = final.with_name(f".{final.name}.{os.getpid()}.old")
        final.rename(old)
        Path(tmp).rename(final)
        shutil.rmtree(old, ignore_errors=True)
        return
    os.replace(tmp, final)


def atomic_write(final: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """`write(tmp)` fills a temporary path (a file, or a folder it creates), which then replaces `final`.

    On any failure the temporary path is removed and `final` is untouched. Returns the final path.
    """
    final = Path(final)
    tmp = temporary_path(final)
    try:
        write(tmp)
        if tmp.is_file():
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        commit(tmp, final)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
    return final


def atomic_write_text(path: str | os.PathLike[str], chunks: Iterable[str]) -> Path:
    """Write the text `chunks` (UTF-8, "\\n" line ends) to `path` through `atomic_write`."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for chunk in chunks:
                f.write(chunk)

    return atomic_write(path, write)
