"""Reward models: a scalar score for a tokenized prompt + completion, read at the last real token.

Backbones are registered by kind in `REWARD_BACKBONES`, chosen by `config["type"]`:

- ``"gpt"``: the causal transformer of `models/gpt.py` (so it can be initialized from an SFT policy) with
  its LM head replaced by the identity; a linear head maps the final hidden state of the last real token
  to a score. Causal attention means that state has seen the whole prompt and completion.
- ``"hf"``: a local Hugging Face folder's base model (`models/hf.py`), read the same way; a one-label
  sequence classifier keeps its own score head.
- ``"mean_embedding"``: the seed's model, for parity: the mean of the token embeddings, then a linear
  head. Additive over tokens, it cannot express "this answer fits this question".

Tokenizing and scoring strings, and reading reward checkpoints, are in `rlhf_lightning.scoring`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from rlhf_lightning.losses import logprobs_from_logits, masked_sum
from rlhf_lightning.models.gpt import GPT, GPTConfig

__all__ = ["REWARD_BACKBONES", "REWARD_TYPES", "RewardModel", "last_token_index"]


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token, whatever the padding side: [[1,1,0],[0,1,1]] -> [1, 2].

    A row with no real token gets 0.

    >>> last_token_index(torch.tensor([[1, 1, 0], [0, 1, 1], [0, 0, 0]]))
    tensor([1, 2, 0])
    """
    T = attention_mask.size(-1)
    positions = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)  # (B, T)
    return torch.where(attention_mask.bool(), positions, -1).amax(-1).clamp_min(0)  # (B,)


class _MeanEmbedding(nn.Module):
    """The mean-embedding encoder: mean of the real tokens' embeddings (the seed averaged over padding too)."""

    def __init__(self, vocab_size: int, n_embd: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab_size, n_embd)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        weights = attention_mask.to(self.emb.weight.dtype).unsqueeze(-1)  # (B, T, 1)
        summed = (self.emb(input_ids) * weights).sum(1)  # (B, C)
        return summed / weights.sum(1).clamp_min(1.0)  # (B, C)


@dataclass
class Backbone:
    """What a kind's builder returns: the encoder, its width and context, and how it is read."""

    module: nn.Module  # (input_ids (B, T), attention_mask (B, T)) -> hidden states (B, T, C), or pooled (B, C)
    width: int
    block_size: int
    pooled: bool = False  # the module returns one vector per row (no last-token read)
    head: nn.Linear | None = None  # a head that comes with the backbone (an HF sequence classifier's)
    lm_vocab: int | None = None  # with the "lm_feature": the vocabulary of an LM head on the hidden states
    config: dict[str, Any] | None = None  # values to record in the model's config (e.g. an absolute path)


def _gpt(config: dict[str, Any]) -> Backbone:
    lm_feature = bool(config.pop("lm_feature", False))
    gpt_config = GPTConfig(**config)
    gpt = GPT(gpt_config)
    gpt.lm_head = nn.Identity()  # its forward now returns final hidden states (B, T, C)
    return Backbone(gpt, gpt_config.n_embd, gpt_config.block_size, lm_vocab=gpt_config.vocab_size if lm_feature else None)


def _hf(config: dict[str, Any]) -> Backbone:
    from rlhf_lightning.models.hf import HFBackbone  # imported on use: needs the [hf] extra

    vocab_size = config.pop("vocab_size", None)  # the tokenizer's, when the module adds it
    backbone, head = HFBackbone.from_folder(**config)
    if vocab_size is not None and vocab_size > backbone.vocab_size:
        raise ValueError(f"the tokenizer has {vocab_size} ids, the model embeds only {backbone.vocab_size}")
    return Backbone(backbone, backbone.width, backbone.block_size, head=head, config={"path": backbone.path})


def _mean_embedding(config: dict[str, Any]) -> Backbone:
    vocab_size, width = config.pop("vocab_size"), config.pop("n_embd", 64)
    block_size = config.pop("block_size", 1024)
    if config:
        raise TypeError(f"unexpected keys {sorted(config)}")
    return Backbone(_MeanEmbedding(vocab_size, width), width, block_size, pooled=True)


