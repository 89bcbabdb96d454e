"""Plain `nn.Module` models (no Lightning here), built from plain-value configs.

`build_model({"type": "gpt", "n_layer": 2, ...})` rebuilds any model from the dict stored in a checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from rlhf_lightning.models.bigram import BigramConfig, BigramLM
from rlhf_lightning.models.gpt import GPT, GPTConfig, KVCache, positions_from_mask
from rlhf_lightning.models.hf import HFCausalLM, HFConfig  # transformers itself is imported on use

MODEL_TYPES: dict[str, tuple[type, type]] = {
    "gpt": (GPTConfig, GPT),
    "bigram": (BigramConfig, BigramLM),
    "hf": (HFConfig, HFCausalLM),
}


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on activation recomputation in backward for a built policy: the project's GPT or an HF model."""
    if isinstance(model, HFCausalLM):
        model.enable_gradient_checkpointing()
    elif isinstance(getattr(model, "config", None), GPTConfig):
        model.config.gradient_checkpointing = True
    else:
        raise ValueError(f"gradient checkpointing is not available for {type(model).__name__}")


def build_model(config: dict[str, Any]) -> nn.Module:
    """Build a causal LM from a plain dict: `type` names the model, the other keys its config."""
    config = dict(config)
    kind = config.pop("type", "gpt")
    if kind not in MODEL_TYPES:
        raise ValueError(f"unknown model type {kind!r}; choose one of {sorted(MODEL_TYPES)}")
    config_cls, model_cls = MODEL_TYPES[kind]
    try:
        return model_cls(config_cls(**config))
    except TypeError as err:
        raise ValueError(f"model config for {kind!r}: {err}") from None


__all__ = ["GPT", "GPTConfig", "KVCache", "BigramLM", "BigramConfig", "build_model", "positions_from_mask", "MODEL_TYPES", "HFCausalLM", "HFConfig", "enable_gradient_checkpointing"]
