"""Llama (and the Llama-shaped Mistral / Qwen2 configs): RMSNorm, rotate-half RoPE, grouped-query attention, SwiGLU.

Also the reader the other Llama-family files (qwen3.py, phi3.py) build on: RoPE scaling (minigptq/rope.py) and
sliding-window attention as transformers applies them.
"""
from __future__ import annotations

from dataclasses import replace

from .. import Error
from . import Arch
from ..config import MAX_COUNT, MAX_POSITIONS, MAX_VOCAB, Fields, ModelConfig
from ..rope import scaling_from_hf
from ..transformer import ACTIVATIONS

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
