"""Loading a policy or a reward model: each file read once per load, a base's SHA-256 computed once per version of
its file, the loaded model equal to the one that was saved, and the errors that name the option and the base."""

from __future__ import annotations

import builtins
import hashlib
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import rlhf_lightning.checkpoints as checkpoints
from rlhf_lightning.checkpoints import CheckpointError, sha256_file
from rlhf_lightning.export import export_policy
from rlhf_lightning.modules.reward import RewardModule
from rlhf_lightning.modules.sft import SFTModule
from rlhf_lightning.policy import load_policy
from rlhf_lightning.scoring import load_reward_model

pytest.importorskip("peft", reason="needs the [peft] extra")

TINY = {"type": "gpt", "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 24}


def save(module: torch.nn.Module, path: Path) -> Path:
    """Write `module`'s checkpoint as a run would (its own `on_save_checkpoint` on its state dict)."""
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


def randomize(model: torch.nn.Module, names: str) -> None:
    """Give every parameter whose name holds one of `names` a seeded value (LoRA's B starts at zero: a no-op)."""
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            if p.requires_grad and any(n in name for n in names.split()):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.3)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """name -> (checkpoint, the model that wrote it): a full policy, adapters on it, adapters on those adapters
    (their base a LoRA checkpoint, merged), a full reward model, and reward models of adapters on the two policies."""
    folder = tmp_path_factory.mktemp("loading")
    torch.manual_seed(0)
    base = SFTModule(model=TINY)
    out = {"base": (save(base, folder / "base.ckpt"), base.model)}
    lora = SFTModule(lora={"r": 4}, base_ckpt=str(out["base"][0]))
    randomize(lora.model, "lora_")
    out["lora"] = (save(lora, folder / "lora.ckpt"), lora.model)
    lora2 = SFTModule(lora={"r": 2}, base_ckpt=str(out["lora"][0]))
    randomize(lora2.model, "lora_")
    out["lora_on_lora"] = (save(lora2, folder / "lora_on_lora.ckpt"), lora2.model)
    reward = RewardModule(sft_ckpt=str(out["base"][0]))
    randomize(reward.model, "head")
    out["reward"] = (save(reward, folder / "reward.ckpt"), reward.model)
    for name, sft in (("reward_lora", "base"), ("reward_on_lora", "lora")):
        reward = RewardModule(sft_ckpt=str(out[sft][0]), lora={"r": 4})
        randomize(reward.model, "lora_ head")
        out[name] = (save(reward, folder / f"{name}.ckpt"), reward.model)
    return out


