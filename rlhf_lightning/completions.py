"""Completion strings: `generation.generate` (the decode engine) followed by the tokenizer's decode, the one way
prompts become completion strings (training rollouts, evaluation, preference sampling, `rlhf eval`, the
pipeline's table). Formerly `rlhf_lightning.sampling`."""

from __future__ import annotations

import torch
import torch.nn as nn

from rlhf_lightning.generation import Generation, generate
from rlhf_lightning.tokenizer import Tokenizer

__all__ = ["complete"]


def complete(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_new_tokens: int,
    *,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    samples_per_prompt: int = 1,
    compile: bool = False,
) -> tuple[list[str], Generation]:
    """(completion texts, the generation) for left-padded prompts (B, P): sampled, or argmax with `greedy`.

    A text stops before EOS; `Generation.finished` says which rows emitted it. `batch_size`: rows per
    generation pass; `samples_per_prompt`: completions per prompt, prompt-major, its forward run once; `compile`:
    a captured decode step on CUDA (`generate`).
    """
    gen = generate(
        model, prompt_ids, prompt_mask, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id, temperature=temperature, top_k=top_k, greedy=greedy, generator=generator,
        batch_size=batch_size, samples_per_prompt=samples_per_prompt, compile=compile,
    )
    return [tokenizer.decode(row) for row in gen.completion_ids.tolist()], gen
