"""Architecture registry: what differs between Llama (Mistral, Qwen2), Qwen3, Phi-3, Gemma 2/3, the mixtures of experts
(Mixtral, Qwen2-MoE, Qwen3-MoE), OPT and BLOOM, and nothing else.

Each architecture (one file here, its Arch in base.py) gives
- `config_from_hf(f)`: config.json (read through config.Fields, which checks each field's type) -> ModelConfig,
- a weight-name map from Hugging Face module paths to the shared transformer's internal names
  (`top_names` outside the blocks, `layer_names` inside block i under `layer_prefix`),
- `sequential`: the block's linear layers in true-sequential order, each inner list quantized together
  (they read the same input, so they share one Hessian).
Internal names are the same for every architecture: embed, embed_pos, embed_norm, proj_in, layers.{i}.{attn_norm,
attn.{q,k,v,qkv,o,q_norm,k_norm}, mlp_norm, mlp.{gate,up,gate_up,down}}, norm, proj_out, lm_head; a mixture of
experts (Mixtral, Qwen2-MoE, Qwen3-MoE: minigptq/moe.py) has mlp.{router, experts.{e}.{gate,up,down},
shared_expert.{gate,up,down}, shared_expert_gate}; Gemma's blocks also have attn_post_norm and mlp_post_norm
(minigptq/arch/gemma.py).
"""
from __future__ import annotations

from .. import Error
from . import bloom, gemma, llama, mixtral, opt, phi3, qwen3, qwen_moe
from .base import Arch


ARCHS: dict[str, Arch] = {model_type: mod.ARCH for mod in (llama, qwen3, phi3, opt, bloom, mixtral, qwen_moe)
                          for model_type in mod.MODEL_TYPES}  # config.json's model_type -> Arch
ARCHS.update(gemma.ARCHS)  # Gemma 2, Gemma 3 text, Gemma 3 multimodal: one Arch each (their tensor names differ)


def get_arch(model_type: str) -> Arch:
    if not isinstance(model_type, str) or model_type not in ARCHS:
        raise Error(f"unsupported model_type {model_type!r}; "
                    f"supported: {', '.join(sorted(ARCHS))}")
    return ARCHS[model_type]
