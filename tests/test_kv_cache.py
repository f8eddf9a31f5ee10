"""The KV cache in half precision (--kv-dtype): the C++ attention over an fp16 / bf16 cache against torch, the fast
decode paths against the reference modules with the same half cache, the bytes, and bad values."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minigptq import Error, fast_decode, kernels, load_model
from minigptq.generate import generate, parser as generate_parser
from minigptq.kv_cache import KVCache, resolve_kv_dtype
from minigptq.quantize import quantize_model
from minigptq.quantizer import QuantConfig
from minigptq.transformer import rotate_half

HALF = [torch.float16, torch.bfloat16]
needs_cpu = pytest.mark.skipif(not kernels.cpu_available(), reason="the C++ CPU kernels are not built")


@needs_cpu
@pytest.mark.parametrize("dtype", HALF + [torch.float32])
@pytest.mark.parametrize("hd", [64, 12])  # 64: the AVX2 + F16C code where the CPU has it; 12: the scalar fallback
def test_attn_decode_over_a_half_cache_equals_torch(dtype, hd):
    """cpu_attn_decode writes the rotated key and the value rounded to the cache's dtype bit for bit as torch's .to()
    rounds them, and attends over the cache as SDPA does over it read back to fp32."""
    g = torch.Generator().manual_seed(0)
    B, H, KVH, Smax, slot, L = 2, 4, 2, 10, 6, 3
    q, k, v = (torch.randn(B, 1, n * hd, generator=g) for n in (H, KVH, KVH))
    k_cache = torch.randn(L, B, KVH, Smax, hd, generator=g).to(dtype)
    v_cache = torch.randn(L, B, KVH, Smax, hd, generator=g).to(dtype)
    ang = torch.randn(B, 1, 1, hd // 2, generator=g)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    mask = torch.zeros(B, 1, 1, slot + 1)
    mask[1, ..., :2] = float("-inf")  # left padding of sequence 1
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    out = kernels.cpu_attn_decode(q, k, v, H * hd, KVH * hd, hd, cos, sin, k_cache, v_cache, 1, mask, H, slot)

    qq, kk, vv = (t.view(B, 1, -1, hd).transpose(1, 2) for t in (q, k, v))
    qq, kk = qq * cos + rotate_half(qq) * sin, kk * cos + rotate_half(kk) * sin
    k_ref[1, :, :, slot:slot + 1], v_ref[1, :, :, slot:slot + 1] = kk.to(dtype), vv.to(dtype)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    want = F.scaled_dot_product_attention(qq, k_ref[1, :, :, :slot + 1].float(), v_ref[1, :, :, :slot + 1].float(),
                                          attn_mask=mask, enable_gqa=True).transpose(1, 2).reshape(B, 1, H * hd)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@needs_cpu
@pytest.mark.parametrize("dtype", HALF)
def test_half_rounding_of_extreme_values_equals_torch(dtype):
    """Overflow, infinities, subnormals and ties round as torch rounds (both the F16C and the scalar fp16 code)."""
    for hd in (64, 12):
        x = torch.randn(hd, generator=torch.Generator().manual_seed(1)) * torch.logspace(-10, 6, hd)
        x[:6] = torch.tensor([float("inf"), -float("inf"), 65519.0, 65520.0, 6e-8, 1 + 2 ** -11])
        k_cache = torch.zeros(1, 1, 1, 2, hd, dtype=dtype)
        v_cache = k_cache.clone()
        kernels.cpu_attn_decode(torch.zeros(1, 1, hd), x.view(1, 1, hd), x.view(1, 1, hd), hd, hd, hd, None, None,
                                k_cache, v_cache, 0, None, 1, 0)
        assert torch.equal(k_cache[0, 0, 0, 0], x.to(dtype)), hd


@pytest.fixture(scope="module")
def tiny_rtn(hf_checkpoints, tmp_path_factory):
    """A tiny Llama (GQA) as 4-bit RTN: packed, so that each block's decode step is one C++ call."""
    return quantize_model(hf_checkpoints("llama-gqa-tied"), tmp_path_factory.mktemp("kv") / "q", method="rtn",
                          qcfg=QuantConfig(bits=4, group_size=32), log=lambda m: None)