#: Reward-model kinds: `config["type"]` -> builder of the backbone from the rest of the config.
REWARD_BACKBONES: dict[str, Callable[[dict[str, Any]], Backbone]] = {"gpt": _gpt, "mean_embedding": _mean_embedding, "hf": _hf}
REWARD_TYPES = tuple(REWARD_BACKBONES)


class RewardModel(nn.Module):
    """`forward(input_ids (B, T), attention_mask (B, T)) -> scores (B,)`, built from a plain config dict.

    Config: ``{"type": "gpt", "vocab_size": V, ...GPTConfig fields}``,
    ``{"type": "hf", "path": folder, ...}`` or ``{"type": "mean_embedding", "vocab_size": V, "n_embd": 64}``.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        config = dict(config)
        kind = config.pop("type", "gpt")
        if kind not in REWARD_BACKBONES:
            raise ValueError(f"unknown reward model type {kind!r}; choose one of {list(REWARD_TYPES)}")
        try:
            built = REWARD_BACKBONES[kind](dict(config))
        except (TypeError, KeyError) as err:
            raise ValueError(f"reward model config for {kind!r}: {err}") from None
        self.config = {"type": kind, **config, **(built.config or {})}
        self.backbone = built.module
        self.pooled = built.pooled
        self.block_size = built.block_size
        if built.lm_vocab is not None:  # the policy's LM head scores the completion's log-likelihood
            self.lm_head = nn.Linear(built.width, built.lm_vocab, bias=False)
            self.lm_scale = nn.Parameter(torch.ones(()))
        if built.head is not None:
            self.head = built.head
        else:
            self.head = nn.Linear(built.width, 1)
            nn.init.normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        self.register_load_state_dict_pre_hook(_renamed_encoder)

    @property
    def kind(self) -> str:
        return self.config["type"]

    @property
    def lm_feature(self) -> bool:
        return hasattr(self, "lm_head")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Scores (B,). With `lm_feature`, `completion_mask` (B, T) marks the completion's tokens (EOS included)
        and the score adds `lm_scale` times their summed log-likelihood under the LM head."""
        return self.score_and_logprobs(input_ids, attention_mask, completion_mask)[0]

    def score_and_logprobs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scores (B,), token log-probs (B, T-1) of token t+1 given tokens <= t under the LM head, or None
        without `lm_feature`)."""
        hidden = self.backbone(input_ids, attention_mask)  # (B, T, C), or (B, C) pooled
        if self.pooled:
            return self.head(hidden).squeeze(-1), None  # (B,)
        last = last_token_index(attention_mask)  # (B,)
        picked = hidden[torch.arange(hidden.size(0), device=hidden.device), last]  # (B, C)
        score = self.head(picked).squeeze(-1)  # (B,)
        if not self.lm_feature:
            return score, None
        if completion_mask is None:
            raise ValueError("this reward model scores the completion's likelihood: pass completion_mask")
        logp = logprobs_from_logits(self.lm_head(hidden[:, :-1]), input_ids[:, 1:])  # (B, T-1)
        return score + self.lm_scale * masked_sum(logp, completion_mask[:, 1:].bool(), dim=1), logp  # (B,), (B, T-1)

    def load_backbone(self, policy_state: dict[str, torch.Tensor]) -> None:
        """Initialize the transformer from a GPT policy's state dict (its LM head is not used)."""
        if self.kind != "gpt":
            raise ValueError(f"only a 'gpt' reward model can be initialized from a policy, this one is {self.kind!r}")
        state = {k: v for k, v in policy_state.items() if not k.startswith("lm_head.")}
        self.backbone.load_state_dict(state, strict=True)
        if self.lm_feature:
            self.lm_head.weight.data.copy_(policy_state["lm_head.weight"])


def _renamed_encoder(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Checkpoints of the mean-embedding model written before it was a `backbone` name it `encoder`."""
    for key in [k for k in state_dict if k.startswith(prefix + "encoder.")]:
        state_dict[prefix + "backbone." + key[len(prefix + "encoder.") :]] = state_dict.pop(key)
