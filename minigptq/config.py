"""The model configuration: one frozen dataclass that every architecture fills from its config.json.

Each architecture file (minigptq/arch/*.py) turns a Hugging Face config.json dict into a ModelConfig; the shared
transformer (minigptq/transformer.py) reads only this dataclass, never the raw JSON and never file names.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelConfig:
    model_type: str              # "llama" | "opt" | "bloom"
    vocab_size: int              # rows of the token embedding
    hidden_size: int             # width of the residual stream
    num_layers: int              # transformer blocks
    num_heads: int               # query heads
    num_kv_heads: int            # key/value heads (< num_heads: grouped-query attention)
    head_dim: int                # width of one head
    intermediate_size: int       # width of the MLP's hidden layer
    max_positions: int           # the model's context length
    norm: str                    # "rms" (Llama) | "layer" (OPT, BLOOM)
    norm_eps: float
    positions: str               # "rope" (Llama) | "learned" (OPT, offset 2) | "alibi" (BLOOM)
    activation: str              # "silu" | "relu" | "gelu" | "gelu_tanh"
    gated_mlp: bool              # SwiGLU: down(act(gate(x)) * up(x)); else down(act(up(x)))
    qkv_bias: bool               # bias on the q/k/v projections
    o_bias: bool                 # bias on the attention output projection
    mlp_bias: bool               # bias on the MLP projections
    tie_word_embeddings: bool    # lm_head shares the token embedding's weight
    rope_theta: float = 10000.0
    fused_qkv: bool = False      # BLOOM: one query_key_value linear laid out per head as [heads, 3, head_dim]
    pre_norm: bool = True        # False: post-LayerNorm blocks (OPT-350M's do_layer_norm_before=False)
    final_norm: bool = True      # a norm after the last block
    embed_norm: bool = False     # BLOOM: LayerNorm right after the token embedding
    residual_from_norm: bool = False  # BLOOM's apply_residual_connection_post_layernorm
    embed_dim: int = 0           # token-embedding width if it differs from hidden_size (OPT-350M's word_embed_proj_dim)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    torch_dtype: str = "float32"  # dtype the checkpoint was saved in

    @property
    def token_dim(self) -> int:
        """Width of the token embedding and of lm_head's input."""
        return self.embed_dim or self.hidden_size


def read_json(path: Path) -> dict:
    """Read a JSON file, turning a parse failure into a ValueError that names the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def eos_tuple(value) -> tuple[int, ...]:
    """config.json's eos_token_id may be an int, a list or null."""
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)
