"""Batched sampling with a KV cache: every prompt of a batch at once, one new token per row per step.

Prompts are left-padded; positions come from the attention mask, so a row's tokens and log-probs do not
depend on the other rows' padding. A row that has emitted EOS produces only padding afterwards. The
returned log-probs are those of the sampled tokens under the full (untruncated) temperature-scaled
softmax: exactly what `logprobs_from_logits(logits, ids, temperature)` gives in a teacher-forced pass,
so PPO's first importance ratio is 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from rlhf_lightning.models.gpt import positions_from_mask


@dataclass
class Generation:
    completion_ids: torch.Tensor  # (B, N) sampled ids, `pad_id` after a row's end
    completion_mask: torch.Tensor  # (B, N) bool, True on generated tokens (EOS included)
    logprobs: torch.Tensor  # (B, N) float32 log-probs of the sampled tokens, 0 outside the mask
    lengths: torch.Tensor  # (B,) number of generated tokens, EOS included
    finished: torch.Tensor  # (B,) bool, True where the row emitted EOS

    def joined(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (B, P + N), bool mask (B, P + N)): the left-padded prompts ++ the right-padded completions."""
        return torch.cat([prompt_ids, self.completion_ids], 1), torch.cat([prompt_mask.bool(), self.completion_mask], 1)


def completion_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_len: int) -> torch.Tensor:
    """Logits (B, N, V) predicting each of the last N = `completion_len` tokens, from one forward over the
    whole prompt ++ completion (positions come from the mask)."""
    P = input_ids.size(1) - completion_len
    return model(input_ids, attention_mask)[:, P - 1 : -1]  # (B, N, V): position t predicts token t + 1


def mask_from_lengths(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """Right-aligned-free mask: lengths [2, 0] with max_len 3 -> [[1,1,0],[0,0,0]] (bool)."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]  # (B, N)


def _sample(scaled: torch.Tensor, top_k: int | None, generator: torch.Generator | None) -> torch.Tensor:
    """Sample one id per row from temperature-scaled logits (B, V), optionally keeping the top k only."""
    if top_k is not None and top_k < scaled.size(-1):
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]  # (B, 1)
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = F.softmax(scaled, dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> Generation:
    """Complete a left-padded batch of prompts (B, P); see the module docstring for the contract."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature} (use greedy=True for argmax)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    B, P = prompt_ids.shape
    device = prompt_ids.device
    mask = prompt_mask.bool()
    prompt_lengths = mask.sum(-1)  # (B,)
    block_size = getattr(getattr(model, "config", None), "block_size", None)
    if block_size is not None and int(prompt_lengths.max()) + max_new_tokens > block_size:
        raise ValueError(
            f"prompt of {int(prompt_lengths.max())} tokens + max_new_tokens={max_new_tokens} exceeds the "
            f"model's context (block_size={block_size})"
        )

    was_training = model.training
    model.eval()
    cache = model.new_cache(B, P + max_new_tokens)
    logits = model(prompt_ids, mask, position_ids=positions_from_mask(mask), cache=cache)[:, -1]  # (B, V)
    next_pos = prompt_lengths.clone()  # (B,) position of the token about to be generated

    out_ids = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    out_lp = torch.zeros(B, max_new_tokens, dtype=torch.float32, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    ones = torch.ones(B, 1, dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        scaled = logits.float() / temperature  # (B, V)
        token = scaled.argmax(-1) if greedy else _sample(scaled, top_k, generator)  # (B,)
        logprob = F.log_softmax(scaled, dim=-1).gather(-1, token[:, None]).squeeze(-1)  # (B,)
        alive = ~finished
        out_ids[:, t] = torch.where(alive, token, pad_id)
        out_lp[:, t] = torch.where(alive, logprob, 0.0)
        lengths += alive.long()
        finished |= alive & (token == eos_id)
        if t == max_new_tokens - 1 or bool(finished.all()):
            break
        mask = torch.cat([mask, ones], dim=1)  # (B, P + t + 1)
        step_ids = out_ids[:, t : t + 1]  # (B, 1): exactly one new token per row
        logits = model(step_ids, mask, position_ids=next_pos[:, None], cache=cache)[:, -1]  # (B, V)
        next_pos += 1
    model.train(was_training)
    return Generation(
        completion_ids=out_ids,
        completion_mask=mask_from_lengths(lengths, max_new_tokens),
        logprobs=out_lp,
        lengths=lengths,
        finished=finished,
    )
