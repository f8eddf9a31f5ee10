"""Gemma 2's logit soft-capping (Gemma Team 2024, "Gemma 2", section 2): cap * tanh(x / cap) squeezes attention and
output logits smoothly into (-cap, cap). transformers' Gemma2 applies it to the attention scores before the mask and
to the final logits; SDPA has no hook for it, so the soft-capped attention here is the plain-matmul form, in the
order transformers' eager_attention_forward computes it (scores * scale, cap, + mask, softmax in fp32, @ v).
"""
from __future__ import annotations

import torch
from torch import Tensor


def softcap(x: Tensor, cap: float) -> Tensor:
    """cap * tanh(x / cap), elementwise, in x's dtype."""
    return torch.tanh(x / cap) * cap


def softcapped_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, scale: float,
                         cap: float) -> Tensor:
    """q (B, heads, T, hd), k and v (B, kv_heads, S, hd) -> (B, heads, T, hd): softmax(softcap(q k^T * scale) + mask) v.

    mask: additive (B, 1|heads, T, S) or None; causal: no mask given, hide the keys after each query (T == S)."""
    B, h, T, hd = q.shape
    kvh, S = k.shape[1], k.shape[2]
    q = q.reshape(B, kvh, h // kvh, T, hd)  # (B, kv_heads, group, T, hd): each kv head serves `group` query heads
    scores = softcap(q @ k[:, :, None].transpose(-1, -2) * scale, cap).reshape(B, h, T, S)  # (B, heads, T, S)
    if mask is not None:
        scores = scores + mask
    elif causal:
        hidden = torch.ones(T, S, dtype=torch.bool, device=q.device).triu(S - T + 1)  # keys after each query
        scores = scores.masked_fill(hidden, float("-inf"))
    p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # (B, heads, T, S)
    return (p.view(B, kvh, h // kvh, T, S) @ v[:, :, None]).reshape(B, h, T, hd)  # (B, heads, T, hd)
