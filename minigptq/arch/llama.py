"""Llama (and the Llama-shaped Mistral / Qwen2 configs): RMSNorm, rotate-half RoPE, grouped-query attention, SwiGLU.

Also the reader the other Llama-family files (qwen3.py, phi3.py) build on: RoPE settings (rope_theta and the
rope_scaling / rope_parameters context extensions, computed by minigptq/rope.py) and sliding-window attention as
transformers applies them.
"""
from __future__ import annotations

import math
from dataclasses import replace

from .. import Error
from ..config import MAX_COUNT, MAX_POSITIONS, MAX_VOCAB, Fields, ModelConfig, RopeScaling
from ..transformer import ACTIVATIONS
from .base import Arch

MODEL_TYPES = ("llama", "mistral", "qwen2")


def config_from_hf(f: Fields, rope_aliases: dict[str, str] | None = None, **changes) -> ModelConfig:
    """config.json -> ModelConfig; `changes` are the ModelConfig fields a Llama-family variant sets differently."""
    model_type = f.d["model_type"]
    theta, scaling, context = scaling_from_hf(f, f.int("max_position_embeddings", 2048, hi=MAX_POSITIONS),
                                              rope_aliases)
    hidden, heads = f.int("hidden_size"), f.int("num_attention_heads", hi=MAX_COUNT)
    head_dim = f.int("head_dim", 128 if model_type == "qwen3" else None)  # Qwen3's head_dim is its own
    if head_dim is None and hidden % heads:
        raise Error(f"hidden_size={hidden} must be a multiple of num_attention_heads={heads} (or give head_dim)")
    layers = f.int("num_hidden_layers", hi=MAX_COUNT)
    window, window_layers = sliding_window(f, layers)
    attention_bias = f.bool("attention_bias", False)
    cfg = ModelConfig(
        model_type="llama",
        vocab_size=f.int("vocab_size", hi=MAX_VOCAB),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=f.int("num_key_value_heads", heads, hi=MAX_COUNT),
        head_dim=head_dim or hidden // heads,
        intermediate_size=f.int("intermediate_size"),
        max_positions=context,
        norm="rms",
        norm_eps=f.float("rms_norm_eps", 1e-6, hi=1.0),
        positions="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        activation=f.str("hidden_act", "silu", choices=ACTIVATIONS),
        gated_mlp=True,
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=attention_bias,
        mlp_bias=f.bool("mlp_bias", False),
        tie_word_embeddings=f.bool("tie_word_embeddings", False),
        sliding_window=window,
        window_layers=window_layers,
        **f.common(),
    )
    return replace(cfg, **changes) if changes else cfg


def sliding_window(f: Fields, layers: int) -> tuple[int, tuple[int, ...]]:
    """(window, the blocks that use it) as transformers reads them: Mistral and Phi-3 on every block whenever
    sliding_window is set; Qwen2 / Qwen3 only with use_sliding_window, on the blocks layer_types marks
    "sliding_attention", or without layer_types from block max_window_layers on; Llama never."""
    model_type, window = f.d["model_type"], f.int("sliding_window", None, hi=2**31)
    if not window or model_type == "llama":
        return 0, ()
    if model_type in ("mistral", "phi3"):
        return window, tuple(range(layers))
    if not f.bool("use_sliding_window", False):
        return 0, ()
    types = f.d.get("layer_types")
    if types is None:
        return window, tuple(range(f.int("max_window_layers", 28, lo=0, hi=MAX_COUNT), layers))
    kinds = ("full_attention", "sliding_attention")
    if not isinstance(types, list) or len(types) != layers or any(t not in kinds for t in types):
        raise Error(f"the field 'layer_types' must list {layers} values, each one of {', '.join(kinds)}, "
                    f"got {str(types)[:120]}")
    return window, tuple(i for i, t in enumerate(types) if t == "sliding_attention")


ARCH = Arch(
    name="llama",
    config_from_hf=config_from_hf,
    top_names={"model.embed_tokens": "embed", "model.norm": "norm", "lm_head": "lm_head"},
    layer_prefix="model.layers.{i}.",
    layer_names={
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn.q", "self_attn.k_proj": "attn.k", "self_attn.v_proj": "attn.v",
        "self_attn.o_proj": "attn.o",
        "post_attention_layernorm": "mlp_norm",
        "mlp.gate_proj": "mlp.gate", "mlp.up_proj": "mlp.up", "mlp.down_proj": "mlp.down",
    },
    sequential=(("attn.q", "attn.k", "attn.v"), ("attn.o",), ("mlp.up", "mlp.gate"), ("mlp.down",)),
)


# -- RoPE settings ---------------------------------------------------------------------------------------------------

