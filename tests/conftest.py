"""Shared fixtures: tiny random checkpoints written by transformers (the test-only oracle), paths to shared data."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MINIGPTQ_SHARED", ROOT.parent / "shared"))
STORIES = SHARED / "models" / "stories260k"
WIKI_VALID = SHARED / "data" / "wikitext2" / "wiki.valid.tokens"
WIKI_TEST = SHARED / "data" / "wikitext2" / "wiki.test.raw"
PEER_PY = ROOT / ".venv-peer" / "bin" / "python"

# Small configs exercising every branch the issue names. Dimensions are multiples of 32 so 3-bit packing works.
TINY = {
    "llama-gqa-tied": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=512, max_position_embeddings=128,
                                     tie_word_embeddings=True, rope_theta=10000.0)),
    "llama-untied-bias": ("llama", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4, vocab_size=512,
                                        max_position_embeddings=128, tie_word_embeddings=False, rope_theta=5e5,
                                        attention_bias=True, mlp_bias=True)),
    "opt": ("opt", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=512,
                        max_position_embeddings=128, word_embed_proj_dim=64, do_layer_norm_before=True)),
    "opt-350m-style": ("opt", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                   vocab_size=512, max_position_embeddings=128, word_embed_proj_dim=32,
                                   do_layer_norm_before=False)),
    "bloom": ("bloom", dict(hidden_size=64, n_layer=2, n_head=4, vocab_size=512)),
    "bloom-6heads": ("bloom", dict(hidden_size=96, n_layer=2, n_head=6, vocab_size=512)),
}


def make_hf_checkpoint(kind: str, out: Path, seed: int = 0) -> Path:
    """Write a randomly initialised transformers model (fp32, safetensors) for TINY[kind] into `out`."""
    import transformers as tf
    model_type, kw = TINY[kind]
    cls_cfg, cls_model = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "opt": (tf.OPTConfig, tf.OPTForCausalLM),
                          "bloom": (tf.BloomConfig, tf.BloomForCausalLM)}[model_type]
    torch.manual_seed(seed)
    cfg = cls_cfg(bos_token_id=1, eos_token_id=2, pad_token_id=0, **kw)
    model = cls_model(cfg).eval()
    with torch.no_grad():  # larger-than-default weights so differences are not hidden by tiny activations
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.model", "tokenizer_config.json"):  # a real tokenizer (vocab 512) for the CLIs
        shutil.copyfile(STORIES / name, out / name)
    return out


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """kind -> path of a tiny random checkpoint written by transformers (built on first use)."""
    pytest.importorskip("transformers")
    base = tmp_path_factory.mktemp("hf")
    cache = {}

    def get(kind: str) -> Path:
        if kind not in cache:
            cache[kind] = make_hf_checkpoint(kind, base / kind)
        return cache[kind]
    return get
