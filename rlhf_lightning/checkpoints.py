"""Reading our checkpoints and exported folders safely, hashing them, and checking a run to resume.

Every stage's checkpoint carries `checkpoint["rlhf"] = {"stage", "model", "tokenizer", ...}` in plain values,
so it is read with `weights_only=True` (no pickled code can run) and rebuilds its model with no config file.
`read_policy` reads a policy's file once; `policy.load_policy` and `scoring.load_reward_model` build from it.

A sharded run's checkpoint may be a distributed checkpoint folder (Lightning's `meta.pt` beside torch DCP's
`.metadata` and one `.distcp` file per rank). DCP's own reader unpickles `.metadata` with plain `pickle` and its
planner loads non-tensor items with `weights_only=False`: here `.metadata` goes through `_DCPMetadataUnpickler`
(DCP's metadata classes only) and every item through `weights_only=True` (`SafeDCPReader`, `SafeDCPPlanner`).
`read_checkpoint` consolidates such a folder into the usual single-file form (`consolidate`).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import pickle
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


def read_checkpoint(path: str | os.PathLike[str], stages: tuple[str, ...], role: str, weights: bool = True) -> dict[str, Any]:
    """Load `path` with `weights_only=True` and check it is a checkpoint of one of `stages`.

    `role` names the option the path came from (e.g. "model.init_args.policy_ckpt") for the error message.
    A distributed checkpoint folder is read safely and consolidated (`consolidate`); `weights=False` checks it
    and reads its metadata only (no tensor: what checking a run to resume needs).
    """
    path = Path(path)
    if is_distributed_checkpoint(path):
        checkpoint = consolidate(path, role) if weights else read_distributed_meta(path, role)
    elif not path.is_file():
        raise CheckpointError(f"{role}: checkpoint {str(path)!r} does not exist")
    else:
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
    if not path.is_dir() or is_distributed_checkpoint(path):
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
    checkpoint = read_checkpoint(path, (meta["stage"],), "ckpt_path", weights=False)
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


# ------------------------------------------------------------------ distributed checkpoint folders

LIGHTNING_META = "meta.pt"  # Lightning's name for the non-tensor part of a distributed checkpoint
DCP_METADATA = ".metadata"  # torch DCP's index of the tensors in the `.distcp` files


def is_distributed_checkpoint(path: str | os.PathLike[str]) -> bool:
    """A folder written by a sharded run's `trainer.save_checkpoint` (`save_distributed_checkpoint`)."""
    path = Path(path)
    return path.is_dir() and (path / LIGHTNING_META).is_file() and (path / DCP_METADATA).is_file()


