"""The one decoder-only transformer that Llama, Qwen3, Phi-3, Gemma 2/3, the MoE models, OPT and BLOOM share: block,
attention with KV cache (minigptq/kv_cache.py), positions.

Architectures differ only through ModelConfig (minigptq/config.py): the norm (RMSNorm / LayerNorm), the positions
(rotate-half RoPE with its context extensions in minigptq/rope.py / learned with OPT's offset of 2 / ALiBi), the MLP
(SwiGLU / one activation), biases, fused qkv or gate_up as stored, RMSNorm on q and k heads, a sliding attention
window, pre- or post-norm; Gemma's (1 + w) RMSNorm, norms after attention and MLP, scaled embeddings, attention
scale, soft-capping (minigptq/softcap.py) and a RoPE base of its own for the sliding-window blocks. Module names are
the internal ones listed in minigptq/arch/__init__.py.

This is the reference model, in plain torch: it calls no kernel of its own (a QuantLinear in place of an nn.Linear
brings its kernels along). The fast decode paths (one C++ call per CPU decode step, the static step that CUDA graphs
replay) subclass these modules in minigptq/fast_decode.py and fall back to them wherever they do not apply.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import Error, rope
from .config import ModelConfig
from .kv_cache import KVCache
from .masks import alibi_bias, attention_masks, key_positions
from .softcap import softcap, softcapped_attention
from .moe import MoE


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.eps, self.offset = eps, offset  # offset 1: Gemma's (1 + w)
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 as Llama does, whatever the activation dtype (one fused op: x * rsqrt(mean(x^2) + eps)).
        x32 = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        if self.offset:  # Gemma scales in fp32 and rounds once, after: (x * (1 + w)).to(dtype)
            return (x32 * (self.offset + self.weight.float())).to(x.dtype)
        return self.weight * x32.to(x.dtype)


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    return RMSNorm(dim, cfg.norm_eps, cfg.norm_offset) if cfg.norm == "rms" else nn.LayerNorm(dim, eps=cfg.norm_eps)


ACTIVATIONS = {
    "silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


@dataclass
class Context:
    """What every block needs besides its input: built once per forward by Transformer.context()."""
    mask: Tensor | None       # additive attention bias (B, 1|heads, T, S), or None
    causal: bool              # let SDPA apply the causal mask itself (full sequence, no padding, no cache prefix)
    cos: Tensor | None        # RoPE (B, 1, T, head_dim), or None
    sin: Tensor | None
    cache: KVCache | None
    start: int | Tensor       # cache slot of the first of the T new tokens ((1,) tensor: fast_decode.StaticDecodeStep)
    window_mask: Tensor | None = None  # (B, 1, T, S) for sliding-window layers; None while the window hides nothing
    cos_local: Tensor | None = None  # RoPE of the sliding-window layers where they have their own base (Gemma 3)
    sin_local: Tensor | None = None

    def attn_mask(self, windowed: bool) -> tuple[Tensor | None, bool]:
        """(mask, causal) for a layer with (windowed) or without a sliding window."""
        return (self.window_mask, False) if windowed and self.window_mask is not None else (self.mask, self.causal)

    def rope(self, windowed: bool) -> tuple[Tensor | None, Tensor | None]:
        """(cos, sin) for a layer with (windowed) or without a sliding window."""
        return (self.cos_local, self.sin_local) if windowed and self.cos_local is not None else (self.cos, self.sin)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.h, self.kvh, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.per_head = cfg.fused_qkv == "per_head"  # BLOOM's qkv: per head [q; k; v]; Phi-3's: [q | k | v]
        self.windowed = layer in cfg.window_layers   # sliding-window attention (Context.window_mask)
        d = cfg.hidden_size
        if cfg.fused_qkv:
            self.qkv = nn.Linear(d, (self.h + 2 * self.kvh) * self.hd, bias=cfg.qkv_bias)
        else:
            self.q = nn.Linear(d, self.h * self.hd, bias=cfg.qkv_bias)
            self.k = nn.Linear(d, self.kvh * self.hd, bias=cfg.qkv_bias)
            self.v = nn.Linear(d, self.kvh * self.hd, bias=cfg.qkv_bias)
        self.o = nn.Linear(self.h * self.hd, d, bias=cfg.o_bias)
        if cfg.qk_norm:  # Qwen3, Gemma 3: RMSNorm over each head's hd values
            self.q_norm, self.k_norm = make_norm(cfg, self.hd), make_norm(cfg, self.hd)
        self.scale, self.softcap = cfg.attn_scale or None, cfg.attn_softcap  # None: SDPA's 1 / sqrt(hd)
        self.fused = None  # q, k, v as one packed kernel call (qlinear.FusedQuantLinear), set by the loader

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, d) -> q (B, T, heads, hd), k and v (B, T, kv_heads, hd), with the q/k norms applied."""
        B, T, _ = x.shape
        h, kvh, hd = self.h, self.kvh, self.hd
        if self.per_head:
            q, k, v = self.qkv(x).view(B, T, h, 3, hd).unbind(3)
        elif self.fused is not None or hasattr(self, "qkv"):  # [q | k | v]
            y = self.fused(x) if self.fused is not None else self.qkv(x)
            q, k, v = y.split([h * hd, kvh * hd, kvh * hd], dim=-1)
            q, k, v = q.view(B, T, h, hd), k.view(B, T, kvh, hd), v.view(B, T, kvh, hd)
        else:
            q, k, v = self.q(x).view(B, T, h, hd), self.k(x).view(B, T, kvh, hd), self.v(x).view(B, T, kvh, hd)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def forward(self, x: Tensor, ctx: Context, layer: int) -> Tensor:
        B, T, _ = x.shape
        mask, causal = ctx.attn_mask(self.windowed)
        q, k, v = self.project(x)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        cos, sin = ctx.rope(self.windowed)
        if cos is not None:
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        if ctx.cache is not None:
            k, v = ctx.cache.update(layer, k, v, ctx.start)  # (B, kv_heads, S, hd)
        if self.softcap:  # Gemma 2: SDPA cannot soft-cap the scores
            y = softcapped_attention(q, k, v, mask, causal, self.scale or self.hd ** -0.5, self.softcap)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale,
                                               enable_gqa=self.kvh != self.h)  # (B, heads, T, hd)
        return self.o(y.transpose(1, 2).reshape(B, T, self.h * self.hd))

