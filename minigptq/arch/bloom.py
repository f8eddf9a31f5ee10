"""BLOOM: ALiBi instead of positions, LayerNorm after the embedding, fused query_key_value laid out per head, GELU."""
from __future__ import annotations

from .. import Error
from ..config import MAX_COUNT, MAX_POSITIONS, MAX_VOCAB, Fields, ModelConfig
from .base import Arch

MODEL_TYPES = ("bloom",)


def config_from_hf(f: Fields) -> ModelConfig:
    hidden = f.int(("hidden_size", "n_embed"))
    heads = f.int(("n_head", "num_attention_heads"), hi=MAX_COUNT)
    if hidden % heads:
        raise Error(f"hidden_size={hidden} must be a multiple of n_head={heads}")
    return ModelConfig(
        model_type="bloom",
        vocab_size=f.int("vocab_size", hi=MAX_VOCAB),
        hidden_size=hidden,
        num_layers=f.int(("n_layer", "num_hidden_layers"), hi=MAX_COUNT),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=4 * hidden,
        max_positions=f.int("seq_length", 2048, hi=MAX_POSITIONS),  # ALiBi has no hard limit; trained at 2048
        norm="layer",
        norm_eps=f.float("layer_norm_epsilon", 1e-5, hi=1.0),
        positions="alibi",
        activation="gelu_tanh",
        gated_mlp=False,
        qkv_bias=True, o_bias=True, mlp_bias=True,
        tie_word_embeddings=f.bool("tie_word_embeddings", True),
        fused_qkv="per_head",
        embed_norm=True,
        residual_from_norm=f.bool("apply_residual_connection_post_layernorm", False),
        **f.common(),
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