@functools.cache
def _dcp_globals() -> dict[tuple[str, str], Any]:
    """What a DCP `.metadata` pickle may name: DCP's metadata dataclasses, torch.Size, dtypes and layouts, paths."""
    import pathlib

    import torch.distributed.checkpoint.filesystem as filesystem
    import torch.distributed.checkpoint.metadata as metadata

    allowed: dict[tuple[str, str], Any] = {
        (metadata.__name__, name): getattr(metadata, name)
        for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
                     "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")
    }
    allowed[(filesystem.__name__, "_StorageInfo")] = filesystem._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout  # a layout by its name
    allowed.update({("torch", name): value for name, value in vars(torch).items() if isinstance(value, (torch.dtype, torch.layout))})
    allowed.update({("pathlib", name): getattr(pathlib, name) for name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")})
    return allowed


class _DCPMetadataUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` that builds DCP's metadata classes only: any other global (a function a `__reduce__`
    would call) is refused before anything runs."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _dcp_globals()
        if (module, name) in allowed:
            return allowed[(module, name)]
        raise pickle.UnpicklingError(f"{module}.{name} is not one of torch DCP's metadata classes")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not part of DCP metadata")


def read_dcp_metadata(folder: str | os.PathLike[str], role: str = "ckpt_path"):
    """The `torch.distributed.checkpoint.metadata.Metadata` of a distributed checkpoint folder, unpickled with DCP's
    metadata classes allowed and nothing else; anything else is refused with a `CheckpointError` (one line)."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(folder) / DCP_METADATA
    try:
        with open(path, "rb") as f:
            metadata = _DCPMetadataUnpickler(f).load()
    except Exception as err:  # a refused global, a truncated or foreign file
        raise CheckpointError(f"{role}: refusing {str(path)!r}: not safe DCP metadata ({err})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise CheckpointError(f"{role}: refusing {str(path)!r}: not DCP metadata (a {type(metadata).__name__})")
    return metadata


def _safe_reader_and_planner(folder: Path, role: str):
    """(storage reader, load planner) of DCP that read `.metadata` through `read_dcp_metadata` and every
    non-tensor item with `weights_only=True` (tensors are read that way by DCP itself)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class SafeDCPReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            if kwargs.get("rank") is not None:
                raise CheckpointError(f"{role}: {str(folder)!r} has per-rank metadata, which is not supported")
            metadata = read_dcp_metadata(folder, role)
            if metadata.storage_meta is None:
                from torch.distributed.checkpoint.metadata import StorageMeta

                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafeDCPPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            try:
                obj = torch.load(value, weights_only=True)
            except Exception as err:
                raise CheckpointError(f"{role}: refusing {read_item.dest_index.fqn!r} of {str(folder)!r}: {one_line(err)}") from None
            super().load_bytes(read_item, _saved(obj))

    return SafeDCPReader(folder), SafeDCPPlanner()


def dcp_load(state: dict[str, Any], folder: str | os.PathLike[str], role: str = "ckpt_path", no_dist: bool = True) -> None:
    """DCP's load of `state` from `folder` through the safe reader and planner: in this process alone (`no_dist`), or
    by every rank of the process group (a collective). A refusal on any rank is a one-line `CheckpointError`."""
    import warnings

    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.api import CheckpointException

    folder = Path(folder)
    reader, planner = _safe_reader_and_planner(folder, role)
    try:
        with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process": meant
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            load(state, storage_reader=reader, planner=planner, no_dist=no_dist)
    except CheckpointException as err:  # DCP gathers every rank's failure into one exception
        failures = [exc for exc, _ in err.failures.values()]
        ours = next((exc for exc in failures if isinstance(exc, CheckpointError)), None)
        if ours is not None:
            raise ours from None
        raise CheckpointError(f"{role}: cannot load {str(folder)!r}: {type(failures[0]).__name__}: {one_line(failures[0])}") from None


def one_line(err: BaseException) -> str:
    """The line of an error message that says what went wrong (torch's refusals of a weights-only load span many)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return next((line for line in lines if line.startswith("WeightsUnpickler error")), lines[0] if lines else type(err).__name__)


def _saved(obj: Any) -> io.BytesIO:
    """`obj` as `torch.save` bytes (the default planner's `load_bytes` reads them back; this one object is known safe)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def read_distributed_meta(folder: Path, role: str) -> dict[str, Any]:
    """Lightning's `meta.pt` of a distributed checkpoint (everything but the tensors), after checking the folder's
    DCP metadata and its non-tensor items (optimizer settings) as `weights_only` loads."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = read_dcp_metadata(folder, role)
    items = {fqn: None for fqn, md in metadata.state_dict_metadata.items() if isinstance(md, BytesStorageMetadata)}
    if items:
        dcp_load(items, folder, role)
    try:
        return torch.load(folder / LIGHTNING_META, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{role}: cannot load {str(folder / LIGHTNING_META)!r} as a safe checkpoint: {err}") from None


def consolidate(folder: str | os.PathLike[str], role: str = "ckpt_path") -> dict[str, Any]:
    """A distributed checkpoint folder as the usual single-file checkpoint: `meta.pt`'s entries plus the model's
    full `state_dict`, read in this process alone (no process group). The optimizer state stays behind (it is
    keyed by parameter name, a single-file checkpoint by position); a run resumes from the folder itself."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    folder = Path(folder)
    checkpoint = read_distributed_meta(folder, role)
    metadata = read_dcp_metadata(folder, role)
    prefix = "state_dict."
    state = {
        fqn: torch.empty(md.size, dtype=md.properties.dtype)
        for fqn, md in metadata.state_dict_metadata.items()
        if fqn.startswith(prefix) and isinstance(md, TensorStorageMetadata)
    }
    dcp_load(state, folder, role)
    checkpoint["state_dict"] = {fqn[len(prefix):]: t for fqn, t in state.items()}
    return checkpoint


def write_consolidated(folder: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """`consolidate(folder)` written to the file `out` (atomically): a checkpoint `rlhf eval`, `rlhf export` and
    `load_from_checkpoint` read with no process group."""
    from rlhf_lightning.files import atomic_write

    checkpoint = consolidate(folder, "--ckpt")
    return atomic_write(out, lambda tmp: torch.save(checkpoint, tmp))
