"""Reading our checkpoints and exported folders safely, hashing them, and checking a run to resume.

Every stage's checkpoint carries `checkpoint["rlhf"] = {"stage", "model", "tokenizer", ...}` in plain values,
so it is read with `weights_only=True` (no pickled code can run) and rebuilds its model with no config file.
`read_policy` reads a policy's file once; `policy.load_policy` and `scoring.load_reward_model` build from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch


class CheckpointError(ValueError):
    pass


class FileVersion(NamedTuple):
    """What changes when a file is written: in place, its mtime and ctime; replaced (a rename over it, as
    `files.atomic_write` does), its inode and ctime."""

    path: str  # real path
    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> FileVersion:
        stat = os.stat(path)
        return cls(os.path.realpath(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


# SHA-256 of every file version this process has hashed. A checkpoint of adapters checks its base at each load,
# and the base of a 7B model is 14 GB to read: an unchanged file is hashed once.
_SHA256_OF_VERSION: dict[FileVersion, str] = {}
# Two writes within the resolution of a file system's timestamps (a clock tick on Linux, 2 s on FAT) can leave a
# file the same times: a hash is kept only for a file last changed longer ago than this (git's "racy" rule), so
# any later write gets later times.
SETTLED_NS = 2 * 10**9


def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes, read once per version of the file (`FileVersion`) in this process; a file changed
    in the last `SETTLED_NS` is read at every call."""
    version = FileVersion.of(path)
    if version in _SHA256_OF_VERSION:
        return _SHA256_OF_VERSION[version]
    settled = time.time_ns() - max(version.mtime_ns, version.ctime_ns) > SETTLED_NS
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if settled and FileVersion.of(path) == version:  # and not written while it was read
        _SHA256_OF_VERSION[version] = digest.hexdigest()
    return digest.hexdigest()


def sha256_path(path: str | Path) -> str:
    """SHA-256 of a checkpoint file, or of a model folder (every file's name and content, in name order); each
    file is hashed once per version (`sha256_file`)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for f in sorted(q for q in path.rglob("*") if q.is_file() and not q.name.startswith(".")):
        digest.update(f"{f.relative_to(path)}\0{sha256_file(f)}\n".encode())
    return digest.hexdigest()


def read_checkpoint(path: str | os.PathLike[str], stages: tuple[str, ...], role: str) -> dict[str, Any]:
    """Load `path` with `weights_only=True` and check it is a checkpoint of one of `stages`.

    `role` names the option the path came from (e.g. "model.init_args.policy_ckpt") for the error message.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{role}: checkpoint {str(path)!r} does not exist")
    try:
        # mmap: tensors are read on use, so the optimizer state a stage checkpoint carries costs no memory here
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
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


# An exported policy folder (`rlhf export`): plain weights, or PEFT's adapter files plus our record.
WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"
ADAPTERS = "rlhf_adapters.json"  # beside PEFT's files in an `--adapters` export
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # PEFT's name for the adapter tensors


