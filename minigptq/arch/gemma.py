"""Gemma 2 and Gemma 3 (text): Llama's block with Gemma's differences, read from config.json as transformers 5 does.

- RMSNorm scaling by (1 + w) (weights stored around 0), four norms per block: input, post-attention,
  pre-feedforward, post-feedforward (x + norm(attn(norm(x))), then the same for the MLP);
- token embeddings times sqrt(hidden_size), rounded to the activation dtype; tied lm_head; GeGLU (gelu_pytorch_tanh);
- attention scaled by query_pre_attn_scalar ** -0.5 with head_dim independent of hidden / heads; sliding-window
  blocks alternating with global ones (layer_types, or the older pattern: Gemma 2 every other block, Gemma 3
  sliding_window_pattern, 6); Gemma 2's attention-logit and final-logit soft-capping (minigptq/softcap.py);
  Gemma 3's RMSNorm on q and k heads and its two RoPE bases: rope_local_base_freq (10k) on the sliding blocks,
  rope_theta (1M, with rope_scaling such as linear x8) on the global ones (transformers 5: rope_parameters keyed by
  layer type).
- `gemma3` (Gemma3ForConditionalGeneration) configs: the language model in text_config, its tensors under
  language_model.model.* (the names transformers 5 saves and the hub checkpoints hold); the vision tower and the
  multimodal projector are not loaded.
Quantized in Llama's true-sequential groups; norms and embeddings stay in full precision.
"""
from __future__ import annotations

import logging

from .. import Error
from ..config import MAX_COUNT, MAX_POSITIONS, MAX_VOCAB, Fields, ModelConfig
from ..transformer import ACTIVATIONS
from . import llama
from .base import Arch

MODEL_TYPES = ("gemma2", "gemma3_text", "gemma3")
KINDS = ("full_attention", "sliding_attention")
log = logging.getLogger("minigptq")


def _optional_positive(f: Fields, key: str, default: float | None) -> float:
    """A soft-cap or similar: absent -> default, null -> none (0.0), else a finite number > 0 (0 is refused: it
    would divide by zero)."""
    if f.d.get(key, default) is None:
        return 0.0
    return f.float(key, default)


def _layer_types(f: Fields, layers: int, pattern_default: int) -> tuple[int, ...]:
    """The sliding-window blocks: from layer_types (transformers 5), else every block but each pattern-th one."""
    types = f.d.get("layer_types")
    if types is None:
        pattern = f.int(("sliding_window_pattern", "_sliding_window_pattern"), pattern_default, hi=MAX_COUNT)
        return tuple(i for i in range(layers) if (i + 1) % pattern)
    if not isinstance(types, list) or len(types) != layers or any(t not in KINDS for t in types):
        n = len(types) if isinstance(types, list) else "not a list"
        raise Error(f"the field 'layer_types' must list num_hidden_layers={layers} values, each one of "
                    f"{', '.join(KINDS)}, got {n}: {str(types)[:120]}")
    return tuple(i for i, t in enumerate(types) if t == "sliding_attention")


def _rope(f: Fields, max_pos: int, gemma3: bool) -> tuple[float, object, int, float]:
    """-> (global rope_theta, its scaling, the context, local rope_theta or 0)."""
    params = f.d.get("rope_parameters")
    if not gemma3:
        return (*llama.scaling_from_hf(f, max_pos), 0.0)
    if isinstance(params, dict) and set(params) & set(KINDS):  # transformers 5: one RoPE setting per layer type
        for kind in KINDS:
            if not isinstance(params.get(kind, {}), dict):
                raise Error(f"the field 'rope_parameters' {kind!r} must be an object {{...}}, got "
                            f"{str(params[kind])[:80]}")
        full = params.get("full_attention", {})
        local = Fields(params.get("sliding_attention", {}))
        theta, scaling, context = llama.scaling_from_hf(
            Fields({"rope_parameters": full, "rope_theta": full.get("rope_theta", 1e6)}), max_pos)
    else:  # transformers 4: rope_theta and rope_scaling for the global blocks, rope_local_base_freq for the others
        theta, scaling, context = llama.scaling_from_hf(Fields({**f.d, "rope_theta": f.d.get("rope_theta", 1e6)}),
                                                        max_pos)
        local = Fields({"rope_theta": f.d.get("rope_local_base_freq")})
    kind = local.d.get("rope_type", "default")
    if kind != "default":
        raise Error(f"RoPE scaling {kind!r} on the sliding-window layers (rope_parameters sliding_attention) is not "
                    f"supported; valid: default")
    return theta, scaling, context, local.float("rope_theta", 10000.0, **llama.THETA)


