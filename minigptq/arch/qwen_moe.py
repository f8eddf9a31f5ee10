"""Qwen2-MoE and Qwen3-MoE: Qwen2's (biased q/k/v) or Qwen3's (q/k norms) attention with a mixture-of-experts MLP
(minigptq/moe.py) on the blocks decoder_sparse_step and mlp_only_layers select, the dense SwiGLU MLP on the others.
The router (mlp.gate) and Qwen2-MoE's shared_expert_gate stay in full precision; the experts (mlp.experts.{e}) and
Qwen2-MoE's shared expert are quantized, each expert from the tokens routed to it (minigptq/driver.py).
Routing: softmax over the experts, top-k, renormalised only with norm_topk_prob.
OLMoE is not read here: its q/k norms span all heads at once (not one head), which the shared attention lacks."""
from __future__ import annotations

from dataclasses import replace

from .. import Error
from ..config import MAX_COUNT, Fields, ModelConfig
from . import llama
from .base import Arch

MODEL_TYPES = ("qwen2_moe", "qwen3_moe")


def config_from_hf(f: Fields) -> ModelConfig:
    qwen3 = f.d["model_type"] == "qwen3_moe"
    if f.d.get("sliding_window") == 0:  # transformers writes 0 for "no window" in Qwen2-MoE configs
        f = Fields({**f.d, "sliding_window": None})
    changes = dict(qk_norm=True) if qwen3 else dict(qkv_bias=f.bool("qkv_bias", True))
    cfg = llama.config_from_hf(f, model_type=f.d["model_type"], **changes)
    L = cfg.num_layers
    if qwen3 and cfg.sliding_window:  # transformers' Qwen3-MoE slides on every block when use_sliding_window is on
        cfg = replace(cfg, window_layers=tuple(range(L)))
    experts = f.int(("num_experts", "num_local_experts"), 60 if not qwen3 else 128, lo=0, hi=MAX_COUNT)
    step = f.int("decoder_sparse_step", 1, hi=MAX_COUNT)
    dense = f.d.get("mlp_only_layers") or []
    if not isinstance(dense, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in dense):
        raise Error(f"the field 'mlp_only_layers' must be a list of block indices, got {str(dense)[:80]}")
    moe = tuple(i for i in range(L) if experts > 0 and i not in dense and (i + 1) % step == 0)
    return replace(cfg, num_experts=experts, experts_per_token=f.int("num_experts_per_tok", 4 if not qwen3 else 8,
                                                                      hi=MAX_COUNT),
                   moe_intermediate_size=f.int("moe_intermediate_size") if moe else 0,
                   norm_topk_prob=f.bool("norm_topk_prob", False),
                   shared_expert_size=0 if qwen3 else f.int("shared_expert_intermediate_size", 0, lo=0),
                   moe_layers=moe)


SHARED = "mlp.shared_expert."
ARCH = Arch(
    name="qwen_moe",
    config_from_hf=config_from_hf,
    top_names=llama.ARCH.top_names,
    layer_prefix=llama.ARCH.layer_prefix,
    layer_names={**llama.ARCH.layer_names, "self_attn.q_norm": "attn.q_norm", "self_attn.k_norm": "attn.k_norm",
                 "mlp.gate": "mlp.router", "mlp.shared_expert_gate": "mlp.shared_expert_gate",
                 SHARED + "gate_proj": "mlp.shared_expert.gate", SHARED + "up_proj": "mlp.shared_expert.up",
                 SHARED + "down_proj": "mlp.shared_expert.down",
                 "mlp.experts.{e}.gate_proj": "mlp.experts.{e}.gate", "mlp.experts.{e}.up_proj": "mlp.experts.{e}.up",
                 "mlp.experts.{e}.down_proj": "mlp.experts.{e}.down"},
    sequential=llama.ARCH.sequential,
    moe_sequential=(("mlp.shared_expert.up", "mlp.shared_expert.gate"), ("mlp.shared_expert.down",),
                    ("mlp.experts.{e}.up", "mlp.experts.{e}.gate"), ("mlp.experts.{e}.down",)),
)
