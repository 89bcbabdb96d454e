"""Hugging Face models behind the project's model interface (needs the `[hf]` extra).

`HFCausalLM` wraps any local `AutoModelForCausalLM` folder so it plugs in where the small transformer of
`models/gpt.py` does: `forward(input_ids, attention_mask=None, *, position_ids=None, cache=None) -> logits`,
`new_cache(batch_size, max_len)` and `config.block_size`. Positions come from the attention mask (as in
`gpt.py`), so left-padded rows in generation and right-padded rows in training see the positions they
would see alone. Generation's cache is transformers' `StaticCache`, allocated once for the whole prompt +
completion (`static_cache: true`, the default; an architecture that cannot use it is refused at load with one
line naming the option), or a `DynamicCache` that grows per token (`static_cache: false`).

`HFBackbone` is the reward model's encoder: final hidden states (B, T, C) of a local folder's base model.
When the folder holds an `AutoModelForSequenceClassification` with one label, its score head is kept and
the reward model reads it at the last real token (from the mask, never from `ids != pad`).

Nothing is downloaded: every folder is opened with `local_files_only=True`. transformers is imported on
first use, so the rest of the package works without the extra.

Sharded runs (`strategy.ShardedStrategy`) may read a folder on rank 0 only (`load_on_rank0: true`): the other ranks
build the model on the meta device, which holds no memory, and after sharding receive rank 0's weights, broadcast
tensor by tensor into their shards (`receive_rank0_weights`), and its buffers (rotary `inv_freq`, which no
checkpoint holds).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from rlhf_lightning.hf_files import import_transformers, local_folder
from rlhf_lightning.models.gpt import positions_from_mask
from rlhf_lightning.options import ConfigError

__all__ = ["HFBackbone", "HFCache", "HFCausalLM", "HFConfig", "check_rank0_loading", "full_state_for_broadcast", "receive_rank0_weights"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _torch_dtype(dtype: str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32  # trainable weights in float32; bf16-mixed precision runs the matmuls in bf16
    if dtype not in DTYPES:
        raise ValueError(f"hf model: dtype {dtype!r} is not one of {sorted(DTYPES)} (or null for float32)")
    return DTYPES[dtype]


def _context_length(hf_config: Any) -> int:
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1 << 30  # e.g. relative positions without a fixed table


@dataclass
class HFConfig:
    path: str = ""
    """Local folder written by `save_pretrained` (config, weights, tokenizer)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    dtype: str | None = None
    """Weights' dtype: null (float32, for training; use `--trainer.precision bf16-mixed` for speed),
    "bfloat16" or "float16" (e.g. a frozen model that only scores)."""
    static_cache: bool = True
    """Generate on transformers' preallocated `StaticCache` (needed by a captured decode step); false: the
    `DynamicCache`, which grows per token, for architectures without static-cache support."""
    load_on_rank0: bool = False
    """Under the sharded strategy, only rank 0 reads the folder's weights: every other process builds the model on
    the meta device (no memory) and receives rank 0's weights as they are sharded, then its buffers. The process's
    rank is Lightning's (`RANK`, `LOCAL_RANK` or `SLURM_PROCID`); with one process it changes nothing."""
    block_size: int = field(default=0, init=False)
    """Context length, read from the folder's config (`n_positions` or `max_position_embeddings`)."""
    vocab_size: int = field(default=0, init=False)
    """Rows of the input embedding, read from the loaded model."""


def _enable_checkpointing(model: nn.Module) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # training forwards; generation passes its cache explicitly


