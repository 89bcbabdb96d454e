"""The seed's bigram language model, kept for parity (`configs/seed/`).

Each next-token distribution depends on the current token only, so it cannot see the question: on the
seed's 8 prompts its best is to answer "5" everywhere (7 of 8). Same interface as `GPT`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn


@dataclass
class BigramConfig:
    vocab_size: int = 21
    n_embd: int = 64
    block_size: int = 1024
    """Bigram has no position table; kept so every model reports a context length."""

    def to_dict(self) -> dict:
        return asdict(self)


class _StepCounter:
    """The bigram needs no keys or values; generation only needs the cache's `length`."""

    def __init__(self) -> None:
        self.length = 0

    def repeat_rows(self, times: int) -> None:
        """Nothing per row to repeat: a bigram keeps no keys or values."""


class BigramLM(nn.Module):
    def __init__(self, config: BigramConfig) -> None:
        super().__init__()
        self.config = config
        self.tok = nn.Embedding(config.vocab_size, config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)

    def new_cache(self, batch_size: int, max_len: int) -> _StepCounter:
        return _StepCounter()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        cache: _StepCounter | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        if cache is not None:
            cache.length += input_ids.size(1)
        if logits_to_keep:
            input_ids = input_ids[:, -logits_to_keep:]  # a bigram's logits at a position depend on its token only
        return self.head(self.tok(input_ids))  # (B, T or k, V)
