"""Reading our checkpoints safely and writing final checkpoints atomically.

Every stage's checkpoint carries `checkpoint["rlhf"] = {"stage", "model", "tokenizer", ...}` in plain values,
so it is read with `weights_only=True` (no pickled code can run) and rebuilds its model with no config file.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    pass


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_checkpoint(path: str | os.PathLike[str], stages: tuple[str, ...], role: str) -> dict[str, Any]:
    """Load `path` with `weights_only=True` and check it is a checkpoint of one of `stages`.

    `role` names the option the path came from (e.g. "model.init_args.policy_ckpt") for the error message.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{role}: checkpoint {str(path)!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling refused, truncated or not a torch file
        raise CheckpointError(f"{role}: cannot load {str(path)!r} as a safe checkpoint: {err}") from None
    meta = checkpoint.get("rlhf") if isinstance(checkpoint, dict) else None
    if not isinstance(meta, dict) or "stage" not in meta:
        raise CheckpointError(f"{role}: {str(path)!r} is not an rlhf-lightning checkpoint (no 'rlhf' metadata)")
    if meta["stage"] not in stages:
        raise CheckpointError(
            f"{role}: {str(path)!r} is a {meta['stage']!r} checkpoint, expected {' or '.join(map(repr, stages))}"
        )
    return checkpoint


def submodule_state(checkpoint: dict[str, Any], prefix: str) -> dict[str, torch.Tensor]:
    """The part of a LightningModule state dict under `prefix.` with the prefix removed."""
    prefix = prefix + "."
    return {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}


def replace_atomically(tmp: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """Rename a fully written temporary file over `final` (same directory, so the rename is atomic)."""
    os.replace(tmp, final)


def temporary_path(final: str | os.PathLike[str]) -> Path:
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    return final.with_name(f".{final.name}.{os.getpid()}.tmp")
