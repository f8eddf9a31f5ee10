"""Mixtral: Mistral's attention with a mixture-of-experts MLP on every block (minigptq/moe.py): a router
(block_sparse_moe.gate, kept in full precision), num_local_experts SwiGLU experts stored as w1 (gate), w3 (up) and w2
(down), top-k routing with the top-k weights always renormalised. A sliding window, when set, is on every block.
Checkpoints under transformers 5's names for the same tensors (RENAMED) are read and written under those."""
from __future__ import annotations

from dataclasses import replace

from ..config import MAX_COUNT, Fields, ModelConfig
from . import llama
from .base import Arch

MODEL_TYPES = ("mixtral",)


def config_from_hf(f: Fields) -> ModelConfig:
    cfg = llama.config_from_hf(f, model_type="mixtral")
    window = f.int("sliding_window", None, hi=2**31) or 0
    experts = f.int(("num_local_experts", "num_experts"), 8, hi=MAX_COUNT)
    return replace(cfg, sliding_window=window, window_layers=tuple(range(cfg.num_layers)) if window else (),
                   num_experts=experts, experts_per_token=f.int("num_experts_per_tok", 2, hi=MAX_COUNT),
                   moe_intermediate_size=cfg.intermediate_size, norm_topk_prob=True,
                   moe_layers=tuple(range(cfg.num_layers)))


MOE = "block_sparse_moe."
ARCH = Arch(
    name="mixtral",
    config_from_hf=config_from_hf,
    top_names=llama.ARCH.top_names,
    layer_prefix=llama.ARCH.layer_prefix,
    layer_names={**{k: v for k, v in llama.ARCH.layer_names.items() if not k.startswith("mlp.")},
                 MOE + "gate": "mlp.router", MOE + "experts.{e}.w1": "mlp.experts.{e}.gate",
                 MOE + "experts.{e}.w3": "mlp.experts.{e}.up", MOE + "experts.{e}.w2": "mlp.experts.{e}.down"},
    sequential=llama.ARCH.sequential,
    moe_sequential=(("mlp.experts.{e}.up", "mlp.experts.{e}.gate"), ("mlp.experts.{e}.down",)),
)
# transformers 5 names Mixtral's MoE as Qwen-MoE's (mlp.gate, mlp.experts.{e}.gate_proj / up_proj / down_proj), and
# GPTQModel 7.7 writes Mixtral checkpoints so: a checkpoint with these names is read (and written) under them
RENAMED = replace(ARCH, layer_names={
    **{k: v for k, v in ARCH.layer_names.items() if not k.startswith(MOE)}, "mlp.gate": "mlp.router",
    **{f"mlp.experts.{{e}}.{p}_proj": f"mlp.experts.{{e}}.{p}" for p in ("gate", "up", "down")}})
ARCH = replace(ARCH, alias=RENAMED)
