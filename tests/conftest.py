"""Shared fixtures: tiny random checkpoints written by transformers (the test-only oracle), paths to shared data."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from minigptq.kv_cache import KVCache

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
    return save_with_tokenizer(model, out)


def save_with_tokenizer(model, out: Path) -> Path:
    """model.save_pretrained(out) (safetensors) plus stories260k's real tokenizer (vocab 512) for the CLIs."""
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(STORIES / name, out / name)
    return out


def lazy_checkpoints(tmp_path_factory, folder: str, make):
    """kind -> make(kind, path), written on first use under a fresh temporary `folder` (needs transformers)."""
    pytest.importorskip("transformers")
    base, made = tmp_path_factory.mktemp(folder), {}

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = make(kind, base / kind)
        return made[kind]
    return get


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """kind -> path of a tiny random checkpoint written by transformers (built on first use)."""
    return lazy_checkpoints(tmp_path_factory, "hf", make_hf_checkpoint)


def random_tokens(seed: int, B: int, T: int) -> torch.Tensor:
    """B x T token ids in [3, 512) (stories260k's vocabulary past its special tokens), reproducible from seed."""
    return torch.randint(3, 512, (B, T), generator=torch.Generator().manual_seed(seed))


def cached_steps(model, tokens: torch.Tensor, prefill: int = 8) -> torch.Tensor:
    """minigptq's logits for tokens: the first `prefill` in one call, then one token at a time through a KV cache."""
    cache = KVCache(model.cfg, tokens.shape[0], tokens.shape[1], torch.float32, "cpu")
    with torch.inference_mode():
        steps = [model(tokens[:, :prefill], cache, 0)]
        steps += [model(tokens[:, i:i + 1], cache, i) for i in range(prefill, tokens.shape[1])]
    return torch.cat(steps, dim=1)
