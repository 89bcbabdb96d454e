"""Reward models: a scalar score for a tokenized prompt + completion, read at the last real token.

The text a reward model scores is BOS + prompt + completion, then EOS if the completion ended
(`encode_scored`). `score_texts` scores strings in one batched forward; `load_reward_model` rebuilds a
model from a reward checkpoint with no config file.

Two backbones, chosen by `config["type"]`:

- ``"gpt"``: the causal transformer of `models/gpt.py` (so it can be initialized from an SFT policy) with
  its LM head replaced by the identity; a linear head maps the final hidden state of the last real token
  to a score. Causal attention means that state has seen the whole prompt and completion.
- ``"mean_embedding"``: the seed's model, for parity: the mean of the token embeddings, then a linear
  head. Additive over tokens, it cannot express "this answer fits this question".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from rlhf_lightning.checkpoints import read_checkpoint, submodule_state
from rlhf_lightning.data.collate import right_pad
from rlhf_lightning.losses import logprobs_from_logits, masked_sum
from rlhf_lightning.models.gpt import GPT, GPTConfig
from rlhf_lightning.tokenizer import CharTokenizer, load_tokenizer

__all__ = ["REWARD_TYPES", "RewardModel", "completion_mask", "encode_scored", "last_token_index", "load_reward_model", "score_texts"]

REWARD_TYPES = ("gpt", "mean_embedding", "hf")


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token, whatever the padding side: [[1,1,0],[0,1,1]] -> [1, 2].

    A row with no real token gets 0.
    """
    T = attention_mask.size(-1)
    positions = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)  # (B, T)
    return torch.where(attention_mask.bool(), positions, -1).amax(-1).clamp_min(0)  # (B,)


class _MeanEmbedding(nn.Module):
    """The seed's encoder: mean of the real tokens' embeddings (padding excluded, unlike the seed)."""

    def __init__(self, vocab_size: int, n_embd: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab_size, n_embd)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        weights = attention_mask.to(self.emb.weight.dtype).unsqueeze(-1)  # (B, T, 1)
        summed = (self.emb(input_ids) * weights).sum(1)  # (B, C)
        return summed / weights.sum(1).clamp_min(1.0)  # (B, C)


