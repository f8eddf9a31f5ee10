"""The static-shape decode step that CUDA graphs replay (fast_decode.StaticDecodeStep and CudaGraphStep).

On the CPU the static step runs eagerly and must give the logits and cache of the ordinary (dynamic) decode step, for
every kind of position (RoPE, learned, ALiBi), GQA, sliding windows and left-padded batches; the graph itself is
checked on a GPU (marked gpu): the same greedy tokens with and without it, eager and compiled.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from minigptq import Error, kernels
from minigptq.config import ModelConfig, RopeScaling
from minigptq.fast_decode import StaticDecodeStep, accelerate
from minigptq.generation import generate
from minigptq.transformer import KVCache, Transformer

BASE = dict(qkv_bias=False, o_bias=False, mlp_bias=False, vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16,
            intermediate_size=96, max_positions=64, norm_eps=1e-5, tie_word_embeddings=False)
CONFIGS = {
    "llama-gqa": dict(model_type="llama", norm="rms", positions="rope", activation="silu", gated_mlp=True,
                      num_kv_heads=2),
    "llama-window": dict(model_type="llama", norm="rms", positions="rope", activation="silu", gated_mlp=True,
                         sliding_window=5, window_layers=(1,)),
    "opt": dict(model_type="opt", norm="layer", positions="learned", activation="relu", gated_mlp=False,
                qkv_bias=True, o_bias=True, mlp_bias=True),
    "bloom": dict(model_type="bloom", norm="layer", positions="alibi", activation="gelu", gated_mlp=False,
                  qkv_bias=True, o_bias=True, mlp_bias=True, embed_norm=True),
}


def tiny(kind: str, **extra) -> Transformer:
    torch.manual_seed(0)
    return accelerate(Transformer(ModelConfig(**{**BASE, **CONFIGS[kind], **extra}))).eval()


def prefill(model, prompts, steps):
    """Left-padded prompts, prefilled -> (cache, valid (B, S), first decode slot, next tokens)."""
    B, T0 = len(prompts), max(map(len, prompts))
    S = T0 + steps + 1
    tokens = torch.zeros(B, T0, dtype=torch.long)
    valid = torch.zeros(B, S, dtype=torch.bool)
    for b, p in enumerate(prompts):
        tokens[b, T0 - len(p):] = torch.tensor(p)
        valid[b, T0 - len(p):] = True
    padded = not bool(valid[:, :T0].all())
    cache = KVCache(model.cfg, B, S, torch.float32, "cpu")
    logits = model(tokens, cache, 0, valid[:, :T0] if padded else None, last_only=True)
    return cache, valid, T0, logits[:, -1].argmax(-1), padded


@pytest.mark.parametrize("kind", sorted(CONFIGS))
@pytest.mark.parametrize("batch", [1, 2])
@torch.inference_mode()
def test_static_step_equals_the_dynamic_step(kind, batch):
    model = tiny(kind)
    prompts = [[5, 9, 2, 44, 17, 3, 8], [7, 1, 30]][:batch]
    steps = 7  # past the sliding window of 5
    cache, valid, T0, nxt, padded = prefill(model, prompts, steps)
    static_cache = KVCache(model.cfg, batch, cache.max_len, torch.float32, "cpu")
    static_cache.k.copy_(cache.k), static_cache.v.copy_(cache.v)
    step = StaticDecodeStep(model, static_cache, valid)
    for i in range(steps):
        pos = T0 + i
        want = model(nxt[:, None], cache, pos, valid[:, :pos + 1] if padded else None)
        step.tokens.copy_(nxt[:, None])
        step.slot.fill_(pos)
        got = step()
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        nxt = want[:, -1].argmax(-1)
    torch.testing.assert_close(static_cache.k, cache.k, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(static_cache.v, cache.v, rtol=1e-5, atol=1e-6)


@torch.inference_mode()
def test_static_step_with_a_longer_cache():
    """A cache longer than the generation (a chat keeps one across turns): its later slots stay hidden."""
    model = tiny("llama-gqa")
    cache, valid, T0, nxt, _ = prefill(model, [[5, 9, 2, 44]], 3)
    long = KVCache(model.cfg, 1, cache.max_len + 9, torch.float32, "cpu")
    long.k[:, :, :, :cache.max_len].copy_(cache.k), long.v[:, :, :, :cache.max_len].copy_(cache.v)
    long.k[:, :, :, cache.max_len:].fill_(1e4)  # junk the mask must hide
    step = StaticDecodeStep(model, long, valid)
    step.tokens.copy_(nxt[:, None])
    step.slot.fill_(T0)
    torch.testing.assert_close(step(), model(nxt[:, None], cache, T0), rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_static_step_compiles_once_for_every_slot():
    """torch.compile of the static step (what generate(compile=True) captures in the graph): the slot is a tensor,
    so one compilation serves every step, and the cache write stays an in-place op (kv_write_at)."""
    torch._dynamo.reset()
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    model = tiny("llama-gqa")
    cache, valid, T0, nxt, padded = prefill(model, [[5, 9, 2, 44, 17, 3, 8], [7, 1, 30]], 4)
    static_cache = KVCache(model.cfg, 2, cache.max_len, torch.float32, "cpu")
    static_cache.k.copy_(cache.k), static_cache.v.copy_(cache.v)
    step = StaticDecodeStep(model, static_cache, valid)
    compiled = torch.compile(step.__call__, dynamic=False)
    for i in range(4):
        pos = T0 + i
        want = model(nxt[:, None], cache, pos, valid[:, :pos + 1])
        step.tokens.copy_(nxt[:, None])
        step.slot.fill_(pos)
        torch.testing.assert_close(compiled(), want, rtol=1e-5, atol=1e-5)
        nxt = want[:, -1].argmax(-1)
    torch.testing.assert_close(static_cache.k, cache.k, rtol=1e-5, atol=1e-6)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
    assert frames == 1, f"{frames} compilations for 4 slots"


def test_cuda_graph_needs_cuda_and_a_static_rope():
    model = tiny("llama-gqa")
    with pytest.raises(Error, match="needs the model on a CUDA device, it is on cpu"):
        generate(model, [[1, 2, 3]], 4, cuda_graph=True)
    dyn = tiny("llama-gqa", rope_scaling=RopeScaling(type="dynamic", factor=2.0, original_max=16))
    with pytest.raises(Error, match="'dynamic' depends on the sequence length"):
        StaticDecodeStep(dyn, KVCache(dyn.cfg, 1, 8, torch.float32, "cpu"), torch.ones(1, 8, dtype=torch.bool))
    out, _ = generate(dyn, [[1, 2, 3]], 4)  # the default (None) quietly runs without graphs
    assert len(out[0]) == 4


@pytest.mark.gpu
@pytest.mark.skipif(not kernels.cuda_available(), reason="CUDA kernels cannot run here")
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graph_generates_what_the_eager_steps_generate(compile):
    from minigptq.qlinear import QuantLinear
    model = tiny("llama-gqa", num_layers=3).cuda().half()
    for block in model.layers:  # GPTQ layers with the CUDA kernels, as a quantized checkpoint loads
        for name, lin in list(block.named_modules()):
            if isinstance(lin, torch.nn.Linear) and lin.in_features % 32 == 0:
                parent = block.get_submodule(name.rsplit(".", 1)[0])
                N, K, G = lin.out_features, lin.in_features, lin.in_features // 32
                codes = torch.randint(0, 16, (N, K))  # [N, K] as the solver gives them
                ql = QuantLinear.from_codes(codes, torch.rand(G, N) * 0.02 + 0.01, torch.full((G, N), 8),
                                            torch.arange(K) // 32, None, 4, 32).cuda()
                setattr(parent, name.rsplit(".", 1)[1], ql)
    prompts = [[5, 9, 2, 44, 17], [7, 1, 30]]
    eager, _ = generate(model, prompts, 12, cuda_graph=False)
    graphed, stats = generate(model, prompts, 12, cuda_graph=True, compile=compile)
    assert graphed == eager
    assert len(stats.step_s) == 11