def config_from_hf(f: Fields) -> ModelConfig:
    """config.json of gemma2, gemma3_text, or gemma3 (multimodal: its text_config) -> ModelConfig."""
    model_type = f.d["model_type"]
    if model_type == "gemma3":
        text = f.dict("text_config")
        top = {k: f.d[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype")
               if k in f.d}  # the multimodal config may hold them at its top level
        log.info("note: a Gemma 3 multimodal checkpoint: only its language model (text_config) is loaded; the vision "
                 "tower and multimodal projector weights are ignored")
        f = Fields({**top, **text, "model_type": "gemma3_text"})
    gemma3 = model_type != "gemma2"
    hidden = f.int("hidden_size", 2304)
    layers = f.int("num_hidden_layers", 26, hi=MAX_COUNT)
    heads = f.int("num_attention_heads", 8, hi=MAX_COUNT)
    theta, scaling, context, local_theta = _rope(f, f.int("max_position_embeddings", 131072 if gemma3 else 8192,
                                                          hi=MAX_POSITIONS), gemma3)
    if f.d.get("use_bidirectional_attention"):
        raise Error("use_bidirectional_attention=true (an encoder such as EmbeddingGemma) is not supported; "
                    "minigptq runs causal language models")
    window = f.int("sliding_window", 4096, hi=2**31)
    return ModelConfig(
        model_type="gemma3" if gemma3 else "gemma2",
        vocab_size=f.int("vocab_size", 262208 if gemma3 else 256000, hi=MAX_VOCAB),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=f.int("num_key_value_heads", 4, hi=MAX_COUNT),
        head_dim=f.int("head_dim", 256),
        intermediate_size=f.int("intermediate_size", 9216),
        max_positions=context,
        norm="rms",
        norm_eps=f.float("rms_norm_eps", 1e-6, hi=1.0),
        positions="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        activation=f.str(("hidden_activation", "hidden_act"), "gelu_pytorch_tanh", choices=ACTIVATIONS),
        gated_mlp=True,
        qkv_bias=f.bool("attention_bias", False), o_bias=f.bool("attention_bias", False), mlp_bias=False,
        tie_word_embeddings=f.bool("tie_word_embeddings", True),
        qk_norm=gemma3,
        sliding_window=window,
        window_layers=_layer_types(f, layers, 6 if gemma3 else 2),
        norm_offset=1.0,
        embed_scale=True,
        sandwich_norms=True,
        attn_scale=f.float("query_pre_attn_scalar", 256.0) ** -0.5,
        attn_softcap=_optional_positive(f, "attn_logit_softcapping", None if gemma3 else 50.0),
        final_softcap=_optional_positive(f, "final_logit_softcapping", None if gemma3 else 30.0),
        rope_local_theta=local_theta,
        **f.common(),
    )


LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn.q", "self_attn.k_proj": "attn.k", "self_attn.v_proj": "attn.v",
    "self_attn.o_proj": "attn.o",
    "post_attention_layernorm": "attn_post_norm",
    "pre_feedforward_layernorm": "mlp_norm",
    "mlp.gate_proj": "mlp.gate", "mlp.up_proj": "mlp.up", "mlp.down_proj": "mlp.down",
    "post_feedforward_layernorm": "mlp_post_norm",
}
QK_NORMS = {"self_attn.q_norm": "attn.q_norm", "self_attn.k_norm": "attn.k_norm"}


def _arch(name: str, layer_names: dict[str, str], prefix: str = "", ignored: tuple[str, ...] = ()) -> Arch:
    """prefix: where the language model's tensors live ("" or, multimodal, "language_model.")."""
    return Arch(
        name=name,
        config_from_hf=config_from_hf,
        top_names={prefix + "model.embed_tokens": "embed", prefix + "model.norm": "norm",
                   prefix + "lm_head": "lm_head"},
        layer_prefix=prefix + "model.layers.{i}.",
        layer_names=layer_names,
        sequential=llama.ARCH.sequential,
        ignored=ignored,
    )


ARCHS = {  # model_type -> Arch
    "gemma2": _arch("gemma2", LAYER_NAMES),
    "gemma3_text": _arch("gemma3", {**LAYER_NAMES, **QK_NORMS}),
    "gemma3": _arch("gemma3", {**LAYER_NAMES, **QK_NORMS}, "language_model.",
                    ignored=("vision_tower.", "multi_modal_projector.")),
}
