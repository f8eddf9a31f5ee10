"""The one decoder-only transformer that Llama, Qwen3, Phi-3, OPT and BLOOM share: block, attention with KV cache,
positions.

Architectures differ only through ModelConfig (minigptq/config.py): the norm (RMSNorm / LayerNorm), the positions
(rotate-half RoPE with its context extensions in minigptq/rope.py / learned with OPT's offset of 2 / ALiBi), the MLP
(SwiGLU / one activation), biases, fused qkv or gate_up as stored, RMSNorm on q and k heads, a sliding attention
window, pre- or post-norm. Module names are the internal ones listed in minigptq/arch/__init__.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels, rope
from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() <= 16 * x.shape[-1] and _cpu_fast(x) and self.weight.dtype == torch.float32 and x.is_contiguous():
            # decode-sized (<= 16 rows): one call (cuda/cpu_decode.cpp) instead of a composite op; same math, its own
            # summation order, so longer inputs (prefill, the quantization driver) keep torch's numbers exactly
            return kernels.cpu_rms_norm(x, self.weight, self.eps)
        # Normalise in fp32 as Llama does, whatever the activation dtype (one fused op: x * rsqrt(mean(x^2) + eps)).
        x32 = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * x32.to(x.dtype)


def _cpu_fast(x: Tensor) -> bool:
    """x may take the CPU decode-step operations of cuda/cpu_decode.cpp: fp32 on the CPU, inference, not traced."""
    return x.dtype == torch.float32 and x.device.type == "cpu" and kernels._cpu is not None \
        and not (x.requires_grad and torch.is_grad_enabled()) and not torch.compiler.is_compiling()


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    return RMSNorm(dim, cfg.norm_eps) if cfg.norm == "rms" else nn.LayerNorm(dim, eps=cfg.norm_eps)


ACTIVATIONS = {
    "silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def check_kv_memory(cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device, hint: str) -> None:
    """Refuse a KV cache of max_len slots that cannot fit in the memory available (as quantize's check_memory does):
    a one-line error with the sizes and `hint`, how the caller's user can ask for less (e.g. "lower --context")."""
    from .driver import available_memory  # here: the driver imports this module
    need = 2 * cfg.num_layers * batch * cfg.num_kv_heads * max_len * cfg.head_dim * dtype.itemsize
    free = available_memory(torch.device(device))
    if free is not None and need > free:
        from . import Error
        gib = lambda n: f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"  # noqa: E731
        raise Error(f"the KV cache for {max_len} tokens x batch {batch} ({cfg.num_layers} layers x "
                    f"{cfg.num_kv_heads} kv heads x {cfg.head_dim}, {dtype}) needs {gib(need)} but only {gib(free)} "
                    f"of {torch.device(device).type} memory is available; {hint}")


class KVCache:
    """Keys and values of every layer: k, v (layers, B, kv_heads, max_len, head_dim), allocated up front for max_len
    slots once check_kv_memory agrees; grow() makes a longer one keeping what was written (a chat's conversation)."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device,
                 hint: str = "ask for fewer tokens"):
        check_kv_memory(cfg, batch, max_len, dtype, device, hint)
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.cfg, self.max_len = cfg, max_len

    def grow(self, max_len: int, hint: str = "ask for fewer tokens") -> None:
        """Make room for max_len slots, the slots written so far kept. New tensors: a decode step built on the old
        ones (StaticDecodeStep, CudaGraphStep) must be built again; generate() builds them per call, so grow between
        calls."""
        L, B, H, S, D = self.k.shape
        if max_len <= S:
            return
        check_kv_memory(self.cfg, B, max_len, self.k.dtype, self.k.device, hint)  # the old pair is still held
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(L, B, H, max_len, D)
            new[:, :, :, :S] = old
            setattr(self, name, new)
            del old  # one old tensor at a time: the peak is the new pair plus one old tensor
        self.max_len = max_len

    def update(self, layer: int, k: Tensor, v: Tensor, start: int | Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, kv_heads, T, hd) at slots start..start+T; return all keys/values up to there.
        start as a tensor (1,) on the cache's device (the static-shape decode step of CUDA graphs, T = 1): the slot is
        read on the device, and every slot is returned (the caller masks those after it)."""
        if isinstance(start, Tensor):
            if torch.compiler.is_compiling():
                kv_write_at(self.k, self.v, k, v, layer, start)
            else:
                self.k[layer].index_copy_(2, start, k)
                self.v[layer].index_copy_(2, start, v)
            return self.k[layer], self.v[layer]
        end = start + k.shape[2]
        if torch.compiler.is_compiling():  # an opaque in-place op: traced as a slice assignment, the write
            kv_write(self.k, self.v, k, v, layer, start)  # would become a copy of the whole cache every layer
        else:
            self.k[layer, :, :, start:end] = k
            self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


@torch.library.custom_op("minigptq::kv_write", mutates_args=("k_cache", "v_cache"))
def kv_write(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, layer: int, start: int) -> None:
    """KVCache.update's write as one op for torch.compile: k, v (B, kv_heads, T, hd) into slots start..start+T."""
    end = start + k.shape[2]
    k_cache[layer, :, :, start:end] = k
    v_cache[layer, :, :, start:end] = v


@torch.library.custom_op("minigptq::kv_write_at", mutates_args=("k_cache", "v_cache"))
def kv_write_at(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, layer: int, slot: Tensor) -> None:
    """KVCache.update's write at a device-side slot (1,) as one op for torch.compile: k, v (B, kv_heads, 1, hd)."""
    k_cache[layer].index_copy_(2, slot, k)
    v_cache[layer].index_copy_(2, slot, v)


@dataclass
class Context:
    """What every block needs besides its input: built once per forward by Transformer.context()."""
    mask: Tensor | None       # additive attention bias (B, 1|heads, T, S), or None
    causal: bool              # let SDPA apply the causal mask itself (full sequence, no padding, no cache prefix)
    cos: Tensor | None        # RoPE (B, 1, T, head_dim), or None
    sin: Tensor | None
    cache: KVCache | None
    start: int | Tensor       # cache slot of the first of the T new tokens (a (1,) tensor: generate.StaticDecodeStep)
    window_mask: Tensor | None = None  # (B, 1, T, S) for sliding-window layers; None while the window hides nothing

    def attn_mask(self, windowed: bool) -> tuple[Tensor | None, bool]:
        """(mask, causal) for a layer with (windowed) or without a sliding window."""
        return (self.window_mask, False) if windowed and self.window_mask is not None else (self.mask, self.causal)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


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
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head's hd values
            self.q_norm, self.k_norm = RMSNorm(self.hd, cfg.norm_eps), RMSNorm(self.hd, cfg.norm_eps)
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
        if T == 1 and ctx.cache is not None and isinstance(ctx.start, int) and _cpu_fast(x) and \
                ctx.cache.k.dtype == torch.float32 and \
                (ctx.cos is None or ctx.cos.dtype == torch.float32) and (mask is None or mask.is_contiguous()):
            return self.o(self._decode_step(x, ctx, layer, mask))
        q, k, v = self.project(x)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        if ctx.cos is not None:
            q = q * ctx.cos + rotate_half(q) * ctx.sin
            k = k * ctx.cos + rotate_half(k) * ctx.sin
        if ctx.cache is not None:
            k, v = ctx.cache.update(layer, k, v, ctx.start)  # (B, kv_heads, S, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.kvh != self.h)  # (B, heads, T, hd)
        return self.o(y.transpose(1, 2).reshape(B, T, self.h * self.hd))

    def _decode_step(self, x: Tensor, ctx: Context, layer: int, mask: Tensor | None) -> Tensor:
        """One token per sequence on the CPU: the projections, then RoPE, the cache write and the attention in one
        call (kernels.cpu_attn_decode) -> (B, 1, heads * hd), what forward's torch path computes."""
        h, kvh, hd = self.h, self.kvh, self.hd
        if hasattr(self, "q_norm"):  # normed in torch first: the C++ call takes q and k as RoPE's inputs
            q, k, v = self.project(x)
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
            q_row, kv_row, stride = h * hd, kvh * hd, hd
        elif self.per_head:  # BLOOM: per head [q; k; v]
            y = self.qkv(x).contiguous()
            q, k, v, q_row, kv_row, stride = y, y[..., hd:], y[..., 2 * hd:], 3 * h * hd, 3 * h * hd, 3 * hd
        elif self.fused is not None or hasattr(self, "qkv"):  # [q | k | v]
            y = (self.fused(x) if self.fused is not None else self.qkv(x)).contiguous()
            q, k, v = y, y[..., h * hd:], y[..., (h + kvh) * hd:]
            q_row = kv_row = (h + 2 * kvh) * hd
            stride = hd
        else:
            q, k, v = self.q(x).contiguous(), self.k(x).contiguous(), self.v(x).contiguous()
            q_row, kv_row, stride = h * hd, kvh * hd, hd
        return kernels.cpu_attn_decode(q, k, v, q_row, kv_row, stride, ctx.cos, ctx.sin, ctx.cache.k, ctx.cache.v,
                                       layer, mask, h, ctx.start)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, f, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
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
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, ctx: Context) -> Tensor:
        # Pre-norm (Llama, BLOOM, most OPT): x + f(norm(x)). Post-norm (OPT-350M): norm(x + f(x)).
        h = self.attn_norm(x) if self.pre_norm else x
        x = (h if self.residual_from_norm else x) + self.attn(h, ctx, self.layer)
        if not self.pre_norm:
            x = self.attn_norm(x)
        h = self.mlp_norm(x) if self.pre_norm else x
        x = (h if self.residual_from_norm else x) + self.mlp(h)
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

    def decode_plans(self) -> list | None:
        """One kernels.DecodeBlockPlan per block when every block can run its CPU decode step as one C++ call
        (cuda/cpu_decode.h: decode_block): a Llama-family block (RMSNorm, pre-norm, SiLU-gated MLP) whose q/k/v and
        gate/up are fused packed layers, o and down packed too, fp32 norms. Else None: the modules run, which is
        also the reference. Made once; remade when a layer's kernel layout changes (e.g. after .to()).
        RoPE tables (any scaling) and masks (padding, sliding window) come from the Context, so those blocks qualify;
        Qwen3's q/k norms and Phi-3's stored qkv / gate_up layers have no place in the C++ block and run the modules."""
        cfg = self.cfg
        if cfg.norm != "rms" or not cfg.pre_norm or cfg.residual_from_norm or cfg.fused_qkv or not cfg.gated_mlp \
                or cfg.activation not in ("silu", "swish") or cfg.positions == "alibi" or cfg.qk_norm \
                or cfg.fused_gate_up:
            return None
        plans = self.__dict__.get("_decode_plans")
        if plans is not None and all(p.current(b) for p, b in zip(plans, self.layers)):
            return plans
        plans = [kernels.DecodeBlockPlan.make(b, cfg) for b in self.layers]
        plans = None if any(p is None for p in plans) else plans
        self.__dict__["_decode_plans"] = plans
        return plans

    @property
    def act_dtype(self) -> torch.dtype:
        """Activation dtype: that of the norms (embeddings and lm_head may be stored narrower)."""
        return self.layers[0].attn_norm.weight.dtype

    # -- pieces the quantization driver calls one at a time ------------------------------------------------------
    def embed_tokens(self, tokens: Tensor, pos: Tensor) -> Tensor:
        """tokens, pos (B, T) -> block-0 input (B, T, hidden)."""
        x = self.embed(tokens).to(self.act_dtype)  # the table may be stored narrower (head_dtype in the loader)
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
        return self.lm_head(x if w is None else x.to(w.dtype)).to(self.act_dtype)  # (B, T, vocab)

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
        if self.cfg.positions == "rope":
            cos, sin = rope.cos_sin(self.cfg, pos, dtype)  # (B, 1, T, hd) each
        needs_mask = key_valid is not None or self.cfg.positions == "alibi" or (T > 1 and start > 0)
        w = self.cfg.sliding_window if self.cfg.window_layers else 0
        windowed = 0 < w < S  # the window hides a key from some query: the last query sees slots S-w .. S-1 only
        if needs_mask or windowed:
            alibi = alibi_bias(self.cfg, kpos, dtype) if self.cfg.positions == "alibi" else None
            mask, window_mask = attention_masks(torch.arange(S, device=device), start + torch.arange(T, device=device),
                                                key_valid, B, w if windowed else 0, dtype, alibi)
            mask = mask if needs_mask else None
        causal = mask is None and T > 1
        return Context(mask, causal, cos, sin, cache, start, window_mask), pos

    def forward(self, tokens: Tensor, cache: KVCache | None = None, start: int = 0,
                key_valid: Tensor | None = None, last_only: bool = False) -> Tensor:
        """tokens (B, T) at cache slots start..start+T -> logits (B, T, vocab), or (B, 1, vocab) if last_only."""
        B, T = tokens.shape
        dtype = self.act_dtype
        ctx, pos = self.context(B, T, tokens.device, dtype, key_valid, cache, start)
        x = self.embed_tokens(tokens, pos)
        plans = self.decode_plans() if T == 1 and cache is not None and _cpu_fast(x) else None
        if plans is not None and all(m is None or m.is_contiguous() for m in (ctx.mask, ctx.window_mask)):
            x = x.contiguous()  # (B, 1, hidden), updated in place block by block by one C++ call each
            for i, plan in enumerate(plans):
                mask = ctx.attn_mask(self.layers[i].attn.windowed)[0]
                kernels.cpu_decode_block(plan, x, ctx.cos, ctx.sin, cache.k, cache.v, i, mask, start)
        else:
            for block in self.layers:
                x = block(x, ctx)
        if last_only:
            x = x[:, -1:]
        return self.head(x)


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
    from . import Error
    where = first_nonfinite(model, tokens)
    at = f"; they first appear in {where}" if where else ""
    narrow = model.act_dtype in (torch.float16, torch.bfloat16)
    hint = f" (or the activations overflow {str(model.act_dtype)[6:]}: try --dtype fp32)" if narrow else ""
    return Error(f"the model produced non-finite {what} (NaN or Inf){at}: its weights (e.g. GPTQ scales too large "
                 f"for the activations) or config.json numbers are broken{hint}, so no result is reported")
