"""The frozen reference of the stages that train a policy against one (PPO, DPO): how it is built (a copy, the
merged LoRA SFT policy, or the policy itself with its adapters off), kept deterministic (no dropout), and left out
of checkpoints (rebuilt from `policy_ckpt`, whose SHA-256 a resume checks)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch.nn as nn

from rlhf_lightning.lora import BaseOfAdapters, add_adapters, has_adapters, lora_settings, merged, require_peft
from rlhf_lightning.option_groups import FROZEN_DTYPES
from rlhf_lightning.options import ConfigError

__all__ = ["FROZEN_DTYPES", "disable_dropout", "hide_reference", "policy_reference"]


def disable_dropout(model: nn.Module) -> None:
    """A policy's ratio to its reference needs deterministic forwards: zero every dropout probability."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        elif isinstance(getattr(module, "dropout", None), float):
            module.dropout = 0.0
    if hasattr(getattr(model, "config", None), "dropout"):
        model.config.dropout = 0.0


def policy_reference(
    model: nn.Module,
    meta: dict[str, Any],
    lora: dict[str, Any] | None,
    base: Callable[[], dict[str, Any]],
    reference_dtype: str = "float32",
    needs_reference: bool = True,
) -> tuple[dict[str, Any] | None, nn.Module | None]:
    """(the LoRA record `{"lora", "base"}` or None, the frozen reference or None) of a policy about to train.

    - `lora` set: adapters are added to `model` (their base described by `base()`); the reference is the same
      model with its adapters switched off (`BaseOfAdapters`: no copy).
    - `model` already holds adapters (a LoRA SFT checkpoint, `meta` records them): they keep training; the
      reference is that policy merged once into a frozen copy.
    - otherwise: the reference is a frozen copy in `reference_dtype`.
    Without `needs_reference` (reference-free losses) no reference is built. Dropout is zeroed in both."""
    record: dict[str, Any] | None = None
    reference: nn.Module | None = None
    if lora is not None:
        require_peft("model.init_args.lora")
        if has_adapters(model):
            raise ConfigError("model.init_args.lora: policy_ckpt already holds adapters; leave lora unset to continue training them")
        record = {"lora": add_adapters(model, lora_settings(lora)), "base": base()}
        reference = BaseOfAdapters(model) if needs_reference else None
    elif has_adapters(model):  # LoRA SFT: continue its adapters; the reference is that SFT policy
        record = {"lora": meta["lora"], "base": meta["base"]}
        reference = merged(model).to(FROZEN_DTYPES[reference_dtype]) if needs_reference else None
    elif needs_reference:
        reference = copy.deepcopy(model).to(FROZEN_DTYPES[reference_dtype])
    disable_dropout(model)
    if reference is not None and not isinstance(reference, BaseOfAdapters):
        disable_dropout(reference)
    return record, None if reference is None else reference.eval().requires_grad_(False)


def hide_reference(module: nn.Module) -> None:
    """Leave `module.reference` out of `module`'s state dict, and accept a state dict without it: the frozen
    reference is never trained and is rebuilt from `policy_ckpt`."""
    module.register_state_dict_post_hook(_without_reference)
    module.register_load_state_dict_post_hook(_reference_not_expected)


def _without_reference(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "reference.")]:
        del state_dict[key]


def _reference_not_expected(module: nn.Module, incompatible_keys: Any) -> None:
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not k.startswith("reference.")]
