"""A policy = a causal LM + its tokenizer, built from plain values (`build_policy`) or read back (`load_policy`).

`load_policy` is the one way a policy is read: by every stage's `policy_ckpt`, `rlhf eval` and `rlhf export`.
The file is read once (`checkpoints.read_policy`) and the model is built holding the stored tensors. A policy of
LoRA adapters is built on its base, refused unless the base has the recorded SHA-256 (`check_base`; a file is
hashed once per version, `checkpoints.sha256_file`). `scoring.load_reward_model` reads its base the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from rlhf_lightning.checkpoints import CheckpointError, read_policy, sha256_path
from rlhf_lightning.lora import add_adapters, has_adapters, load_adapter_state, load_trainable, merged
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
    """(model, tokenizer, rlhf metadata) of an SFT, PPO or DPO checkpoint, or of a folder written by `rlhf export`.

    The file is read once; a plain policy's model holds the stored tensors (`model_with_state`). A policy of LoRA
    adapters (`rlhf.lora`, `rlhf.base`) is its base, refused unless it has the recorded SHA-256 (an HF folder, or a
    policy read by this function with its own adapters merged in), with the adapters added and loaded. `role`
    names the option the path came from, for errors.
    """
    where = f"{role}: {str(path)!r}"
    meta, state = read_policy(path, stages, role)
    if not meta.get("lora"):
        return model_with_state(meta["model"], state), load_tokenizer(meta["tokenizer"]), meta
    base = meta["base"]
    check_base(base, where)
    if base["kind"] == "hf":
        model = build_model(meta["model"])  # the folder's weights
    else:
        model, _, _ = load_plain_policy(base["path"], role=f"{where} base")
    add_adapters(model, meta["lora"])
    if Path(path).is_dir():  # an `--adapters` export: PEFT's key names
        load_adapter_state(model, state, str(path))
    else:
        load_trainable(model, state, where)
    return model, load_tokenizer(meta["tokenizer"]), meta


def load_plain_policy(path: str, role: str) -> tuple[nn.Module, Tokenizer, dict[str, Any]]:
    """`load_policy`, with the adapters of a LoRA checkpoint merged in: a plain model (a base to put adapters on)."""
    model, tokenizer, meta = load_policy(path, role=role)
    return (merged(model) if has_adapters(model) else model), tokenizer, meta


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


def check_base(base: dict[str, str], where: str) -> None:
    """Refuse the base of an adapter checkpoint that is missing or whose SHA-256 differs from the recorded one,
    before anything is built (`where` names the option and the path)."""
    if not Path(base["path"]).exists():
        raise CheckpointError(f"{where}: its base {base['path']!r} (sha256 {base['sha256']}) does not exist; nothing was loaded")
    actual = sha256_path(base["path"])
    if actual != base["sha256"]:
        raise CheckpointError(
            f"{where}: its base {base['path']!r} has sha256 {actual}, the adapters were trained on sha256 {base['sha256']}; nothing was loaded"
        )


def base_record(path: str, kind: str, sha256: str | None = None) -> dict[str, str]:
    """What a checkpoint of adapters records of its base: `kind` "checkpoint" (ours, or an exported folder) or
    "hf" (a model folder), the absolute path and the SHA-256 (computed unless given)."""
    return {"kind": kind, "path": str(Path(path).resolve()), "sha256": sha256 or sha256_path(path)}


def context_length(model: nn.Module) -> int:
    return int(getattr(model.config, "block_size", 1 << 30))