class RewardModel(nn.Module):
    """`forward(input_ids (B, T), attention_mask (B, T)) -> scores (B,)`, built from a plain config dict.

    Config: ``{"type": "gpt", "vocab_size": V, ...GPTConfig fields}`` or
    ``{"type": "mean_embedding", "vocab_size": V, "n_embd": 64, "block_size": 1024}``.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        config = dict(config)
        kind = config.pop("type", "gpt")
        self.config = {"type": kind, **config}
        try:
            if kind == "gpt":
                lm_feature = bool(config.pop("lm_feature", False))
                gpt_config = GPTConfig(**config)
                self.backbone = GPT(gpt_config)
                self.backbone.lm_head = nn.Identity()  # its forward now returns final hidden states (B, T, C)
                self.block_size = gpt_config.block_size
                width = gpt_config.n_embd
                if lm_feature:  # the policy's LM head scores the completion's log-likelihood
                    self.lm_head = nn.Linear(width, gpt_config.vocab_size, bias=False)
                    self.lm_scale = nn.Parameter(torch.ones(()))
            elif kind == "hf":
                from rlhf_lightning.models.hf import HFBackbone  # imported on use: needs the [hf] extra

                vocab_size = config.pop("vocab_size", None)  # the tokenizer's, when the module adds it
                self.backbone = HFBackbone(**config)
                self.config["path"] = self.backbone.path  # absolute: checkpoints reload from any directory
                if vocab_size is not None and vocab_size > self.backbone.vocab_size:
                    raise ValueError(f"the tokenizer has {vocab_size} ids, the model embeds only {self.backbone.vocab_size}")
                self.block_size, width = self.backbone.block_size, self.backbone.width
            elif kind == "mean_embedding":
                vocab_size, width = config.pop("vocab_size"), config.pop("n_embd", 64)
                self.block_size = config.pop("block_size", 1024)
                if config:
                    raise TypeError(f"unexpected keys {sorted(config)}")
                self.encoder = _MeanEmbedding(vocab_size, width)
            else:
                raise ValueError(f"unknown reward model type {kind!r}; choose one of {list(REWARD_TYPES)}")
        except (TypeError, KeyError) as err:
            raise ValueError(f"reward model config for {kind!r}: {err}") from None
        self.head = nn.Linear(width, 1)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        if kind == "hf" and self.backbone.score_head is not None:  # a one-label sequence classifier's own head
            self.head = self.backbone.score_head

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
        if self.kind == "mean_embedding":
            return self.head(self.encoder(input_ids, attention_mask)).squeeze(-1), None  # (B,)
        hidden = self.backbone(input_ids, attention_mask)  # (B, T, C)
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


def encode_scored(
    tokenizer: CharTokenizer, prompt: str, completion: str, ended: bool, where: str = "", completion_field: str = "completion"
) -> list[int]:
    """BOS + prompt + completion (+ EOS if it ended): the ids a reward model scores.

    `where` (e.g. "prefs.jsonl:3") locates errors: "prefs.jsonl:3: field 'prompt': unknown character ...".
    """
    at = f"{where}: " if where else ""
    prompt_ids = tokenizer.encode_prompt(prompt, f"{at}field 'prompt'")
    completion_ids = tokenizer.encode(completion, f"{at}field {completion_field!r}")
    return prompt_ids + completion_ids + ([tokenizer.eos_id] if ended else [])


def completion_mask(prompt_lengths: Sequence[int], lengths: Sequence[int], width: int) -> torch.Tensor:
    """(B, width) bool, True on positions [prompt length, length) of right-padded rows: the completion."""
    pos = torch.arange(width)[None, :]  # (1, T)
    return (pos >= torch.tensor(prompt_lengths)[:, None]) & (pos < torch.tensor(lengths)[:, None])  # (B, T)


def score_texts(
    model: RewardModel,
    tokenizer: CharTokenizer,
    prompts: Sequence[str],
    completions: Sequence[str],
    ended: Sequence[bool] | torch.Tensor,
    where: str = "",
) -> torch.Tensor:
    """Scores (B,) of (prompt, completion) strings in one batched forward on the model's device.

    Gradients follow the caller's context (wrap in `torch.no_grad()` for a frozen model).
    """
    if not len(prompts) == len(completions) == len(ended):
        raise ValueError(f"got {len(prompts)} prompts, {len(completions)} completions, {len(ended)} ended flags")
    if isinstance(ended, torch.Tensor):
        ended = ended.tolist()
    seqs = [encode_scored(tokenizer, p, c, bool(e), where) for p, c, e in zip(prompts, completions, ended)]
    longest = max(len(s) for s in seqs)
    if longest > model.block_size:
        raise ValueError(f"{where + ': ' if where else ''}a scored sequence is {longest} tokens, the reward model's context is {model.block_size}")
    ids, mask = right_pad(seqs, tokenizer.pad_id)  # (B, T), (B, T)
    completion = completion_mask([len(tokenizer.encode_prompt(p)) for p in prompts], [len(x) for x in seqs], ids.size(1))
    device = next(model.parameters()).device
    return model(ids.to(device), mask.to(device), completion.to(device))  # (B,)


def load_reward_model(path: str, role: str = "reward_ckpt") -> tuple[RewardModel, CharTokenizer, dict[str, Any]]:
    """(model in eval mode, its tokenizer, the checkpoint's "rlhf" metadata) of a reward checkpoint.

    The metadata holds "stage" ("reward"), "model", "tokenizer", "reward_mean" and "reward_std".
    """
    checkpoint = read_checkpoint(path, ("reward",), role)
    meta = checkpoint["rlhf"]
    model = RewardModel(meta["model"])
    model.load_state_dict(submodule_state(checkpoint, "model"))
    return model.eval(), load_tokenizer(meta["tokenizer"]), meta
