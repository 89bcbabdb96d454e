"""Scoring engines on models and text: token log-probs of a causal LM, the KL between two of them, the reward
model's score of (prompt, completion) strings, and reading a reward checkpoint (`load_reward_model`).

Every teacher-forced log-prob of a token under a policy or reference (SFT's loss, PPO's new and reference
log-probs) goes through `token_logprobs`: one forward for the whole batch, float32, at the sampling temperature,
the convention generation's log-probs follow too (so PPO's first ratio is 1).
`completion_kl` is the one definition of every reported KL figure (`eval/kl`, the pipeline's `test_kl`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from rlhf_lightning.checkpoints import read_checkpoint, submodule_state
from rlhf_lightning.lora import add_reward_adapters, load_trainable
from rlhf_lightning.losses import token_logprobs_and_entropy
from rlhf_lightning.models.reward import RewardModel
from rlhf_lightning.padding import right_pad
from rlhf_lightning.policy import check_base, load_plain_policy
from rlhf_lightning.tokenizer import Tokenizer, load_tokenizer

__all__ = ["completion_kl", "completion_mask", "encode_scored", "encode_scored_row", "load_reward_model", "pad_scored", "score_texts", "token_logprobs"]


def _next_token_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_len: int | None) -> torch.Tensor:
    """Logits (B, T-1, V) predicting tokens 1..T-1, or (B, N, V) predicting the last N = `completion_len`.

    With `completion_len`, the model computes the logits of the last N + 1 positions only (`logits_to_keep`): the
    prompt's positions never reach the LM head, so no (B, T, V) tensor exists (for a 50k vocabulary and a long
    prompt, the largest tensor of the update)."""
    if completion_len is None:
        return model(input_ids, attention_mask)[:, :-1]  # (B, T-1, V); position t predicts token t + 1
    # sliced again: a model that ignores the argument returns every position
    return model(input_ids, attention_mask, logits_to_keep=completion_len + 1)[:, -completion_len - 1 : -1]  # (B, N, V)


def token_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float = 1.0,
    completion_len: int | None = None,
    return_logits: bool = False,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Teacher-forced log-probs of each token given its prefix, under ``softmax(logits / temperature)``.

    Without `completion_len`: (B, T), entry ``[:, t]`` = ``log p(input_ids[:, t] | input_ids[:, :t])`` for t >= 1
    and 0.0 at t = 0 (no prefix). With `completion_len` = N: (B, N), the log-probs of the last N tokens only
    (a prompt ++ completion batch). `return_logits` also returns the logits (B, T-1 or N, V) they came from,
    e.g. for an accuracy, from the same forward; `return_entropy` also returns each position's entropy (no gradient),
    computed in the same pass over the logits. The pass keeps no float32 (B, N, V) copy for backward
    (`losses.token_logprobs_and_entropy`). Returned in the order (log-probs, logits, entropy).

    >>> class Table(nn.Module):  # logits after token 0 are [0, log 3]: p(1 | 0) = 0.75
    ...     def forward(self, ids, mask, logits_to_keep=0):
    ...         return torch.tensor([0.0, 1.0986123]).expand(*ids[:, -logits_to_keep:].shape, 2)
    >>> ids = torch.tensor([[0, 1]])
    >>> token_logprobs(Table(), ids, torch.ones_like(ids))
    tensor([[ 0.0000, -0.2877]])
    >>> token_logprobs(Table(), ids, torch.ones_like(ids), completion_len=1)
    tensor([[-0.2877]])
    """
    logits = _next_token_logits(model, input_ids, attention_mask, completion_len)
    targets = input_ids[:, 1:] if completion_len is None else input_ids[:, input_ids.size(1) - completion_len :]
    logprobs, entropy = token_logprobs_and_entropy(logits, targets, temperature, with_entropy=return_entropy)  # (B, T-1) or (B, N)
    if completion_len is None:
        logprobs = F.pad(logprobs, (1, 0), value=0.0)  # (B, T)
        entropy = None if entropy is None else F.pad(entropy, (1, 0), value=0.0)
    out = (logprobs, *((logits,) if return_logits else ()), *((entropy,) if return_entropy else ()))
    return out if len(out) > 1 else logprobs