def _cache_argument(model: nn.Module) -> str:
    """Name of the forward's cache argument: `cache` in recent transformers 5, `past_key_values` before."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _static_cache_checks(lm: nn.Module, path: str, transformers: Any) -> tuple[str | None, str | None]:
    """(why `lm` cannot generate on a `StaticCache`, why a captured decode step would not be one graph for it);
    None where it can. transformers marks the architectures whose forward works on preallocated keys and values
    with `_can_compile_fullgraph`; its sliding-window static layers (Mistral, Gemma 2 and 3, ...) count positions
    in a Python int, which a compiled step sees change at every token. One probe cache answers both."""
    model_type = getattr(lm.config, "model_type", type(lm).__name__)

    def refused(reason: str) -> tuple[str, None]:
        return f"hf model {path!r} (model_type {model_type!r}): {reason}; set `static_cache: false` in the model's config", None

    if not getattr(lm, "_can_compile_fullgraph", False) or not lm._supports_default_dynamic_cache():
        return refused("its architecture does not support a preallocated KV cache")
    try:
        layers = transformers.StaticCache(config=lm.config, max_cache_len=1).layers
    except Exception as err:  # a layer type without a static form
        return refused(f"transformers' StaticCache refuses its config ({err})")
    others = sorted({type(layer).__name__ for layer in layers if type(layer) is not transformers.cache_utils.StaticLayer})
    if not others:
        return None, None
    return None, f"{model_type}'s decode step (its cache layers {others} change a Python value every token)"


class HFCache:
    """A transformers cache (`StaticCache` when `static`, else `DynamicCache`) behind the project's cache interface."""

    def __init__(self, inner: Any, static: bool) -> None:
        self.inner = inner
        self.static = static

    def repeat_rows(self, times: int) -> None:
        """Each row `times` times, consecutively (transformers' `batch_repeat_interleave` for a dynamic cache)."""
        if not self.static:
            self.inner.batch_repeat_interleave(times)
            return
        for layer in self.inner.layers:  # a static layer has no `batch_repeat_interleave`: new, larger buffers
            if getattr(layer, "is_initialized", False):
                layer.keys = layer.keys.repeat_interleave(times, 0)
                layer.values = layer.values.repeat_interleave(times, 0)
                layer.batch_size = layer.keys.size(0)

    def reset(self) -> None:
        """Empty again, buffers kept."""
        self.inner.reset()