def _steps(model, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Logits of a prefill of 8 tokens, then one token at a time, through a cache of `dtype`."""
    cache = KVCache(model.cfg, 1, tokens.shape[1], dtype, "cpu")
    with torch.inference_mode():
        out = [model(tokens[:, :8], cache, 0)]
        out += [model(tokens[:, t:t + 1], cache, t) for t in range(8, tokens.shape[1])]
    return torch.cat(out, dim=1)


@needs_cpu
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("packed", [True, False])  # the whole-block C++ step / the C++ attention between modules
def test_fast_decode_with_a_half_cache_equals_the_reference(hf_checkpoints, tiny_rtn, monkeypatch, dtype, packed):
    model = load_model(tiny_rtn if packed else hf_checkpoints("llama-gqa-tied"), dtype="fp32", cpu_kernel="exact")
    assert (model.decode_plans() is not None) == packed
    tokens = torch.randint(3, 500, (1, 14), generator=torch.Generator().manual_seed(8))
    fast = _steps(model, tokens, dtype)
    batch = [tokens[0, :9].tolist(), tokens[0, :5].tolist()]  # left-padded: the padding mask goes to C++ too
    new_fast, stats = generate(model, batch, max_new_tokens=5, kv_dtype=dtype)
    with monkeypatch.context() as m:
        m.setattr(fast_decode, "_cpu_fast", lambda x: False)  # every module runs its torch reference
        ref = _steps(model, tokens, dtype)
        new_ref, _ = generate(model, batch, max_new_tokens=5, kv_dtype=dtype)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)
    assert new_fast == new_ref
    assert stats.kv_dtype == dtype
    # the half cache's rounding moves the logits a little from the fp32 cache's (the reference, both)
    full = _steps(model, tokens, torch.float32)
    assert 0 < (ref - full).abs().max() < (2e-2 if dtype == torch.bfloat16 else 3e-3) * full.abs().max()


def test_kv_dtype_auto_halves_the_cache_on_the_cpu(hf_checkpoints):
    assert resolve_kv_dtype("auto", torch.float32, "cpu") == torch.float16
    assert resolve_kv_dtype("auto", torch.bfloat16, "cpu") == torch.bfloat16
    assert resolve_kv_dtype("auto", torch.float32, "cuda") == torch.float32
    assert resolve_kv_dtype("bf16", torch.float32, "cpu") == torch.bfloat16
    model = load_model(hf_checkpoints("llama-gqa-tied"), dtype="fp32")
    _, auto = generate(model, [[5, 6, 7]], max_new_tokens=3)
    _, full = generate(model, [[5, 6, 7]], max_new_tokens=3, kv_dtype="fp32")
    assert auto.kv_dtype == torch.float16 and 2 * auto.kv_cache_bytes == full.kv_cache_bytes > 0


def test_bad_kv_dtype_is_refused(hf_checkpoints, capsys):
    with pytest.raises(Error, match=r"kv_dtype must be one of auto, fp32, fp16, bf16, got 'fp8'"):
        resolve_kv_dtype("fp8", torch.float32, "cpu")
    model = load_model(hf_checkpoints("llama-gqa-tied"), dtype="fp32")
    with pytest.raises(Error, match="kv_dtype must be one of"):
        generate(model, [[5, 6, 7]], max_new_tokens=2, kv_dtype=torch.int8)
    with pytest.raises(SystemExit):
        generate_parser().parse_args(["--model", "m", "--prompt", "p", "--kv-dtype", "int4"])
    assert "--kv-dtype: invalid choice: 'int4'" in capsys.readouterr().err


def test_an_fp16_cache_overflow_is_named(hf_checkpoints):
    """Values beyond fp16's range (65504) become Inf in an fp16 cache: the non-finite logits error says to use
    --kv-dtype bf16 or fp32, with which the same model runs."""
    model = load_model(hf_checkpoints("llama-gqa-tied"), dtype="fp32")
    with torch.no_grad():
        model.layers[0].attn.v.weight.mul_(1e6)
    with pytest.raises(Error, match="overflowed the fp16 KV cache.*--kv-dtype bf16 or fp32"):
        generate(model, [[5, 6, 7]], max_new_tokens=3)
    new, _ = generate(model, [[5, 6, 7]], max_new_tokens=3, kv_dtype="bf16")
    assert len(new[0]) == 3
