"""Llama (and the Llama-shaped Mistral / Qwen2 configs): RMSNorm, rotate-half RoPE, grouped-query attention, SwiGLU."""
from __future__ import annotations

from . import Arch
from ..config import ModelConfig, eos_tuple

MODEL_TYPES = ("llama", "mistral", "qwen2")


def config_from_hf(d: dict) -> ModelConfig:
    # RoPE settings: "rope_theta"/"rope_scaling" (transformers 4) or "rope_parameters" (transformers 5).
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type")) not in (None, "default"):
        raise ValueError(f"RoPE scaling {rope!r} is not supported; only plain RoPE (rope_type 'default') is")
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    if d.get("sliding_window") and d.get("use_sliding_window", True) and \
            d["sliding_window"] < d.get("max_position_embeddings", 0) and d["model_type"] == "mistral":
        raise ValueError(f"sliding-window attention (sliding_window={d['sliding_window']}) is not supported")
    heads = d["num_attention_heads"]
    qwen2 = d["model_type"] == "qwen2"
    return ModelConfig(
        model_type="llama",
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // heads,
        intermediate_size=d["intermediate_size"],
        max_positions=d.get("max_position_embeddings", 2048),
        norm="rms",
        norm_eps=d.get("rms_norm_eps", 1e-6),
        positions="rope",
        rope_theta=float(theta),
        activation=d.get("hidden_act", "silu"),
        gated_mlp=True,
        qkv_bias=qwen2 or bool(d.get("attention_bias", False)),
        o_bias=bool(d.get("attention_bias", False)),
        mlp_bias=bool(d.get("mlp_bias", False)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=eos_tuple(d.get("eos_token_id")),
        pad_token_id=d.get("pad_token_id"),
        torch_dtype=d.get("torch_dtype") or d.get("dtype") or "float32",
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
