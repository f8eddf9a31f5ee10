"""Phi-3 / Phi-3.5: Llama's block with q, k, v stored as one qkv_proj ([q | k | v] rows) and gate, up as one
gate_up_proj ([gate | up]). Each is quantized as stored, one linear with one Hessian, so the checkpoints have the
tensors transformers, GPTQModel and vLLM expect. LongRoPE for the 128k variants ("su" and "yarn" are its older names
in Phi-3 configs, as transformers reads them); a sliding window on every block when sliding_window is set."""
from __future__ import annotations

from ..config import Fields, ModelConfig
from .base import Arch
from .llama import config_from_hf as llama_config

MODEL_TYPES = ("phi3",)


def config_from_hf(f: Fields) -> ModelConfig:
    return llama_config(f, rope_aliases={"su": "longrope", "yarn": "longrope"}, model_type="phi3",
                        fused_qkv="concat", fused_gate_up=True)


ARCH = Arch(
    name="phi3",
    config_from_hf=config_from_hf,
    top_names={"model.embed_tokens": "embed", "model.norm": "norm", "lm_head": "lm_head"},
    layer_prefix="model.layers.{i}.",
    layer_names={
        "input_layernorm": "attn_norm",
        "self_attn.qkv_proj": "attn.qkv", "self_attn.o_proj": "attn.o",
        "post_attention_layernorm": "mlp_norm",
        "mlp.gate_up_proj": "mlp.gate_up", "mlp.down_proj": "mlp.down",
    },
    sequential=(("attn.qkv",), ("attn.o",), ("mlp.gate_up",), ("mlp.down",)),
)
