"""OPT: learned positions (offset 2), LayerNorm before or after each sub-block, ReLU MLP, OPT-350M's projections."""
from __future__ import annotations

from .. import Error
from ..config import MAX_COUNT, MAX_POSITIONS, MAX_VOCAB, Fields, ModelConfig
from ..transformer import ACTIVATIONS
from .base import Arch

MODEL_TYPES = ("opt",)


def config_from_hf(f: Fields) -> ModelConfig:
    hidden, heads = f.int("hidden_size"), f.int("num_attention_heads", hi=MAX_COUNT)
    if hidden % heads:
        raise Error(f"hidden_size={hidden} must be a multiple of num_attention_heads={heads}")
    bias = f.bool("enable_bias", True)
    pre = f.bool("do_layer_norm_before", True)
    proj = f.int("word_embed_proj_dim", hidden)
    return ModelConfig(
        model_type="opt",
        vocab_size=f.int("vocab_size", hi=MAX_VOCAB),
        hidden_size=hidden,
        num_layers=f.int("num_hidden_layers", hi=MAX_COUNT),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=f.int("ffn_dim"),
        max_positions=f.int("max_position_embeddings", 2048, hi=MAX_POSITIONS),
        norm="layer",
        norm_eps=1e-5,
        positions="learned",
        activation=f.str("activation_function", "relu", choices=ACTIVATIONS),
        gated_mlp=False,
        qkv_bias=bias, o_bias=bias, mlp_bias=bias,
        tie_word_embeddings=f.bool("tie_word_embeddings", True),
        pre_norm=pre,
        final_norm=pre and not f.bool("_remove_final_layer_norm", False),
        embed_dim=proj if proj != hidden else 0,
        **f.common(),
    )


ARCH = Arch(
    name="opt",
    config_from_hf=config_from_hf,
    top_names={
        "model.decoder.embed_tokens": "embed", "model.decoder.embed_positions": "embed_pos",
        "model.decoder.project_in": "proj_in", "model.decoder.project_out": "proj_out",
        "model.decoder.final_layer_norm": "norm", "lm_head": "lm_head",
    },
    layer_prefix="model.decoder.layers.{i}.",
    layer_names={
        "self_attn_layer_norm": "attn_norm",
        "self_attn.q_proj": "attn.q", "self_attn.k_proj": "attn.k", "self_attn.v_proj": "attn.v",
        "self_attn.out_proj": "attn.o",
        "final_layer_norm": "mlp_norm",
        "fc1": "mlp.up", "fc2": "mlp.down",
    },
    sequential=(("attn.q", "attn.k", "attn.v"), ("attn.o",), ("mlp.up",), ("mlp.down",)),
)