class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, width: int = 0):
        super().__init__()
        # width: the hidden layer's, if not intermediate_size (an expert of minigptq/moe.py)
        d, f, bias = cfg.hidden_size, width or cfg.intermediate_size, cfg.mlp_bias
        if cfg.fused_gate_up:  # Phi-3: one linear, [gate | up]
            self.gate_up = nn.Linear(d, 2 * f, bias=bias)
        else:
            if cfg.gated_mlp:
                self.gate = nn.Linear(d, f, bias=bias)
            self.up = nn.Linear(d, f, bias=bias)
        self.down = nn.Linear(f, d, bias=bias)
        self.act = ACTIVATIONS[cfg.activation]
        self.fused = None  # gate and up as one packed kernel call (qlinear.FusedQuantLinear), set by the loader

    def forward(self, x: Tensor) -> Tensor:
        if self.fused is not None or hasattr(self, "gate_up"):
            gate, up = (self.fused(x) if self.fused is not None else self.gate_up(x)).chunk(2, dim=-1)
            return self.down(self.act(gate) * up)
        h = self.act(self.gate(x)) * self.up(x) if hasattr(self, "gate") else self.act(self.up(x))
        return self.down(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.pre_norm, self.residual_from_norm = layer, cfg.pre_norm, cfg.residual_from_norm
        self.attn_norm = make_norm(cfg, cfg.hidden_size)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = make_norm(cfg, cfg.hidden_size)
        # a mixture of experts on the blocks the config names (minigptq/moe.py), else the dense MLP
        self.mlp = MoE(cfg, lambda width: MLP(cfg, width)) if layer in cfg.moe_layers else MLP(cfg)
        self.sandwich = cfg.sandwich_norms  # Gemma 2 / 3: x + norm(f(norm(x)))
        if self.sandwich:
            self.attn_post_norm, self.mlp_post_norm = make_norm(cfg, cfg.hidden_size), make_norm(cfg, cfg.hidden_size)

    def forward(self, x: Tensor, ctx: Context) -> Tensor:
        # Pre-norm (Llama, BLOOM, most OPT): x + f(norm(x)). Post-norm (OPT-350M): norm(x + f(x)).
        h = self.attn_norm(x) if self.pre_norm else x
        a = self.attn(h, ctx, self.layer)
        x = (h if self.residual_from_norm else x) + (self.attn_post_norm(a) if self.sandwich else a)
        if not self.pre_norm:
            x = self.attn_norm(x)
        h = self.mlp_norm(x) if self.pre_norm else x
        m = self.mlp(h)
        x = (h if self.residual_from_norm else x) + (self.mlp_post_norm(m) if self.sandwich else m)
        if not self.pre_norm:
            x = self.mlp_norm(x)
        return x


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, e = cfg.hidden_size, cfg.token_dim
        self.embed = nn.Embedding(cfg.vocab_size, e)
        if cfg.positions == "learned":
            self.embed_pos = nn.Embedding(cfg.max_positions + 2, d)  # OPT reserves positions 0 and 1
        if cfg.embed_norm:
            self.embed_norm = make_norm(cfg, e)
        if e != d:
            self.proj_in = nn.Linear(e, d, bias=False)
            self.proj_out = nn.Linear(d, e, bias=False)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        if cfg.final_norm:
            self.norm = make_norm(cfg, d)
        self.lm_head = nn.Linear(e, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight

    @property
    def act_dtype(self) -> torch.dtype:
        """Activation dtype: that of the norms (embeddings and lm_head may be stored narrower)."""
        return self.layers[0].attn_norm.weight.dtype

    # -- pieces the quantization driver calls one at a time ------------------------------------------------------
    def embed_tokens(self, tokens: Tensor, pos: Tensor) -> Tensor:
        """tokens, pos (B, T) -> block-0 input (B, T, hidden)."""
        x = self.embed(tokens).to(self.act_dtype)  # the table may be stored narrower (head_dtype in the loader)
        if self.cfg.embed_scale:  # Gemma: the factor rounded to the activation dtype first, as transformers does
            x = x * torch.tensor(self.cfg.hidden_size ** 0.5, dtype=x.dtype)
        if hasattr(self, "embed_norm"):
            x = self.embed_norm(x)
        if hasattr(self, "proj_in"):
            x = self.proj_in(x)
        if hasattr(self, "embed_pos"):
            x = x + self.embed_pos(pos + 2)
        return x

    def head(self, x: Tensor) -> Tensor:
        """Last block's output (B, T, hidden) -> logits (B, T, vocab)."""
        if hasattr(self, "norm"):
            x = self.norm(x)
        if hasattr(self, "proj_out"):
            x = self.proj_out(x)
        w = getattr(self.lm_head, "weight", None)  # a QuantLinear head (8-bit option) takes the activations as is
        logits = self.lm_head(x if w is None else x.to(w.dtype)).to(self.act_dtype)  # (B, T, vocab)
        return softcap(logits, self.cfg.final_softcap) if self.cfg.final_softcap else logits

    def context(self, B: int, T: int, device, dtype, key_valid: Tensor | None = None,
                cache: KVCache | None = None, start: int = 0) -> tuple[Context, Tensor]:
        """Masks and positions for T new tokens at cache slots start..start+T -> (Context, pos (B, T)).

        key_valid (B, start+T) marks real tokens (False = left padding); None means all real.
        """
        S = start + T
        if key_valid is None:
            kpos = torch.arange(S, device=device).expand(B, S)  # (B, S)
        else:
            kpos = key_positions(key_valid)
        pos = kpos[:, start:]  # (B, T)
        cos = sin = mask = window_mask = None
        cos_local = sin_local = None
        if self.cfg.positions == "rope":
            cos, sin = rope.cos_sin(self.cfg, pos, dtype)  # (B, 1, T, hd) each
            if self.cfg.rope_local_theta:
                cos_local, sin_local = rope.cos_sin(self.cfg, pos, dtype, local=True)  # (B, 1, T, hd) each
        needs_mask = key_valid is not None or self.cfg.positions == "alibi" or (T > 1 and start > 0)
        w = self.cfg.sliding_window if self.cfg.window_layers else 0
        windowed = 0 < w < S  # the window hides a key from some query: the last query sees slots S-w .. S-1 only
        if needs_mask or windowed:
            alibi = alibi_bias(self.cfg, kpos, dtype) if self.cfg.positions == "alibi" else None
            mask, window_mask = attention_masks(torch.arange(S, device=device), start + torch.arange(T, device=device),
                                                key_valid, B, w if windowed else 0, dtype, alibi)
            mask = mask if needs_mask else None
        causal = mask is None and T > 1
        return Context(mask, causal, cos, sin, cache, start, window_mask, cos_local, sin_local), pos

    def forward(self, tokens: Tensor, cache: KVCache | None = None, start: int = 0,
                key_valid: Tensor | None = None, last_only: bool = False) -> Tensor:
        """tokens (B, T) at cache slots start..start+T -> logits (B, T, vocab), or (B, 1, vocab) if last_only."""
        B, T = tokens.shape
        ctx, pos = self.context(B, T, tokens.device, self.act_dtype, key_valid, cache, start)
        x = self.body(self.embed_tokens(tokens, pos), ctx)  # (B, T, hidden)
        if last_only:
            x = x[:, -1:]
        return self.head(x)

    def body(self, x: Tensor, ctx: Context) -> Tensor:
        """The blocks in order: block-0 input (B, T, hidden) -> last block's output (B, T, hidden)."""
        for block in self.layers:
            x = block(x, ctx)
        return x


@torch.inference_mode()
def first_nonfinite(model: Transformer, tokens: Tensor) -> str:
    """Where a plain forward of tokens (1, T) first holds a NaN or Inf: "the embeddings", "block i (of n)",
    "the final norm and lm_head", or "" if nowhere (a fast path differed). A diagnostic re-run, only after the
    logits of a run were found non-finite: the normal forward checks nothing."""
    finite = lambda t: bool(torch.isfinite(t).all())  # noqa: E731
    ctx, pos = model.context(*tokens.shape, tokens.device, model.act_dtype)
    x = model.embed_tokens(tokens, pos)  # (1, T, hidden)
    if not finite(x):
        return "the embeddings"
    for i, block in enumerate(model.layers):
        x = block(x, ctx)
        if not finite(x):
            return f"block {i} (of {len(model.layers)})"
    return "" if finite(model.head(x)) else "the final norm and lm_head"


def nonfinite_error(model: Transformer, tokens: Tensor, what: str) -> ValueError:
    """The user error for non-finite `what` (e.g. "logits") of a forward over tokens (1, T), naming where it began."""
    where = first_nonfinite(model, tokens)
    at = f"; they first appear in {where}" if where else ""
    narrow = model.act_dtype in (torch.float16, torch.bfloat16)
    hint = f" (or the activations overflow {str(model.act_dtype)[6:]}: try --dtype fp32)" if narrow else ""
    return Error(f"the model produced non-finite {what} (NaN or Inf){at}: its weights (e.g. GPTQ scales too large "
                 f"for the activations) or config.json numbers are broken{hint}, so no result is reported")