def read_policy(path: str | os.PathLike[str], stages: tuple[str, ...], role: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, the model's tensors) of a policy, its file read once: a checkpoint of one of `stages`
    (`checkpoint["rlhf"]`; tensors memory-mapped, see `read_checkpoint`), a folder written by `rlhf export`
    ({"stage", "model", "tokenizer"}) or by `rlhf export --adapters` (its record; the adapter tensors under PEFT's
    key names). `role` names the option the path came from, for the error message.
    """
    path = Path(path)
    if not path.is_dir():
        checkpoint = read_checkpoint(path, stages, role)
        return checkpoint["rlhf"], submodule_state(checkpoint, "model")
    record = read_adapter_export(path)
    if record is not None:
        from safetensors.torch import load_file

        return record, load_file(str(path / ADAPTER_WEIGHTS))
    state, config, tokenizer = read_export(path)
    return {**config, "tokenizer": tokenizer}, state


def read_adapter_export(path: Path) -> dict | None:
    """The record of an `--adapters` export (None for another folder)."""
    return json.loads((path / ADAPTERS).read_text()) if (path / ADAPTERS).is_file() else None


def read_export(path: Path) -> tuple[dict, dict, dict]:
    """(state dict, {"stage", "model"}, tokenizer dict) of an exported folder."""
    from safetensors.torch import load_file

    for name in (WEIGHTS, CONFIG, TOKENIZER):
        if not (path / name).is_file():
            raise ValueError(f"{str(path)!r} is not an exported policy: {name} is missing")
    return load_file(str(path / WEIGHTS)), json.loads((path / CONFIG).read_text()), json.loads((path / TOKENIZER).read_text())


RUN_NAMES = {"sft": "SFT", "reward": "reward-model", "ppo": "PPO"}

# Options that change no trained number, and input checkpoints' paths (their SHA-256 is compared instead):
# a run may resume with other values.
RESUME_FREE_OPTIONS = frozenset({
    "num_workers", "eval_batch_size", "num_logged_samples", "policy_ckpt", "reward_ckpt", "sft_ckpt",
    "ckpt",  # PPO's reward.ckpt: input checkpoints are known by content (their SHA-256 is checked), a path may move
    "gradient_checkpointing",  # recomputing activations changes memory, not the numbers
})


def first_difference(saved: Any, current: Any, name: str) -> str | None:
    """The dotted name of the first value that differs between two nested dicts (None if they are equal)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        for key in sorted(set(saved) | set(current), key=str):
            if key in RESUME_FREE_OPTIONS:
                continue
            found = first_difference(saved.get(key), current.get(key), f"{name}.{key}")
            if found:
                return found
        return None
    if isinstance(saved, (list, tuple)) and isinstance(current, (list, tuple)) and len(saved) == len(current):
        return next((d for i, (a, b) in enumerate(zip(saved, current)) if (d := first_difference(a, b, f"{name}[{i}]"))), None)
    return None if saved == current else f"{name}: the checkpoint has {saved!r}, this run {current!r}"


def check_resume(path: str | os.PathLike[str], expected: dict[str, Any], data_hparams: dict[str, Any]) -> dict[str, Any]:
    """Read a checkpoint to resume from and refuse it unless it was written by this stage with this config.

    `expected` is what this run's module would write (`{"rlhf": ..., "hyper_parameters": ...}`); the
    checkpoint's metadata (stage, model, tokenizer, input checkpoints' SHA-256), the module's options and the
    DataModule's options must all match. The error names the first field that differs.
    """
    meta = expected["rlhf"]
    checkpoint = read_checkpoint(path, (meta["stage"],), "ckpt_path")
    for role in ("policy", "reward", "sft"):  # input checkpoints are known by content: a path may move
        saved, current = checkpoint["rlhf"].get(f"{role}_sha256"), meta.get(f"{role}_sha256", "absent")
        if current != "absent" and saved != current:
            hp = expected["hyper_parameters"]
            grouped = isinstance(hp.get(role), dict)  # PPO's reward checkpoint is its group's `reward.ckpt`
            option, given = (f"{role}.ckpt", hp[role].get("ckpt")) if grouped else (f"{role}_ckpt", hp.get(f"{role}_ckpt"))
            raise CheckpointError(
                f"model.init_args.{option}: {given!r} (sha256 {current}) is not "
                f"the file this {RUN_NAMES.get(meta['stage'], meta['stage'])} run started from (sha256 {saved}); refusing to resume {str(path)!r}"
            )
    where = f"ckpt_path: {str(path)!r} was written with a different config, refusing to resume it"
    checks = (
        (checkpoint.get("hyper_parameters", {}), expected["hyper_parameters"], "model.init_args"),
        (checkpoint.get("datamodule_hyper_parameters", {}), data_hparams, "data.init_args"),
        (checkpoint["rlhf"], meta, "rlhf"),
    )
    for saved, current, name in checks:
        if name == "rlhf":  # run state (RNG, counters) differs by design: compare what defines the run
            keys = {"stage", "model", "tokenizer"} & set(current)
            saved, current = {k: saved.get(k) for k in keys}, {k: current[k] for k in keys}
        difference = first_difference(saved, current, name)
        if difference:
            raise CheckpointError(f"{where}: {difference}")
    return checkpoint
