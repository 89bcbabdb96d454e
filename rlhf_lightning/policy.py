"""A policy = a causal LM + its tokenizer, built from plain values or read back from a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from rlhf_lightning.checkpoints import read_checkpoint, submodule_state
from rlhf_lightning.generation import Generation, generate
from rlhf_lightning.models import build_model
from rlhf_lightning.tasks.arithmetic import ALPHABET, judge
from rlhf_lightning.tokenizer import CharTokenizer, load_tokenizer

POLICY_STAGES = ("sft", "ppo")


def build_policy(model: dict[str, Any] | None, tokenizer: dict[str, Any] | None) -> tuple[nn.Module, CharTokenizer, dict[str, Any]]:
    """Model from a plain config (vocab size taken from the tokenizer; default: the toy alphabet).

    An "hf" model keeps its own vocabulary; its tokenizer defaults to the one saved in the same folder.
    """
    config = {"type": "gpt", **(model or {})}
    if config["type"] == "hf":
        from rlhf_lightning.models.hf import local_folder

        config["path"] = local_folder(config.get("path"))  # absolute: checkpoints reload from any directory
        tok = load_tokenizer(tokenizer or {"type": "hf", "path": config["path"]})
        built = build_model(config)
        if tok.vocab_size > built.config.vocab_size:
            raise ValueError(f"the tokenizer has {tok.vocab_size} ids, the model {config['path']!r} embeds only {built.config.vocab_size}")
        return built, tok, config
    tok = load_tokenizer(tokenizer) if tokenizer else CharTokenizer(ALPHABET)
    config["vocab_size"] = tok.vocab_size
    return build_model(config), tok, config


def load_policy(path: str, role: str = "ckpt", stages: tuple[str, ...] = POLICY_STAGES) -> tuple[nn.Module, CharTokenizer, dict[str, Any]]:
    """Rebuild the policy stored in an SFT or PPO checkpoint, or in a folder written by `rlhf export`.

    Returns (model, tokenizer, rlhf metadata).
    """
    if Path(path).is_dir():
        from rlhf_lightning.export import read_export

        state, meta, tokenizer = read_export(Path(path))
        model = build_model(meta["model"])
        model.load_state_dict(state)
        return model, load_tokenizer(tokenizer), {**meta, "tokenizer": tokenizer}
    checkpoint = read_checkpoint(path, stages, role)
    meta = checkpoint["rlhf"]
    model = build_model(meta["model"])
    model.load_state_dict(submodule_state(checkpoint, "model"))
    return model, load_tokenizer(meta["tokenizer"]), meta


def context_length(model: nn.Module) -> int:
    return int(getattr(model.config, "block_size", 1 << 30))


def complete(
    model: nn.Module,
    tokenizer: CharTokenizer,
    batch: dict,
    max_new_tokens: int,
    greedy: bool = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[list[str], Generation]:
    """Generate for a batch from `PromptDataset.collate` and decode the completions to text."""
    gen = generate(
        model, batch["prompt_ids"], batch["prompt_mask"], max_new_tokens=max_new_tokens,
        eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, temperature=temperature, top_k=top_k,
        greedy=greedy, generator=generator,
    )
    return [tokenizer.decode(row) for row in gen.completion_ids.tolist()], gen


def judge_scores(completions: list[str], golds: list[str | None], finished: torch.Tensor) -> torch.Tensor:
    """The task judge per row (B,); NaN where no gold answer is known."""
    ended = finished.tolist()
    return torch.tensor(
        [float("nan") if g is None else judge(c, g, e) for c, g, e in zip(completions, golds, ended)],
        dtype=torch.float32,
    )
