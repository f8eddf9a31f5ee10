"""OPT: learned positions (offset 2), LayerNorm before or after each sub-block, ReLU MLP, OPT-350M's projections."""
from __future__ import annotations

from . import Arch
from ..config import ModelConfig, eos_tuple

MODEL_TYPES = ("opt",)


def config_from_hf(d: dict) -> ModelConfig:
    hidden, heads = d["hidden_size"], d["num_attention_heads"]
    bias = bool(d.get("enable_bias", True))
    pre = bool(d.get("do_layer_norm_before", True))
    proj = d.get("word_embed_proj_dim", hidden)
    return ModelConfig(
        model_type="opt",
        vocab_size=d["vocab_size"],
        hidden_size=hidden,
        num_layers=d["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=d["ffn_dim"],
        max_positions=d.get("max_position_embeddings", 2048),
        norm="layer",
        norm_eps=1e-5,
        positions="learned",
        activation=d.get("activation_function", "relu"),
        gated_mlp=False,
        qkv_bias=bias, o_bias=bias, mlp_bias=bias,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
        pre_norm=pre,
        final_norm=pre and not d.get("_remove_final_layer_norm", False),
        embed_dim=proj if proj != hidden else 0,
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=eos_tuple(d.get("eos_token_id")),
        pad_token_id=d.get("pad_token_id"),
        torch_dtype=d.get("torch_dtype") or d.get("dtype") or "float32",
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