def completion_kl(
    policy: nn.Module,
    reference: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_len: int,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Exact per-token KL(policy || reference) (B, N) of the next-token distributions at the last N positions
    of prompt ++ completion, at `temperature`: ``sum_v p(v) (log p(v) - log p_ref(v))``.

    The one KL behind every reported KL figure: averaged over a completion's tokens (mask them with the
    completion mask), it is `eval/kl` and the pipeline's `test_kl`.
    """
    logp = F.log_softmax(_next_token_logits(policy, input_ids, attention_mask, completion_len).float() / temperature, -1)
    ref = F.log_softmax(_next_token_logits(reference, input_ids, attention_mask, completion_len).float() / temperature, -1)
    return (logp.exp() * (logp - ref)).sum(-1)  # (B, N)


def encode_scored(
    tokenizer: Tokenizer, prompt: str, completion: str, ended: bool, where: str = "", completion_field: str = "completion"
) -> list[int]:
    """BOS + prompt + completion (+ EOS if it ended): the ids a reward model scores.

    `where` (e.g. "prefs.jsonl:3") locates errors: "prefs.jsonl:3: field 'prompt': unknown character ...".
    """
    return encode_scored_row(tokenizer, prompt, completion, ended, where, completion_field)[0]


def encode_scored_row(
    tokenizer: Tokenizer, prompt: str, completion: str, ended: bool, where: str = "", completion_field: str = "completion"
) -> tuple[list[int], int]:
    """(`encode_scored`'s ids, the prompt's length in them): where the completion starts."""
    at = f"{where}: " if where else ""
    prompt_ids = tokenizer.encode_prompt(prompt, f"{at}field 'prompt'")
    completion_ids = tokenizer.encode(completion, f"{at}field {completion_field!r}")
    return prompt_ids + completion_ids + ([tokenizer.eos_id] if ended else []), len(prompt_ids)


def completion_mask(prompt_lengths: Sequence[int], lengths: Sequence[int], width: int) -> torch.Tensor:
    """(B, width) bool, True on positions [prompt length, length) of right-padded rows: the completion."""
    pos = torch.arange(width)[None, :]  # (1, T)
    return (pos >= torch.tensor(prompt_lengths)[:, None]) & (pos < torch.tensor(lengths)[:, None])  # (B, T)


def pad_scored(rows: Sequence[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """A reward model's batch from `encode_scored_row` rows: right-padded `input_ids`, `attention_mask` and
    `completion_mask`, (B, T) each."""
    input_ids, attention_mask = right_pad([ids for ids, _ in rows], pad_id)
    completion = completion_mask([p for _, p in rows], [len(ids) for ids, _ in rows], input_ids.size(1))
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion}


def score_texts(
    model: RewardModel,
    tokenizer: Tokenizer,
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
    rows = [encode_scored_row(tokenizer, p, c, bool(e), where) for p, c, e in zip(prompts, completions, ended)]
    longest = max(len(ids) for ids, _ in rows)
    if longest > model.block_size:
        raise ValueError(f"{where + ': ' if where else ''}a scored sequence is {longest} tokens, the reward model's context is {model.block_size}")
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in pad_scored(rows, tokenizer.pad_id).items()}
    return model(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])  # (B,)


def load_reward_model(path: str, role: str = "reward_ckpt") -> tuple[RewardModel, Tokenizer, dict[str, Any]]:
    """(model in eval mode, its tokenizer, the checkpoint's "rlhf" metadata) of a reward checkpoint, read once.

    The metadata holds "stage" ("reward"), "model", "tokenizer", "reward_mean" and "reward_std". A reward model of
    LoRA adapters ("lora", "base") is built on its base, refused unless it has the recorded SHA-256
    (`policy.check_base`): an SFT checkpoint's transformer (read by `policy.load_plain_policy`) or an HF folder
    (read by the model's own config); the adapters are added, then the trained tensors (adapters, head) loaded.
    """
    checkpoint = read_checkpoint(path, ("reward",), role)
    meta, state = checkpoint["rlhf"], submodule_state(checkpoint, "model")
    if not meta.get("lora"):
        model = RewardModel(meta["model"])
        model.load_state_dict(state)
        return model.eval(), load_tokenizer(meta["tokenizer"]), meta
    base, where = meta["base"], f"{role}: {str(path)!r}"
    check_base(base, where)
    model = RewardModel(meta["model"])  # an HF backbone loads its folder's weights here
    if base["kind"] == "checkpoint":
        model.load_backbone(load_plain_policy(base["path"], role=f"{where} base")[0].state_dict())
    add_reward_adapters(model, meta["lora"])
    load_trainable(model, state, where)
    return model.eval(), load_tokenizer(meta["tokenizer"]), meta