@pytest.fixture
def reads(monkeypatch):
    """(torch.load calls, opens, SHA-256 computations): the first two by file name. A load of a checkpoint opens its
    file once (memory-mapped); a hash opens it once more. The hash cache starts empty, as in a new process, and its
    clock reads an hour ahead, so every file has settled (`SETTLED_NS`): the tests give each change its own mtime, as
    a write after the file has settled gets."""
    monkeypatch.setattr(checkpoints, "_SHA256_OF_VERSION", {})
    monkeypatch.setattr(checkpoints, "time", SimpleNamespace(time_ns=lambda: time.time_ns() + 3600 * 10**9))
    loads, opens, hashes = Counter(), Counter(), Counter()
    real_load, real_open, real_sha256 = torch.load, builtins.open, hashlib.sha256

    def counted_load(f, *args, **kwargs):
        loads[Path(f).name if isinstance(f, (str, os.PathLike)) else repr(f)] += 1
        return real_load(f, *args, **kwargs)

    def counted_open(f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and Path(f).suffix == ".ckpt":
            opens[Path(f).name] += 1
        return real_open(f, *args, **kwargs)

    def counted_sha256(*args):
        hashes["sha256"] += 1
        return real_sha256(*args)

    monkeypatch.setattr(torch, "load", counted_load)
    monkeypatch.setattr(builtins, "open", counted_open)
    monkeypatch.setattr(checkpoints, "hashlib", SimpleNamespace(sha256=counted_sha256))
    return loads, opens, hashes


def load(name: str, saved, part: int = 0):
    path = str(saved[name][0])
    return (load_reward_model if name.startswith("reward") else load_policy)(path)[part]


@pytest.mark.parametrize("name", ["base", "lora", "lora_on_lora", "reward", "reward_lora", "reward_on_lora"])
def test_a_loaded_model_equals_the_model_that_was_saved(saved, name):
    expected = saved[name][1].state_dict()
    loaded = load(name, saved).state_dict()
    assert load(name, saved, part=1) == load("base", saved, part=1)  # the tokenizer recorded with the adapters: the base's
    assert loaded.keys() == expected.keys()
    for key, tensor in expected.items():  # the same tensors, or the same operations (a merge) on them
        assert torch.equal(loaded[key], tensor), key


@pytest.mark.parametrize("name, files", [
    ("base", ["base.ckpt"]),
    ("lora", ["lora.ckpt", "base.ckpt"]),
    ("lora_on_lora", ["lora_on_lora.ckpt", "lora.ckpt", "base.ckpt"]),
    ("reward_on_lora", ["reward_on_lora.ckpt", "lora.ckpt", "base.ckpt"]),
])
def test_a_load_reads_each_file_once_and_hashes_each_base_once_per_process(saved, reads, name, files):
    loads, opens, hashes = reads
    bases = files[1:]
    load(name, saved)
    assert loads == Counter(files)  # one torch.load per file: the checkpoint, its base, the base's base
    assert opens == Counter(files) + Counter(bases) and hashes["sha256"] == len(bases)  # + one hash per base
    for _ in range(2):  # the bases unchanged: read once more each (the load), never hashed again
        loads.clear(), opens.clear()
        load(name, saved)
        assert loads == Counter(files) and opens == Counter(files) and hashes["sha256"] == len(bases)


def test_a_changed_base_is_hashed_again_and_refused(saved, reads):
    _, _, hashes = reads
    base, lora = saved["base"][0], str(saved["lora"][0])
    load_policy(lora)
    assert hashes["sha256"] == 1
    original, mtime = base.read_bytes(), base.stat().st_mtime_ns
    try:
        full = torch.load(base, weights_only=True)
        full["state_dict"]["model.wte.weight"] += 1.0
        torch.save(full, base)
        set_mtime(base, mtime + 10**9)  # the same size: its own mtime tells the change
        with pytest.raises(CheckpointError, match="nothing was loaded") as err:
            load_policy(lora, role="model.init_args.policy_ckpt")
        assert hashes["sha256"] == 2
        assert str(err.value).startswith(f"model.init_args.policy_ckpt: {lora!r}: its base {str(base.resolve())!r} has sha256 ")
    finally:
        base.write_bytes(original)
        set_mtime(base, mtime + 2 * 10**9)
    load_policy(lora)  # the base as it was: accepted, hashed once more
    assert hashes["sha256"] == 3


def test_a_missing_base_names_the_option_and_the_base(saved, tmp_path):
    moved = tmp_path / "lora_on_lora.ckpt"
    shutil.copy(saved["lora_on_lora"][0], moved)
    data = torch.load(moved, weights_only=True)
    data["rlhf"]["base"]["path"] = str(tmp_path / "gone.ckpt")
    torch.save(data, moved)
    with pytest.raises(CheckpointError) as err:
        load_policy(str(moved), role="--ckpt")
    sha = data["rlhf"]["base"]["sha256"]
    assert str(err.value) == f"--ckpt: {str(moved)!r}: its base {str(tmp_path / 'gone.ckpt')!r} (sha256 {sha}) does not exist; nothing was loaded"


def set_mtime(path: Path, mtime_ns: int) -> None:
    os.utime(path, ns=(path.stat().st_atime_ns, mtime_ns))


def test_sha256_is_computed_once_per_version_of_a_file(reads, tmp_path):
    _, _, hashes = reads
    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 100)
    mtime = path.stat().st_mtime_ns
    assert sha256_file(path) == sha256_file(str(path)) == hashlib.sha256(b"a" * 100).hexdigest()
    assert hashes["sha256"] == 1
    path.write_bytes(b"b" * 100)  # in place, the same size: another mtime tells
    set_mtime(path, mtime + 10**9)
    assert sha256_file(path) == hashlib.sha256(b"b" * 100).hexdigest() and hashes["sha256"] == 2
    path.write_bytes(b"b" * 101)  # another size
    set_mtime(path, mtime + 10**9)
    assert sha256_file(path) == hashlib.sha256(b"b" * 101).hexdigest() and hashes["sha256"] == 3
    other = tmp_path / "other.bin"  # replaced by a rename, with the same size and mtime: another inode
    other.write_bytes(b"c" * 101)
    set_mtime(other, mtime + 10**9)
    os.replace(other, path)
    for _ in range(2):
        assert sha256_file(path) == hashlib.sha256(b"c" * 101).hexdigest() and hashes["sha256"] == 4


def test_a_file_changed_in_the_last_two_seconds_is_hashed_at_every_read(reads, tmp_path, monkeypatch):
    _, _, hashes = reads
    monkeypatch.setattr(checkpoints, "time", time)  # the real clock
    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 100)
    sha256_file(path), sha256_file(path)
    assert hashes["sha256"] == 2  # a write within the same clock tick would keep its times: not kept
    later = time.time_ns() + checkpoints.SETTLED_NS + 10**9
    monkeypatch.setattr(checkpoints, "time", SimpleNamespace(time_ns=lambda: later))
    sha256_file(path), sha256_file(path)
    assert hashes["sha256"] == 3  # settled: kept


def test_an_adapter_export_is_read_once_onto_its_checked_base(saved, reads, tmp_path):
    loads, opens, hashes = reads
    out = export_policy(str(saved["lora"][0]), str(tmp_path / "peft"), adapters=True)
    loads.clear(), opens.clear()
    hashes.clear()
    model, _, meta = load_policy(str(out))
    assert meta["base"]["path"] == str(saved["base"][0].resolve())
    assert loads == Counter(["base.ckpt"]) and hashes["sha256"] == 0  # the base was hashed by the export's own load
    expected = saved["lora"][1].state_dict()
    assert model.state_dict().keys() == expected.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
