"""LoRA adapters on a trained base (the `peft` library, extra `[peft]`): add, switch off, save, merge, export.

A policy with adapters is the base model whose projections `peft` wrapped: `W x + (alpha / r) B A x`, where only
A and B train. Its checkpoint keeps the adapter tensors and `{"lora": settings, "base": {"kind", "path", "sha256"}}`;
reading it (`policy.load_policy`, `scoring.load_reward_model`) rebuilds the base from `path`, refuses a base whose
SHA-256 differs, and adds and loads the adapters with the functions here.

    >>> from rlhf_lightning.models import build_model
    >>> model = build_model({"type": "gpt", "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 8, "vocab_size": 12})
    >>> settings = add_adapters(model, lora_settings({"r": 2}))
    >>> settings["target_modules"], count_parameters(model, trainable=True)  # r (in + out) per projection
    (['mlp.0', 'mlp.2', 'proj', 'qkv'], 512)
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from rlhf_lightning.checkpoints import ADAPTER_WEIGHTS, CheckpointError
from rlhf_lightning.options import ConfigError

PEFT_HINT = "pip install 'rlhf-lightning[peft]'"

#: Default `target_modules`: the attention and MLP projections of the project's GPT, of GPT-2 and of
#: Llama-style models; those present in the model are used.
DEFAULT_TARGETS = (
    "qkv", "proj", "mlp.0", "mlp.2",  # rlhf_lightning.models.gpt
    "c_attn", "c_proj", "c_fc",  # GPT-2
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",  # Llama-style
)
SETTINGS = ("r", "alpha", "dropout", "target_modules")


def require_peft(option: str) -> None:
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ConfigError(f"{option}: LoRA needs the peft library: {PEFT_HINT}") from None


def lora_settings(lora: dict[str, Any], option: str = "model.init_args.lora") -> dict[str, Any]:
    """`{r, alpha, dropout, target_modules}` with defaults (alpha = 2 r, dropout 0, targets: see DEFAULT_TARGETS)."""
    if not isinstance(lora, dict):
        raise ConfigError(f"{option}: expected a mapping like {{r: 8}}, got {lora!r}")
    unknown = sorted(set(lora) - set(SETTINGS))
    if unknown:
        raise ConfigError(f"{option}: unknown key {unknown[0]!r}; allowed: {', '.join(SETTINGS)}")
    r = lora.get("r", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ConfigError(f"{option}.r: {r!r} is not allowed; allowed: an integer >= 1")
    dropout = float(lora.get("dropout", 0.0))
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"{option}.dropout: {dropout} is not allowed; allowed: 0 <= dropout < 1")
    targets = lora.get("target_modules")
    if targets is not None and (isinstance(targets, str) or not all(isinstance(t, str) for t in targets) or not targets):
        raise ConfigError(f"{option}.target_modules: expected a list of module names, got {targets!r}")
    return {"r": r, "alpha": float(lora.get("alpha", 2 * r)), "dropout": dropout, "target_modules": None if targets is None else sorted(targets)}


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def add_adapters(model: nn.Module, settings: dict[str, Any], option: str = "model.init_args.lora") -> dict[str, Any]:
    """Wrap `model`'s target projections with LoRA adapters in place and freeze everything else.

    Returns the settings with `target_modules` resolved (what a checkpoint records to rebuild the same model).
    """
    require_peft(option)
    from peft import LoraConfig, inject_adapter_in_model

    linear = [name for name, module in model.named_modules() if name and _is_projection(module)]
    targets = settings["target_modules"]
    if targets is None:
        targets = sorted(t for t in DEFAULT_TARGETS if any(_matches(n, t) for n in linear))
        if not targets:
            raise ConfigError(f"{option}.target_modules: none of the default names matches this model; its projections: {_short_names(linear)}")
    for target in targets:
        if not any(_matches(n, target) for n in linear):
            raise ConfigError(f"{option}.target_modules: {target!r} matches no module; the projections are: {_short_names(linear)}")
    config = LoraConfig(r=settings["r"], lora_alpha=settings["alpha"], lora_dropout=settings["dropout"], target_modules=list(targets))
    inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return {**settings, "target_modules": list(targets)}


def _is_projection(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"  # GPT-2's transposed linear


def _short_names(names: list[str]) -> str:
    """Module names without numeric path parts repeated: 'blocks.0.attn.qkv' -> 'attn.qkv'."""
    short = sorted({".".join(p for i, p in enumerate(n.split(".")) if not (p.isdigit() and i < 2)) for n in names})
    return ", ".join(short)


def has_adapters(model: nn.Module) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


def _tuner_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The base model's forward, with no copy: every adapter switched off inside the block."""
    layers = _tuner_layers(model)
    trainable = {id(p): p.requires_grad for p in model.parameters()}
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for p in model.parameters():  # peft's switch also flips requires_grad: put it back as it was
            p.requires_grad_(trainable[id(p)])


