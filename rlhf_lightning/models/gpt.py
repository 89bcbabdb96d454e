"""A small GPT-style causal transformer with a KV cache for generation.

Token + position embeddings, pre-norm blocks, causal self-attention through
`torch.nn.functional.scaled_dot_product_attention`. Configured by plain values (`GPTConfig`), so a
checkpoint rebuilds the model from its hyperparameters alone.

Padding convention: rows may be left-padded (generation) or right-padded (training). Positions are
computed from the attention mask (`cumsum - 1`), so a row's result never depends on how much padding
sits in front of it; padded keys are never attended to.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


@dataclass
class GPTConfig:
    vocab_size: int = 21
    """Number of token ids (the tokenizer's vocab size)."""
    block_size: int = 32
    """Longest sequence (prompt + completion) the position table covers."""
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    dropout: float = 0.0
    """Off by default: PPO's importance ratio needs deterministic forwards."""
    bias: bool = True
    gradient_checkpointing: bool = False
    """Recompute each block's activations in backward instead of keeping them (training forwards only)."""

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")

    def to_dict(self) -> dict:
        return asdict(self)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each token counted over real tokens only: mask [0,0,1,1,1] -> [0,0,0,1,2]."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)  # (B, T)


class KVCache:
    """Preallocated keys and values, one (B, nh, max_len, hs) tensor per layer: `k[layer]`, `v[layer]`.

    `static=True` is the form a captured decode step needs: the next position to fill is a device tensor
    (`write`), each update writes there in place and returns the whole buffer, and the forward masks the
    positions not yet written. No shape and no host value changes from one step to the next, and each layer's
    buffer is its own tensor (a write through a view of one shared tensor makes a compiled step copy all of it).
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype, static: bool = False) -> None:
        hs = config.n_embd // config.n_head
        shape = (batch_size, config.n_head, max_len, hs)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.length = 0  # number of positions filled so far (dynamic form)
        self.static = static
        self.write = torch.zeros((), dtype=torch.long, device=device)  # next position to fill (static form)
        if static:  # a captured step reads and writes these in place: their addresses must stay fixed
            for t in (*self.k, *self.v, self.write):
                torch._dynamo.mark_static_address(t)

    def reset(self) -> None:
        """Empty again, buffers kept (their stale values are masked until overwritten)."""
        self.length = 0
        self.write.zero_()

    def repeat_rows(self, times: int) -> None:
        """Each row `times` times, consecutively (row i becomes rows i * times .. i * times + times - 1)."""
        self.k = [k.repeat_interleave(times, dim=0) for k in self.k]
        self.v = [v.repeat_interleave(times, dim=0) for v in self.v]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's (B, nh, t, hs) keys/values after the filled part; return all filled so far
        (static form: the whole buffer, written in place at `write`). The buffer keeps its dtype (float32 keys
        under bf16 autocast, as in the dynamic form)."""
        if self.static:
            index = self.write + torch.arange(k.size(2), device=k.device)  # (t,)
            self.k[layer].index_copy_(2, index, k.to(self.k[layer].dtype))
            self.v[layer].index_copy_(2, index, v.to(self.v[layer].dtype))
            return self.k[layer], self.v[layer]
        end = self.length + k.size(2)
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def attention_mask(self, attention_mask: torch.Tensor, T: int) -> torch.Tensor:
        """Static form: boolean (B, 1, T, max_len) for T queries written from `write` on; a key is seen when it is
        real in `attention_mask` (B, max_len) and not after the query, and a query always sees itself."""
        k_pos = torch.arange(self.k[0].size(2), device=self.write.device)  # (max_len,)
        q_pos = (self.write + torch.arange(T, device=self.write.device))[:, None]  # (T, 1)
        keys = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, max_len)
        return (keys & (k_pos <= q_pos)) | (k_pos == q_pos)  # (B, 1, T, max_len)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nh, S, hs), S = cached + T
        dropout = self.dropout if self.training else 0.0
        if attn_mask is None:  # no padding, no cache: plain causal attention (fastest kernel)
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.proj(y)


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = nn.Sequential(
            nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias),
            nn.GELU(),
            nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias),
            nn.Dropout(config.dropout),
        )

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, cache: KVCache | None, layer: int) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask, cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """`forward(input_ids, attention_mask) -> logits`, plus the cache-aware call used by generation."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def new_cache(self, batch_size: int, max_len: int, static: bool = False, dtype: torch.dtype | None = None) -> KVCache:
        """An empty cache in the weights' dtype, or `dtype` (what a model computes in when that differs: a sharded
        model whose weights are gathered in bf16)."""
        p = self.lm_head.weight
        return KVCache(self.config, batch_size, max_len, p.device, dtype or p.dtype, static)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Logits (B, T, V) for `input_ids` (B, T); (B, k, V) for the last k positions with `logits_to_keep` = k > 0
        (the LM head and the logits of the other positions are never computed; transformers' argument of the name).

        Without a cache, `attention_mask` (B, T) marks real tokens. With a cache, `attention_mask`
        (B, S) covers the cached positions and the new ones (S = cache.length + T), and
        `position_ids` (B, T) must be given; the new keys and values are appended to the cache.
        With a static cache (`KVCache.static`), `attention_mask` (B, max_len) covers the whole buffer and
        nothing reads a host value, so the call can be captured (the caller checks the context length).
        """
        B, T = input_ids.shape
        static = cache is not None and cache.static
        past = cache.length if cache is not None and not static else 0
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask) if attention_mask is not None else None
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)  # (B, T)
        if not static and past + T > self.config.block_size and int(position_ids.max()) >= self.config.block_size:
            raise ValueError(
                f"sequence position {int(position_ids.max())} is beyond the model's context "
                f"(block_size={self.config.block_size})"
            )
        attn_mask = None
        if static:
            attn_mask = cache.attention_mask(attention_mask, T)  # (B, 1, T, max_len)
        elif cache is not None or (attention_mask is not None and not bool(attention_mask.all())):
            attn_mask = self._attention_mask(attention_mask, B, T, past, input_ids.device)
        x = self.drop(self.wte(input_ids) + self.wpe(position_ids))  # (B, T, C)
        checkpointed = self.config.gradient_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if checkpointed:  # keep only the block's input; its activations are recomputed in backward
                x = torch.utils.checkpoint.checkpoint(block, x, attn_mask, None, i, use_reentrant=False)
            else:
                x = block(x, attn_mask, cache, i)
        if static:
            cache.write.add_(T)
        elif cache is not None:
            cache.length += T
        if logits_to_keep:
            x = x[:, -logits_to_keep:]  # (B, k, C)
        return self.lm_head(self.ln_f(x))  # (B, T or k, V)

    @staticmethod
    def _attention_mask(attention_mask: torch.Tensor | None, B: int, T: int, past: int, device) -> torch.Tensor:
        """Boolean (B, 1, T, S) mask: causal, real keys only, and each query may always see itself.

        The diagonal keeps fully padded query rows finite (their outputs are never used).
        """
        S = past + T
        if T == 1 and attention_mask is not None:  # one decode step: every real key, and the query itself
            keys = attention_mask.bool().clone()  # (B, S)
            keys[:, -1] = True
            return keys[:, None, None, :]  # (B, 1, 1, S)
        q_pos = torch.arange(past, S, device=device)[:, None]  # (T, 1)
        k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
        causal = k_pos <= q_pos  # (T, S)
        if attention_mask is None:
            return causal[None, None]
        keys = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, S)
        return (causal & keys) | (k_pos == q_pos)  # (B, 1, T, S)