SUPPORTED = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")
# Ranges (lo excluded) where RoPE stays finite and meaningful. rope_theta: the base, 1e4 .. 1e7 in real models (the
# largest seen, a 1M-context Llama 3, ~3.6e9); <= 1 turns every rotation the same or faster per dimension, and a tiny
# one is 0 in fp32, so the frequencies become Inf and cos / sin NaN. The scaling factors divide the frequencies (a
# tiny one overflows them too); attention_factor multiplies cos and sin (real: ~1 .. 1.5).
THETA = dict(lo=1.0, hi=1e15)
FACTOR = dict(lo=1e-3, hi=1e6)
ATTENTION = dict(lo=0.0, hi=100.0)


def _floats(r: Fields, key: str) -> tuple[float, ...]:
    v = r.d.get(key)
    if not isinstance(v, list) or not v or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                  and math.isfinite(x) and x > 0 for x in v):
        raise Error(f"the field {key!r} of rope_scaling must be a list of positive numbers, got {str(v)[:80]}")
    return tuple(float(x) for x in v)


def scaling_from_hf(f: Fields, max_pos: int, aliases: dict[str, str] | None = None
                    ) -> tuple[float, RopeScaling | None, int]:
    """config.json -> (rope_theta, the context extension or None, the context it gives in tokens).

    RoPE settings are "rope_theta" / "rope_scaling" (transformers 4) or "rope_parameters" (transformers 5).
    aliases: older names of a type (Phi-3's "su" and "yarn" both mean longrope). The context is what vLLM derives:
    max_position_embeddings, times factor for linear and dynamic, and at least original * factor for yarn.
    """
    rope = f.dict(("rope_parameters", "rope_scaling"))
    r = Fields(rope)
    theta = r.float("rope_theta", f.float("rope_theta", 10000.0, **THETA), **THETA)
    partial = r.float("partial_rotary_factor", f.float("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise Error(f"partial_rotary_factor={partial} (RoPE on part of each head) is not supported; only 1.0 is")
    kind = rope.get("rope_type", rope.get("type", "default"))
    kind = (aliases or {}).get(kind, kind) if isinstance(kind, str) else kind
    if kind not in SUPPORTED:
        raise Error(f"RoPE scaling type {kind!r} is not supported; supported: {', '.join(SUPPORTED)}")
    if kind == "default":
        return theta, None, max_pos
    # transformers lets a top-level original_max_position_embeddings (Phi-3 writes one) win over rope_scaling's
    original = f.int("original_max_position_embeddings", None, hi=MAX_POSITIONS) or \
        r.int("original_max_position_embeddings", max_pos, hi=MAX_POSITIONS)
    if kind in ("linear", "dynamic"):
        factor = r.float("factor", **FACTOR)
        return theta, RopeScaling(kind, factor, max_pos), min(MAX_POSITIONS, int(max_pos * factor))
    if kind == "llama3":
        s = RopeScaling(kind, r.float("factor", **FACTOR), original, low_freq_factor=r.float("low_freq_factor"),
                        high_freq_factor=r.float("high_freq_factor"))
        if s.high_freq_factor <= s.low_freq_factor:
            raise Error(f"rope_scaling high_freq_factor={s.high_freq_factor} must exceed "
                        f"low_freq_factor={s.low_freq_factor}")
        return theta, s, max_pos
    factor = r.float("factor", max_pos / original, **FACTOR)
    if kind == "yarn":
        attention = r.d.get("attention_factor")
        if attention is None:
            mscale, mscale_all = r.float("mscale", 0.0, lo=-1.0), r.float("mscale_all_dim", 0.0, lo=-1.0)
            if mscale and mscale_all and _mscale(factor, mscale_all) <= 0:  # the divisor below
                raise Error(f"rope_scaling mscale_all_dim={mscale_all} with factor={factor} gives a scale "
                            f"0.1 * mscale_all_dim * ln(factor) + 1 <= 0; valid: a value that keeps it positive")
            attention = _mscale(factor, mscale) / _mscale(factor, mscale_all) if mscale and mscale_all \
                else _mscale(factor)
        s = RopeScaling(kind, factor, original, beta_fast=r.float("beta_fast", 32.0),
                        beta_slow=r.float("beta_slow", 1.0), truncate=r.bool("truncate", True),
                        attention_factor=r.float("attention_factor", float(attention), **ATTENTION))
        return theta, s, max(max_pos, min(MAX_POSITIONS, int(original * factor)))
    if factor > 1 and original < 2:  # log(original) divides below
        raise Error(f"rope_scaling longrope with factor={factor} needs original_max_position_embeddings >= 2, "
                    f"got {original}")
    attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))  # longrope
    return theta, RopeScaling(kind, factor, original, attention_factor=r.float("attention_factor", attention,
                                                                               **ATTENTION),
                              short_factor=_floats(r, "short_factor"), long_factor=_floats(r, "long_factor")), max_pos


def _mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
