"""Architecture registry: what differs between Llama (Mistral, Qwen2), Qwen3, Phi-3, OPT and BLOOM, and nothing else.

Each architecture gives
- `config_from_hf(f)`: config.json (read through config.Fields, which checks each field's type) -> ModelConfig,
- a weight-name map from Hugging Face module paths to the shared transformer's internal names
  (`top_names` outside the blocks, `layer_names` inside block i under `layer_prefix`),
- `sequential`: the block's linear layers in true-sequential order, each inner list quantized together
  (they read the same input, so they share one Hessian).
Internal names are the same for every architecture: embed, embed_pos, embed_norm, proj_in, layers.{i}.{attn_norm,
attn.{q,k,v,qkv,o,q_norm,k_norm}, mlp_norm, mlp.{gate,up,gate_up,down}}, norm, proj_out, lm_head.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .. import Error
from ..config import Fields, ModelConfig


@dataclass(frozen=True)
class Arch:
    name: str
    config_from_hf: Callable[[Fields], ModelConfig]
    top_names: dict[str, str]          # HF module path -> internal path, outside the blocks
    layer_prefix: str                  # HF path of block i, with "{i}"
    layer_names: dict[str, str]        # HF module path inside a block -> internal path inside a block
    sequential: tuple[tuple[str, ...], ...]  # internal linear names, true-sequential groups

    def module_map(self, num_layers: int) -> dict[str, str]:
        """Every HF module path -> internal module path, for a model of `num_layers` blocks."""
        out = dict(self.top_names)
        for i in range(num_layers):
            for hf, ours in self.layer_names.items():
                out[self.layer_prefix.format(i=i) + hf] = f"layers.{i}.{ours}"
        return out


def _registry() -> dict[str, Arch]:
    from . import bloom, llama, opt, phi3, qwen3
    archs = {}
    for mod in (llama, qwen3, phi3, opt, bloom):
        for model_type in mod.MODEL_TYPES:
            archs[model_type] = mod.ARCH
    return archs


ARCHS = _registry()


def get_arch(model_type: str) -> Arch:
    if not isinstance(model_type, str) or model_type not in ARCHS:
        raise Error(f"unsupported model_type {model_type!r}; "
                         f"supported: {', '.join(sorted(ARCHS))}")
    return ARCHS[model_type]