class HFCausalLM(nn.Module):
    """A local `AutoModelForCausalLM` folder with the interface of `models.gpt.GPT`."""

    def __init__(self, config: HFConfig) -> None:
        super().__init__()
        transformers = import_transformers()
        config.path = local_folder(config.path)
        self.config = config
        if config.load_on_rank0 and _process_rank() > 0:  # the weights come from rank 0 once sharded
            hf_config = transformers.AutoConfig.from_pretrained(config.path, local_files_only=True)
            with torch.device("meta"):
                self.lm = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=_torch_dtype(config.dtype))
            self.lm.eval()  # as from_pretrained leaves it (dropout off until a Trainer sets training mode)
        else:
            self.lm = transformers.AutoModelForCausalLM.from_pretrained(
                config.path, local_files_only=True, dtype=_torch_dtype(config.dtype)
            )
        config.block_size = _context_length(self.lm.config)
        config.vocab_size = self.lm.get_input_embeddings().num_embeddings
        if config.gradient_checkpointing:
            self.enable_gradient_checkpointing()
        self._cache_arg = _cache_argument(self.lm)
        self._cache_cls = transformers.StaticCache if config.static_cache else transformers.DynamicCache
        refusal, self.capture_refusal = _static_cache_checks(self.lm, config.path, transformers) if config.static_cache else (None, None)
        if refusal:
            raise ConfigError(refusal)

    def enable_gradient_checkpointing(self) -> None:
        self.config.gradient_checkpointing = True
        _enable_checkpointing(self.lm)

    def new_cache(self, batch_size: int, max_len: int, static: bool = False, dtype: torch.dtype | None = None) -> HFCache:
        """An empty cache for `max_len` positions: transformers' `StaticCache` (`static_cache: true`), or a
        `DynamicCache` that grows per token. `static=True` (a captured decode step) needs the static one. Both take
        the dtype of the first keys written (`dtype` is GPT's argument, unused here)."""
        if not self.config.static_cache:
            if static:
                raise ConfigError("a captured decode step (compile: true) needs the hf model's `static_cache: true`")
            return HFCache(self._cache_cls(config=self.lm.config), static=False)
        return HFCache(self._cache_cls(config=self.lm.config, max_cache_len=max_len), static=True)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        cache: HFCache | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Logits (B, T, V) for `input_ids` (B, T), or (B, k, V) with `logits_to_keep` = k > 0; the same contract as
        `GPT.forward`.

        Without a cache, `attention_mask` (B, T) marks real tokens (None: all real). With a cache,
        `attention_mask` (B, S) covers the cached positions and the new ones (S = cached + T); with a static cache
        it may also cover the whole buffer (B, max_len), as a captured decode step passes it.
        """
        T = input_ids.size(1)
        if position_ids is None and attention_mask is not None:
            position_ids = positions_from_mask(attention_mask)[:, -T:]  # (B, T)
        if attention_mask is None:  # all real (e.g. right-padded training rows under causal attention)
            attention_mask = torch.ones_like(input_ids)
        mask = attention_mask.long()  # (B, S)
        if cache is None:
            out = self.lm(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False, logits_to_keep=logits_to_keep)
        else:
            out = self.lm(
                input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                logits_to_keep=logits_to_keep, **{self._cache_arg: cache.inner},
            )
        return out.logits  # (B, T, V)


def _process_rank() -> int:
    """This process's global rank as the launcher set it (Lightning's reading of RANK, LOCAL_RANK, SLURM_PROCID);
    0 without one."""
    from lightning.fabric.utilities.rank_zero import _get_rank

    return _get_rank() or 0


def _loads_on_rank0(root: nn.Module) -> bool:
    return any(isinstance(m, HFCausalLM) and m.config.load_on_rank0 for m in root.modules())


def check_rank0_loading(module: nn.Module, sharded: bool) -> None:
    """Refuse `load_on_rank0` when the strategy will not shard the model, so no broadcast would fill the other ranks'
    models; on every rank alike (rank 0 stops before it starts the other processes)."""
    if not sharded and _loads_on_rank0(module):
        raise ConfigError(
            "model.init_args.model.load_on_rank0: true needs the sharded strategy "
            "(--trainer.strategy=rlhf_lightning.strategy.ShardedStrategy): this process has no weights of its own"
        )


def full_state_for_broadcast(root: nn.Module) -> dict[str, torch.Tensor] | None:
    """Before `root` is sharded: its whole state dict on rank 0 when it holds an `HFCausalLM` with `load_on_rank0`
    (references to the loaded tensors, no copy), {} on the other ranks; None when nothing loads on rank 0."""
    if not _loads_on_rank0(root):
        return None
    import torch.distributed as dist

    return root.state_dict() if dist.get_rank() == 0 else {}


def receive_rank0_weights(root: nn.Module, full_state: dict[str, torch.Tensor], device: torch.device) -> None:
    """After `root` is sharded: the ranks that built it on the meta device allocate their shards on `device`, then
    every rank takes rank 0's `full_state`, broadcast tensor by tensor and kept as each rank's shard
    (`set_model_state_dict(..., full_state_dict=True, broadcast_from_rank0=True)`); buffers, which are not sharded
    and not all in a state dict (a rotary `inv_freq` is non-persistent), are broadcast whole. A collective: every
    rank calls it for the same roots in the same order."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if any(t.is_meta for t in (*root.parameters(), *root.buffers())):
        root.to_empty(device=device)
    set_model_state_dict(root, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buffer in root.buffers():
        dist.broadcast(buffer.data, src=0)


def _is_sequence_classifier(hf_config: Any) -> bool:
    return any(name.endswith("ForSequenceClassification") for name in (getattr(hf_config, "architectures", None) or []))


class HFBackbone(nn.Module):
    """Final hidden states (B, T, C) of a local folder's base model, for a scalar reward head.

    Built with `from_folder`, which also returns the folder's own score head (a one-label
    `...ForSequenceClassification` folder), else None: the reward model that owns the head registers it.
    """

    def __init__(self, encoder: nn.Module, path: str, width: int, block_size: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.path = path
        self.width = width
        self.block_size = block_size
        self.vocab_size = encoder.get_input_embeddings().num_embeddings

    @classmethod
    def from_folder(cls, path: str, gradient_checkpointing: bool = False, dtype: str | None = None) -> tuple["HFBackbone", nn.Linear | None]:
        transformers = import_transformers()
        path = local_folder(path, "reward model")
        hf_config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        score_head: nn.Linear | None = None
        if _is_sequence_classifier(hf_config):
            if hf_config.num_labels != 1:
                raise ValueError(f"hf reward model {path!r}: a sequence classifier needs num_labels=1, it has {hf_config.num_labels}")
            full = transformers.AutoModelForSequenceClassification.from_pretrained(
                path, local_files_only=True, dtype=_torch_dtype(dtype)
            )
            head = getattr(full, "score", None) or getattr(full, "classifier", None)
            if not isinstance(head, nn.Linear):
                raise ValueError(f"hf reward model {path!r}: no linear score head found on {type(full).__name__}")
            encoder, score_head = full.base_model, head
        else:
            encoder = transformers.AutoModel.from_pretrained(path, local_files_only=True, dtype=_torch_dtype(dtype))
        if gradient_checkpointing:
            _enable_checkpointing(encoder)
        text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
        return cls(encoder, path, int(text.hidden_size), _context_length(hf_config)), score_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        position_ids = positions_from_mask(attention_mask)  # (B, T)
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask.long(), position_ids=position_ids, use_cache=False)
        return out.last_hidden_state  # (B, T, C)
