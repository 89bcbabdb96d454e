"""A policy = a causal LM + its tokenizer, built from plain values or read back from a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from rlhf_lightning.checkpoints import CheckpointError, read_adapter_export, read_checkpoint, read_export, sha256_path, submodule_state
from rlhf_lightning.models import build_model
from rlhf_lightning.tasks.arithmetic import ALPHABET
from rlhf_lightning.tokenizer import CharTokenizer, Tokenizer, load_tokenizer

POLICY_STAGES = ("sft", "ppo", "dpo")


def build_policy(model: dict[str, Any] | None, tokenizer: dict[str, Any] | None) -> tuple[nn.Module, Tokenizer, dict[str, Any]]:
    """Model from a plain config (vocab size taken from the tokenizer; default: the toy alphabet).

    An "hf" model keeps its own vocabulary; its tokenizer defaults to the one saved in the same folder.
    """
    config = {"type": "gpt", **(model or {})}
    if config["type"] == "hf":
        from rlhf_lightning.hf_files import local_folder

        config["path"] = local_folder(config.get("path"))  # absolute: checkpoints reload from any directory
        tok = load_tokenizer(tokenizer or {"type": "hf", "path": config["path"]})
        built = build_model(config)
        if tok.vocab_size > built.config.vocab_size:
            raise ValueError(f"the tokenizer has {tok.vocab_size} ids, the model {config['path']!r} embeds only {built.config.vocab_size}")
        return built, tok, config
    tok = load_tokenizer(tokenizer) if tokenizer else CharTokenizer(ALPHABET)
    config["vocab_size"] = tok.vocab_size
    return build_model(config), tok, config


def load_policy(path: str, role: str = "ckpt", stages: tuple[str, ...] = POLICY_STAGES) -> tuple[nn.Module, Tokenizer, dict[str, Any]]:
    """Rebuild the policy stored in an SFT, PPO or DPO checkpoint, or in a folder written by `rlhf export`.

    A checkpoint of LoRA adapters (`rlhf.lora`, `rlhf.base`) rebuilds its base first, refusing a base whose
    SHA-256 differs from the recorded one, then adds and loads the adapters. Returns (model, tokenizer, rlhf metadata).
    """
    if Path(path).is_dir():
        record = read_adapter_export(Path(path))
        if record is not None:  # PEFT's folder format
            from safetensors.torch import load_file

            from rlhf_lightning.lora import load_adapter_state

            model, tokenizer = base_with_adapters(record, f"{role}: {str(path)!r}")
            load_adapter_state(model, load_file(str(Path(path) / "adapter_model.safetensors")), str(path))
            return model, tokenizer, record
        state, meta, tokenizer = read_export(Path(path))
        model = model_with_state(meta["model"], state)
        return model, load_tokenizer(tokenizer), {**meta, "tokenizer": tokenizer}
    checkpoint = read_checkpoint(path, stages, role)
    meta = checkpoint["rlhf"]
    state = submodule_state(checkpoint, "model")
    if meta.get("lora"):
        from rlhf_lightning.lora import load_trainable

        model, tokenizer = base_with_adapters(meta, f"{role}: {str(path)!r}")
        load_trainable(model, state, f"{role}: {str(path)!r}")
        return model, tokenizer, meta
    model = model_with_state(meta["model"], state)
    return model, load_tokenizer(meta["tokenizer"]), meta


def model_with_state(config: dict[str, Any], state: dict[str, torch.Tensor]) -> nn.Module:
    """The model of `config` holding `state`'s tensors themselves.

    A model built from its config alone (not "hf", which reads its own folder) is built on the meta device and
    takes the state's tensors as its parameters: no randomly initialized weights are allocated and then
    overwritten, and a checkpoint read memory-mapped costs its weights' memory once, not twice (pages are
    copied only where training writes them).
    """
    if config.get("type", "gpt") == "hf":
        model = build_model(config)
        model.load_state_dict(state)
        return model
    with torch.device("meta"):
        model = build_model(config)
    dtypes = {name: t.dtype for name, t in model.state_dict().items()}
    # the built model's precision, as a copying load gives it (a checkpoint written in bf16 loads as float32)
    model.load_state_dict({k: v.to(dtypes[k]) if k in dtypes else v for k, v in state.items()}, assign=True)
    return model


def base_record(path: str, kind: str, sha256: str | None = None) -> dict[str, str]:
    """What a checkpoint of adapters records of its base: `kind` "checkpoint" (ours, or an exported folder) or
    "hf" (a model folder), the absolute path and the SHA-256 (computed unless given)."""
    return {"kind": kind, "path": str(Path(path).resolve()), "sha256": sha256 or sha256_path(path)}


def load_plain_policy(path: str, role: str) -> tuple[nn.Module, Tokenizer, dict[str, Any]]:
    """`load_policy`, with the adapters of a LoRA checkpoint merged in: a plain model to put new adapters on."""
    from rlhf_lightning.lora import has_adapters, merged

    model, tokenizer, meta = load_policy(path, role=role)
    return (merged(model) if has_adapters(model) else model), tokenizer, meta


def base_with_adapters(meta: dict[str, Any], role: str) -> tuple[nn.Module, Tokenizer]:
    """The base recorded in `meta["base"]`, checked against its SHA-256, with `meta["lora"]`'s adapters added
    (their weights still to be loaded)."""
    from rlhf_lightning.lora import add_adapters

    model, tokenizer = load_base(meta["base"], meta, role)
    add_adapters(model, meta["lora"])
    return model, tokenizer


def load_base(base: dict[str, str], meta: dict[str, Any], role: str) -> tuple[nn.Module, Tokenizer]:
    """The base model of an adapter checkpoint, checked against its recorded SHA-256; its own adapters, if it
    has any, merged in (a base is always a plain model)."""
    check_base(base, role)
    if base["kind"] == "hf":
        return build_model(meta["model"]), load_tokenizer(meta["tokenizer"])
    model, tokenizer, _ = load_plain_policy(base["path"], role=f"{role} base")
    return model, tokenizer


def check_base(base: dict[str, str], role: str) -> None:
    """Refuse the base of an adapter checkpoint that is missing or whose SHA-256 differs from the recorded one."""
    if not Path(base["path"]).exists():
        raise CheckpointError(f"{role}: its base {base['path']!r} (sha256 {base['sha256']}) does not exist; nothing was loaded")
    actual = sha256_path(base["path"])
    if actual != base["sha256"]:
        raise CheckpointError(
            f"{role}: its base {base['path']!r} has sha256 {actual}, the adapters were trained on sha256 {base['sha256']}; nothing was loaded"
        )


def context_length(model: nn.Module) -> int:
    return int(getattr(model.config, "block_size", 1 << 30))