class BaseOfAdapters(nn.Module):
    """A frozen view of `policy` with its adapters switched off: the reference of PPO with LoRA, no copy.

    Calls run without gradients. The policy is held outside the module tree (not in `state_dict`, not moved
    twice), through a plain attribute of this wrapper.
    """

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self.__dict__["policy"] = policy  # not a submodule: the policy is registered where it trains

    @torch.no_grad()
    def forward(self, *args: Any, **kwargs: Any):
        with adapters_disabled(self.policy):
            return self.policy(*args, **kwargs)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors, keyed by module path (no adapter name), as PEFT's own files store them."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load adapter tensors saved by `save_peft_folder` (PEFT's key names) into a model with adapters."""
    from peft import set_peft_model_state_dict

    state = {k.removeprefix("base_model.model."): v for k, v in state.items()}
    result = set_peft_model_state_dict(model, state)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ValueError(f"{where}: adapter tensor {unexpected[0]!r} fits no module of the base")


def merged(model: nn.Module) -> nn.Module:
    """A copy of `model` with every adapter folded into its projection (W + alpha/r B A): a plain model
    whose `state_dict` has the base's keys."""
    out = copy.deepcopy(model)
    for name, module in list(out.named_modules()):
        if hasattr(module, "get_base_layer") and hasattr(module, "merge"):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent_name) if parent_name else out, child, module.get_base_layer())
    return out


def save_peft_folder(model: nn.Module, settings: dict[str, Any], out: Path, base: str) -> None:
    """Write `adapter_config.json` and `adapter_model.safetensors` in PEFT's format (`PeftModel.from_pretrained`)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    config = LoraConfig(
        r=settings["r"], lora_alpha=settings["alpha"], lora_dropout=settings["dropout"],
        target_modules=list(settings["target_modules"]), base_model_name_or_path=base,
    )
    config.save_pretrained(str(out))
    state = {f"base_model.model.{k}": v.detach().contiguous() for k, v in adapter_state(model).items()}
    save_file(state, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def add_reward_adapters(model: nn.Module, settings: dict[str, Any], option: str = "model.init_args.lora") -> dict[str, Any]:
    """`add_adapters` on a reward model's backbone. Its score head (and the likelihood feature's scale) stay
    trainable; its LM head, the SFT policy's, is part of the frozen base."""
    resolved = add_adapters(model.backbone, settings, option)
    if getattr(model, "lm_feature", False):
        model.lm_head.requires_grad_(False)
    return resolved


def keep_trainable(state_dict: dict[str, Any], module: nn.Module, prefix: str) -> None:
    """Remove the keys under `prefix` that are not trainable parameters of `module`, in place: a checkpoint of
    adapters (and of what trains beside them, e.g. a reward head) leaves the frozen base out."""
    trainable = {prefix + name for name, p in module.named_parameters() if p.requires_grad}
    for key in [k for k in state_dict if k.startswith(prefix) and k not in trainable]:
        del state_dict[key]


def load_trainable(module: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load what `keep_trainable` kept into a rebuilt base with adapters; a tensor that fits nowhere, or a trainable
    parameter the state lacks, is a `CheckpointError` naming `where` (the checkpoint does not fit its base)."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    lost = [k for k in missing if k in trainable]
    if unexpected or lost:
        raise CheckpointError(f"{where} does not fit its base: {(unexpected or lost)[0]!r}")


def count_parameters(model: nn.Module, trainable: bool | None = None) -> int:
    return sum(p.numel() for p in model.parameters() if trainable is None or p.requires_grad == trainable)
