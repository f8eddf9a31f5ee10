"""Qwen3 (dense): Llama's block plus an RMSNorm over each query and key head (q_norm, k_norm, before RoPE), a head_dim
of its own (128 unless config.json says otherwise, not hidden_size / heads) and bias on q/k/v/o only with
attention_bias. Quantized in Llama's true-sequential groups; the norms stay in full precision."""
from __future__ import annotations

from ..config import Fields, ModelConfig
from . import llama
from .base import Arch

MODEL_TYPES = ("qwen3",)


def config_from_hf(f: Fields) -> ModelConfig:
    return llama.config_from_hf(f, model_type="qwen3", qk_norm=True)


ARCH = Arch(
    name="qwen3",
    config_from_hf=config_from_hf,
    top_names=llama.ARCH.top_names,
    layer_prefix=llama.ARCH.layer_prefix,
    layer_names={**llama.ARCH.layer_names, "self_attn.q_norm": "attn.q_norm", "self_attn.k_norm": "attn.k_norm"},
    sequential=llama.ARCH.sequential,
)
