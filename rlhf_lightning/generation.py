"""Batched sampling with a KV cache: every prompt of a batch at once, one new token per row per step.

Prompts are left-padded; positions come from the attention mask, so a row's tokens and log-probs do not
depend on the other rows' padding. A row that has emitted EOS produces only padding afterwards. The
returned log-probs are those of the sampled tokens under the full (untruncated) temperature-scaled
softmax: exactly what `logprobs_from_logits(logits, ids, temperature)` gives in a teacher-forced pass,
so PPO's first importance ratio is 1.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from rlhf_lightning.distributed import max_over_ranks
from rlhf_lightning.models.gpt import positions_from_mask
from rlhf_lightning.padding import pad_columns
from rlhf_lightning.sharding import all_ranks, compute_dtype, gathered_for_decode, in_lockstep


@dataclass
class Generation:
    completion_ids: torch.Tensor  # (B, N) sampled ids, `pad_id` after a row's end
    completion_mask: torch.Tensor  # (B, N) bool, True on generated tokens (EOS included)
    logprobs: torch.Tensor  # (B, N) float32 log-probs of the sampled tokens, 0 outside the mask
    lengths: torch.Tensor  # (B,) number of generated tokens, EOS included
    finished: torch.Tensor  # (B,) bool, True where the row emitted EOS

    @staticmethod
    def cat(parts: list["Generation"], pad_id: int) -> "Generation":
        """The rows of every part in order, completions right-padded to the widest part's N."""
        if len(parts) == 1:
            return parts[0]
        N = max(g.completion_ids.size(1) for g in parts)
        return Generation(
            torch.cat([pad_columns(g.completion_ids, N, pad_id) for g in parts]),
            torch.cat([pad_columns(g.completion_mask, N, False) for g in parts]),
            torch.cat([pad_columns(g.logprobs, N, 0.0) for g in parts]),
            torch.cat([g.lengths for g in parts]),
            torch.cat([g.finished for g in parts]),
        )

    def joined(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (B, P + N), bool mask (B, P + N)): the left-padded prompts ++ the right-padded completions."""
        return torch.cat([prompt_ids, self.completion_ids], 1), torch.cat([prompt_mask.bool(), self.completion_mask], 1)


def _sample(scaled: torch.Tensor, top_k: int | None, generator: torch.Generator | None) -> torch.Tensor:
    """Sample one id per row from temperature-scaled logits (B, V), optionally keeping the top k only."""
    if top_k is not None and top_k < scaled.size(-1):
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]  # (B, 1)
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = F.softmax(scaled, dim=-1)  # (B, V)
    # torch.multinomial's own draw for one sample on CPU and CUDA (p / q, q ~ Exp(1), argmax: the same ids from the
    # same generator state), without its input checks (about ten small kernels a token); non-finite logits are
    # caught once per call instead
    q = torch.empty_like(probs).exponential_(generator=generator)  # (B, V)
    return probs.div_(q).argmax(-1)  # (B,)


def _ended_rows(completion_ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(alive (B, N) bool, finished (B,) bool) from the raw sampled ids (B, N): a token is kept while no
    EOS came before it. Raw [[5, EOS, 7], [4, 6, 8]] -> alive [[1, 1, 0], [1, 1, 1]], finished [1, 0]."""
    eos = completion_ids == eos_id  # (B, N)
    eos_before = eos.cumsum(1) - eos.long()  # (B, N) EOS strictly before each position
    alive = eos_before == 0  # (B, N)
    return alive, (eos & alive).any(1)


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
    batch_size: int | None = None,
    samples_per_prompt: int = 1,
    compile: bool = False,
) -> Generation:
    """Complete a left-padded batch of prompts (B, P); see the module docstring for the contract.

    `samples_per_prompt` = K completes each prompt K times: B * K rows, prompt i's in rows i * K .. i * K + K - 1,
    the same rows (tokens, log-probs, generator draws) as `prompt_ids.repeat_interleave(K, 0)` would give. The
    prompt's forward runs once per prompt and its keys, values and last logits are repeated K times (a model's
    cache implements `repeat_rows`).
    `batch_size` (None: all rows in one pass) generates the rows in consecutive passes of at most that many
    rows (whole prompts' groups, at least one prompt a pass), so the KV cache and each step's activations are
    held for one pass's rows only; a sampled pass draws from `generator` where the previous one left it.

    Every buffer is allocated once: the attention mask (B, P + N), the sampled ids and their log-probs (B, N),
    and one step's temperature-scaled logits (B, V) (memory does not grow with the vocabulary x length). Rows keep
    sampling after their EOS (those tokens are replaced by pad at the end); whether every row has ended
    is read back from the device only every `_CHECK_EVERY` steps.

    `compile=True` captures the decode step on a CUDA device (`torch.compile(mode="reduce-overhead")`: CUDA
    graphs): the model runs on a static cache kept per model and shape (`new_cache(..., static=True)`), every
    step sees the same shapes (the attention mask of the whole buffer, the write position a device tensor), and
    each prompt's forward runs once per sample. Elsewhere it warns once and decodes eagerly.

    A model sharded over several ranks (`sharding.in_lockstep`) decodes in lockstep: each forward all-gathers the
    blocks' weights, a collective every rank must join, so the ranks make the same number of passes (a rank with
    fewer prompts runs extra greedy passes whose rows are dropped) and of steps: whether every row has ended is
    agreed by an all-reduce, and a rank whose rows have all ended keeps stepping until every rank's have. Its rows
    are unchanged by the extra steps (tokens after EOS become padding). The cache is allocated in the dtype the
    sharded model computes in; with the policy's `gather_for_generation` the weights stay gathered through a pass
    (`sharding.gathered_for_decode`). `max_new_tokens` must be the same on every rank.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature} (use greedy=True for argmax)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    K = samples_per_prompt
    if K < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {K}")
    prompts, P = prompt_ids.shape
    N = max_new_tokens
    per_pass = None if batch_size is None else max(1, batch_size // K)  # prompts a pass
    lockstep = in_lockstep(model)
    passes = 1 if per_pass is None else -(-prompts // per_pass)
    total = int(max_over_ranks(torch.tensor(passes))) if lockstep else passes  # every rank makes as many passes
    if total > 1:
        step = per_pass or prompts
        options = dict(max_new_tokens=N, eos_id=eos_id, pad_id=pad_id, temperature=temperature, top_k=top_k, samples_per_prompt=K, compile=compile)
        parts = [
            generate(model, prompt_ids[s : s + step], prompt_mask[s : s + step], greedy=greedy, generator=generator, **options)
            for s in range(0, prompts, step)
        ]
        for _ in range(total - passes):  # in step with ranks that have more prompts; greedy: no draw from `generator`
            generate(model, prompt_ids[:1], prompt_mask[:1], greedy=True, **options)
        return Generation.cat(parts, pad_id)
    with gathered_for_decode(model):
        return _generate_pass(model, prompt_ids, prompt_mask, N, eos_id, pad_id, temperature, top_k, greedy, generator, K, compile, lockstep)


def _generate_pass(
    model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, N: int, eos_id: int, pad_id: int, temperature: float,
    top_k: int | None, greedy: bool, generator: torch.Generator | None, K: int, compile: bool, lockstep: bool,
) -> Generation:
    """One pass of `generate` over every row given."""
    prompts, P = prompt_ids.shape
    B = prompts * K
    device = prompt_ids.device
    prompt_mask = prompt_mask.bool()
    prompt_lengths = prompt_mask.sum(-1)  # (prompts,)
    block_size = getattr(getattr(model, "config", None), "block_size", None)
    if block_size is not None and int(prompt_lengths.max()) + N > block_size:
        raise ValueError(
            f"prompt of {int(prompt_lengths.max())} tokens + max_new_tokens={N} exceeds the "
            f"model's context (block_size={block_size})"
        )

    was_training = model.training
    model.eval()
    captured = compile and not lockstep and _can_capture(model, prompt_ids.device)
    if captured:
        # static shapes: the prompts repeated before their forward, the mask of the whole (reused) buffer every step
        prompt_ids, prompt_mask, prompt_lengths = (t.repeat_interleave(K, 0) for t in (prompt_ids, prompt_mask, prompt_lengths))
        S = -(-(P + N) // _STATIC_ROUND) * _STATIC_ROUND  # buffer length, rounded so that few shapes are captured
        cache = _static_cache(model, B, S)
        mask = torch.zeros(B, S, dtype=torch.bool, device=device)  # (B, S): False beyond P + N
        mask[:, :P] = prompt_mask
        mask[:, P : P + N] = True
        logits = model(prompt_ids, mask, position_ids=positions_from_mask(prompt_mask), cache=cache)[:, -1]  # (B, V)
        step_fn = _compiled_step()
    else:
        dtype = compute_dtype(model)  # a sharded model computing in bf16 keeps bf16 keys
        cache = model.new_cache(prompts, P + N) if dtype is None else model.new_cache(prompts, P + N, dtype=dtype)
        logits = model(prompt_ids, prompt_mask, position_ids=positions_from_mask(prompt_mask), cache=cache)[:, -1]  # (prompts, V)
        if K > 1:  # the prompt's forward once, its state K times
            cache.repeat_rows(K)
            logits = logits.repeat_interleave(K, 0)  # (B, V)
            prompt_mask, prompt_lengths = prompt_mask.repeat_interleave(K, 0), prompt_lengths.repeat_interleave(K, 0)
        mask = torch.ones(B, P + N, dtype=torch.bool, device=device)  # (B, P + N): generated tokens are real
        mask[:, :P] = prompt_mask
        step_fn = None
    positions = prompt_lengths[:, None] + torch.arange(N, device=device)  # (B, N) position of each new token
    raw_ids = torch.full((B, N), pad_id, dtype=torch.long, device=device)  # (B, N) as sampled, EOS ignored

    step = torch.empty(logits.shape, dtype=torch.float32, device=device)  # (B, V) this step's scaled logits
    logprobs = torch.zeros(B, N, dtype=torch.float32, device=device)  # (B, N)
    for t in range(N):
        step.copy_(logits)
        if temperature != 1.0:
            step.div_(temperature)
        token = step.argmax(-1) if greedy else _sample(step, top_k, generator)  # (B,)
        raw_ids[:, t] = token
        # under the full (untruncated) scaled softmax: only (B, N) is kept, never (N, B, V)
        logprobs[:, t] = step.gather(-1, token[:, None])[:, 0] - torch.logsumexp(step, -1)
        if t == N - 1 or (t % _CHECK_EVERY == _CHECK_EVERY - 1 and _every_row_ended(raw_ids[:, : t + 1], eos_id, lockstep)):
            break
        # one new token per row; a finished row's token is never used
        if step_fn is None:
            logits = model(token[:, None], mask[:, : P + t + 1], position_ids=positions[:, t : t + 1], cache=cache)[:, -1]
        else:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's logits were copied out above
            # contiguous (B, 1) inputs: the same strides whatever N, so one graph serves every completion length
            logits = step_fn(model, token[:, None], mask, positions[:, t : t + 1].contiguous(), cache)
    model.train(was_training)

    if not bool(torch.isfinite(logprobs).all()):  # one read per call; torch.multinomial refused such logits at every token
        raise FloatingPointError("generation: the model's logits are not finite (NaN or inf); its weights have diverged")
    alive, finished = _ended_rows(raw_ids, eos_id)  # (B, N), (B,)
    return Generation(
        completion_ids=torch.where(alive, raw_ids, pad_id),
        completion_mask=alive,
        logprobs=torch.where(alive, logprobs, 0.0),
        lengths=alive.sum(-1),
        finished=finished,
    )


def _every_row_ended(raw_ids: torch.Tensor, eos_id: int, lockstep: bool) -> bool:
    """Whether every row of `raw_ids` (B, t) has an EOS, on every rank in lockstep (a collective)."""
    ended = bool((raw_ids == eos_id).any(1).all())
    return all_ranks(ended) if lockstep else ended


_CHECK_EVERY = 4
"""Steps between two reads of "has every row ended?" from the device (each read waits for the device)."""

_STATIC_ROUND = 16
"""A static cache's length is prompt + completion rounded up to this, so prompts of similar length share one
captured step."""

_STATIC_CACHES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_WARNED: set[str] = set()


def _can_capture(model: nn.Module, device: torch.device) -> bool:
    """A captured decode step needs CUDA graphs and a model whose static cache changes no host value per step:
    otherwise warn once and decode eagerly."""
    refusal = getattr(model, "capture_refusal", None)
    if device.type == "cuda" and not refusal:
        return True
    reason = f"cannot capture {refusal}; it" if refusal else f"captures the decode step with CUDA graphs; on {device.type} it"
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f"compile: true {reason} decodes eagerly", stacklevel=4)
    return False


_MAX_STATIC_CACHES = 4
"""Static caches kept per model (the most recently used): rollouts, evaluation and a shorter last pass each
have their shape, and each kept cache holds its buffers and its captured graph's memory."""


