"""Attention masks and positions for T new tokens over the S slots of a KV cache: causal, left padding hidden,
a sliding window, ALiBi's per-head bias (Press et al. 2022, with BLOOM's slopes). Built once per forward by
Transformer.context (minigptq/transformer.py), and once per generation by the static decode step
(minigptq/fast_decode.py), with the same code. RoPE's tables are minigptq/rope.py.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .config import ModelConfig


def alibi_slopes(heads: int) -> Tensor:
    """ALiBi's per-head slopes (Press et al. 2022), with BLOOM's rule for head counts that are not a power of 2."""
    p = 2 ** math.floor(math.log2(heads))
    base = 2.0 ** (-8.0 / p)
    slopes = [base ** (i + 1) for i in range(p)]
    if p < heads:
        extra = 2.0 ** (-4.0 / p)  # the interleaved slopes of a model with 2p heads
        slopes += [extra ** (2 * i + 1) for i in range(heads - p)]
    return torch.tensor(slopes)  # (heads,)


def key_positions(key_valid: Tensor) -> Tensor:
    """Position of every cache slot (B, S) from key_valid (B, S): positions skip the left padding."""
    return (key_valid.long().cumsum(-1) - 1).clamp(min=0)


def alibi_bias(cfg: ModelConfig, kpos: Tensor, dtype: torch.dtype) -> Tensor:
    """ALiBi's additive bias (B, heads, 1, S) for keys at positions kpos (B, S)."""
    slopes = alibi_slopes(cfg.num_heads).to(kpos.device)
    return (slopes[None, :, None, None] * kpos[:, None, None, :]).to(dtype)


def attention_masks(slot: Tensor, qslot: Tensor, key_valid: Tensor | None, B: int, window: int, dtype: torch.dtype,
                    alibi: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Additive masks for queries at cache slots qslot (T,) over the keys at slots slot (S,) -> (mask, window_mask).

    mask (B, 1|heads, T, S): causal, left padding hidden (key_valid (B, S), False = padding; a padding row still
    sees itself), plus `alibi` if given. window_mask (B, 1, T, S): the same without ALiBi and, as transformers, a query
    at slot t sees only slots t-window+1 .. t (cache slots, not positions); None when window is 0.
    """
    T, S = qslot.shape[0], slot.shape[0]
    allowed = (slot[None, :] <= qslot[:, None])[None, None].expand(B, 1, T, S)  # causal
    if key_valid is not None:
        allowed = allowed & (key_valid[:, None, None, :] | (slot[None, :] == qslot[:, None]))
    mask = torch.zeros(B, 1, T, S, device=slot.device, dtype=dtype).masked_fill(~allowed, float("-inf"))
    window_mask = None
    if window:
        hidden = ~(allowed & (slot[None, :] > qslot[:, None] - window))
        window_mask = torch.zeros(B, 1, T, S, device=slot.device, dtype=dtype).masked_fill(hidden, float("-inf"))
    return (mask if alibi is None else mask + alibi), window_mask
