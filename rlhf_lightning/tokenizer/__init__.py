"""Tokenizers: the `Tokenizer` protocol, the character tokenizer, and `load_tokenizer` for every kind.

A tokenizer travels inside checkpoints as its `to_dict()`; `load_tokenizer` rebuilds it by `type`:
"char" (`CharTokenizer`) or "hf" (`HFTokenizer`, a local Hugging Face folder; needs the `[hf]` extra).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rlhf_lightning.tokenizer.base import Tokenizer, UnknownCharacterError, require_text
from rlhf_lightning.tokenizer.char import SPECIAL_TOKENS, CharTokenizer

__all__ = ["CharTokenizer", "SPECIAL_TOKENS", "Tokenizer", "UnknownCharacterError", "load_tokenizer", "require_text"]


def load_tokenizer(d: Mapping[str, Any]) -> Tokenizer:
    """A tokenizer from its `to_dict()` description, by `type`: "char" (`CharTokenizer`) or "hf" (`HFTokenizer`)."""
    kind = d.get("type") if isinstance(d, Mapping) else None
    if kind == "hf":
        from rlhf_lightning.tokenizer.hf import HFTokenizer  # imported on use: needs the [hf] extra

        return HFTokenizer.from_dict(d)
    return CharTokenizer.from_dict(d)  # "char", or a clear error naming the unknown type