def _static_cache(model: nn.Module, batch_size: int, max_len: int):
    """The model's static cache for this shape, emptied; kept between calls so a captured step's buffers stay put.

    Keyed by the autocast dtype too: transformers' static layers take the dtype of the first keys they see."""
    p = next(model.parameters())
    autocast = torch.get_autocast_dtype(p.device.type) if torch.is_autocast_enabled(p.device.type) else None
    caches = _STATIC_CACHES.setdefault(model, {})
    key = (batch_size, max_len, p.device, p.dtype, autocast)
    cache = caches.pop(key, None)  # re-inserted last: the dict's order is the order of use
    if cache is None:
        if len(caches) >= _MAX_STATIC_CACHES:
            caches.pop(next(iter(caches)))  # the least recently used
        cache = model.new_cache(batch_size, max_len, static=True)
    caches[key] = cache
    cache.reset()
    return cache


def _decode_step(model: nn.Module, token: torch.Tensor, mask: torch.Tensor, position: torch.Tensor, cache) -> torch.Tensor:
    """One decode step on a static cache: token (B, 1), mask (B, S) of the whole buffer, position (B, 1) -> logits (B, V)."""
    return model(token, mask, position_ids=position, cache=cache)[:, -1]


@functools.cache
def _compiled_step():
    """`_decode_step` compiled once per process (CUDA graphs; one graph per model and shape)."""
    # static shapes: each (rows, buffer length) its own graph, as CUDA graphs need, never one dynamic in them
    return torch.compile(_decode_step, mode="reduce-overhead", fullgraph=True, dynamic=False)
