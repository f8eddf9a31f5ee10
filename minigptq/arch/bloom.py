"""BLOOM: ALiBi instead of positions, LayerNorm after the embedding, fused query_key_value laid out per head, GELU."""
from __future__ import annotations

from . import Arch
from ..config import ModelConfig, eos_tuple

MODEL_TYPES = ("bloom",)


def config_from_hf(d: dict) -> ModelConfig:
    hidden = d.get("hidden_size", d.get("n_embed"))
    heads = d.get("n_head", d.get("num_attention_heads"))
    return ModelConfig(
        model_type="bloom",
        vocab_size=d["vocab_size"],
        hidden_size=hidden,
        num_layers=d.get("n_layer", d.get("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=4 * hidden,
        max_positions=d.get("seq_length", 2048),  # ALiBi has no hard limit; BLOOM was trained at 2048
        norm="layer",
        norm_eps=d.get("layer_norm_epsilon", 1e-5),
        positions="alibi",
        activation="gelu_tanh",
        gated_mlp=False,
        qkv_bias=True, o_bias=True, mlp_bias=True,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
        fused_qkv=True,
        embed_norm=True,
        residual_from_norm=bool(d.get("apply_residual_connection_post_layernorm", False)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=eos_tuple(d.get("eos_token_id")),
        pad_token_id=d.get("pad_token_id"),
        torch_dtype=d.get("torch_dtype") or d.get("dtype") or "float32",
    )


ARCH = Arch(
    name="bloom",
    config_from_hf=config_from_hf,
    top_names={
        "transformer.word_embeddings": "embed", "transformer.word_embeddings_layernorm": "embed_norm",
        "transformer.ln_f": "norm", "lm_head": "lm_head",
    },
    layer_prefix="transformer.h.{i}.",
    layer_names={
        "input_layernorm": "attn_norm",
        "self_attention.query_key_value": "attn.qkv", "self_attention.dense": "attn.o",
        "post_attention_layernorm": "mlp_norm",
        "mlp.dense_h_to_4h": "mlp.up", "mlp.dense_4h_to_h": "mlp.down",
    },
    sequential=(("attn.qkv",), ("attn.o",), ("mlp.up",), ("mlp.down",)),
)
