"""Llama (and the Llama-shaped Mistral / Qwen2 configs): RMSNorm, rotate-half RoPE, grouped-query attention, SwiGLU."""
from __future__ import annotations

from .. import Error
from . import Arch
from ..config import MAX_COUNT, MAX_POSITIONS, MAX_VOCAB, Fields, ModelConfig
from ..transformer import ACTIVATIONS

MODEL_TYPES = ("llama", "mistral", "qwen2")


def config_from_hf(f: Fields) -> ModelConfig:
    # RoPE settings: "rope_theta"/"rope_scaling" (transformers 4) or "rope_parameters" (transformers 5).
    rope = f.dict(("rope_parameters", "rope_scaling"))
    if rope.get("rope_type", rope.get("type")) not in (None, "default"):
        raise Error(f"RoPE scaling {rope!r} is not supported; only plain RoPE (rope_type 'default') is")
    theta = Fields(rope).float("rope_theta", f.float("rope_theta", 10000.0))
    max_pos = f.int("max_position_embeddings", 2048, hi=MAX_POSITIONS)
    window = f.int("sliding_window", None, hi=2**31)
    if window and f.bool("use_sliding_window", True) and window < max_pos and f.d["model_type"] == "mistral":
        raise Error(f"sliding-window attention (sliding_window={window}) is not supported")
    hidden, heads = f.int("hidden_size"), f.int("num_attention_heads", hi=MAX_COUNT)
    head_dim = f.int("head_dim", None)
    if head_dim is None and hidden % heads:
        raise Error(f"hidden_size={hidden} must be a multiple of num_attention_heads={heads} (or give head_dim)")
    attention_bias = f.bool("attention_bias", False)
    return ModelConfig(
        model_type="llama",
        vocab_size=f.int("vocab_size", hi=MAX_VOCAB),
        hidden_size=hidden,
        num_layers=f.int("num_hidden_layers", hi=MAX_COUNT),
        num_heads=heads,
        num_kv_heads=f.int("num_key_value_heads", heads, hi=MAX_COUNT),
        head_dim=head_dim or hidden // heads,
        intermediate_size=f.int("intermediate_size"),
        max_positions=max_pos,
        norm="rms",
        norm_eps=f.float("rms_norm_eps", 1e-6, hi=1.0),
        positions="rope",
        rope_theta=theta,
        activation=f.str("hidden_act", "silu", choices=ACTIVATIONS),
        gated_mlp=True,
        qkv_bias=f.d["model_type"] == "qwen2" or attention_bias,
        o_bias=attention_bias,
        mlp_bias=f.bool("mlp_bias", False),
        tie_word_embeddings=f.bool("tie_word_embeddings", False),
        **f.common(),
    )


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
