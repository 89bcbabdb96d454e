"""The seed's bigram language model, kept for parity (`configs/seed/`).

Each next-token distribution depends on the current token only, so it cannot see the question: on the
seed task's 8 prompts its best is to answer "5" everywhere (7 of 8). Same interface as `GPT`.
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


class _NoCache:
    """The bigram keeps no keys or values: its cache has nothing to fill, repeat or reset."""

    static = False

    def repeat_rows(self, times: int) -> None:
        """Nothing per row to repeat."""

    def reset(self) -> None:
        """Nothing to empty."""


class BigramLM(nn.Module):
    def __init__(self, config: BigramConfig) -> None:
        super().__init__()
        self.config = config
        self.tok = nn.Embedding(config.vocab_size, config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)

    def new_cache(self, batch_size: int, max_len: int, static: bool = False, dtype: torch.dtype | None = None) -> _NoCache:
        return _NoCache()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        cache: _NoCache | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        if logits_to_keep:
            input_ids = input_ids[:, -logits_to_keep:]  # a bigram's logits at a position depend on its token only
        return self.head(self.tok(input_ids))  # (B, T or k, V)
