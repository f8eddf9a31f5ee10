"""QuantLinear (minigptq/qlinear.py): checkpoint buffers, post_load contract, forward paths against the reference."""
import warnings

import pytest
import torch

from minigptq import kernels, qlinear
from minigptq.pack import pack_cols, unpack_cols
from minigptq.qlinear import QuantLinear

TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}  # max |y - ref| / max |ref|


def solver_output(N, K, bits, group_size, act_order=False, sym=True, seed=0):
    """What the GPTQ solver hands to from_codes: codes [N, K], scales [G, N], raw zeros [G, N], g_idx [K]."""
    g = torch.Generator().manual_seed(seed)
    G = 1 if group_size == -1 else -(-K // group_size)
    codes = torch.randint(0, 2**bits, (N, K), generator=g)
    scales = torch.rand(G, N, generator=g) * 0.02 + 0.001
    zeros = torch.full((G, N), 2 ** (bits - 1)) if sym else torch.randint(1, 2**bits, (G, N), generator=g)
    g_idx = torch.arange(K) // (K if group_size == -1 else group_size)
    if act_order:
        g_idx = g_idx[torch.randperm(K, generator=g)]
    return codes, scales, zeros, g_idx


def reference(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    y = x.double() @ layer.dequantized_weight().double().T
    return y + layer.bias.double() if layer.bias is not None else y


def rel_err(y, ref):
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


def test_buffers_are_the_checkpoint_tensors():
    codes, scales, zeros, g_idx = solver_output(64, 256, 4, 128)
    layer = QuantLinear.from_codes(codes, scales, zeros, g_idx, torch.randn(64), 4, 128)
    sd = layer.state_dict()
    assert {k: (v.dtype, tuple(v.shape)) for k, v in sd.items()} == {
        "qweight": (torch.int32, (32, 64)), "qzeros": (torch.int32, (2, 8)), "scales": (torch.float16, (2, 64)),
        "g_idx": (torch.int32, (256,)), "bias": (torch.float16, (64,))}
    assert [n for n, _ in layer.named_buffers()] == list(sd)  # nothing else a loader could trip over
    assert ((sd["qzeros"].numpy().astype("int64") & 0xFFFFFFFF) == 0x77777777).all()  # sym 4-bit, v1
    W = scales.half().float()[g_idx].T * (codes - zeros[g_idx].T)  # (N, K)
    assert torch.equal(layer.dequantized_weight(), W)
    assert layer.checkpoint_format == "gptq"


def test_from_codes_rejects_zero_points_v1_cannot_store():
    codes, scales, zeros, g_idx = solver_output(32, 64, 4, 32, sym=False)
    zeros[0, 3] = 0
    with pytest.raises(ValueError, match=r"zero points must lie in \[1, 15\].*got \[0, "):
        QuantLinear.from_codes(codes, scales, zeros, g_idx, None, 4, 32)
    with pytest.raises(ValueError, match=r"scales must have shape \[2, 32\]"):
        QuantLinear.from_codes(codes, scales[:1], zeros, g_idx, None, 4, 32)


@pytest.mark.parametrize("bits,group_size,act_order", [(4, 128, False), (3, 64, True), (2, -1, False), (8, 96, True)])
def test_forward_matches_reference(bits, group_size, act_order):
    K, N = 384, 96 if bits != 3 else 128
    codes, scales, zeros, g_idx = solver_output(N, K, bits, group_size, act_order, sym=False, seed=bits)
    layer = QuantLinear.from_codes(codes, scales, zeros, g_idx, torch.randn(N), bits, group_size)
    for shape in [(1, K), (2, 3, K), (40, K)]:  # decode, small batch, prefill (dequantize + matmul)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.randn(shape).to(dtype)
            y = layer(x)
            assert y.dtype == dtype and y.shape == (*shape[:-1], N)
            assert rel_err(y, reference(layer, x)) < TOL[dtype], (shape, dtype)


@pytest.mark.skipif(not kernels.cpu_available(), reason="no CPU kernels")
def test_paths_by_batch_size():
    layer = QuantLinear.from_codes(*solver_output(32, 64, 4, 32), None, 4, 32)
    assert layer.path_for(torch.randn(1, 64)) == "cpu-fused"
    assert layer.path_for(torch.randn(2, 8, 64)) == "cpu-fused"
    assert layer.path_for(torch.randn(17, 64)) == "cpu-dequant"


def test_reference_fallback_warns_once(monkeypatch):
    layer = QuantLinear.from_codes(*solver_output(32, 64, 4, 32), None, 4, 32)
    x = torch.randn(2, 64)
    expect = reference(layer, x)
    monkeypatch.setattr(kernels.cpu, "_cpu", None)
    monkeypatch.setattr(qlinear, "_warned", set())
    assert layer.path_for(x) == "reference"
    with pytest.warns(RuntimeWarning, match="no compiled cpu kernel"):
        y = layer(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)  # no second warning
    assert rel_err(y, expect) < TOL[torch.float32]


def test_gptq_v2_zeros_give_the_same_layer():
    codes, scales, zeros, g_idx = solver_output(64, 128, 4, 32, sym=False)
    v1 = QuantLinear.from_codes(codes, scales, zeros, g_idx, None, 4, 32)
    v2 = QuantLinear(128, 64, 4, 32, bias=False)
    v2.load_state_dict({**v1.state_dict(), "qzeros": pack_cols(unpack_cols(v1.qzeros, 4, 64) + 1, 4)})
    v2.checkpoint_format = "gptq_v2"
    v2.post_load()
    x = torch.randn(3, 128)
    assert torch.equal(v2.dequantized_weight(), v1.dequantized_weight())
    assert torch.equal(v2(x), v1(x))


def test_post_load_contract():
    codes, scales, zeros, g_idx = solver_output(64, 128, 3, 32, act_order=True)
    src = QuantLinear.from_codes(codes, scales, zeros, g_idx, torch.randn(64), 3, 32)
    saved = {k: v.clone() for k, v in src.state_dict().items()}
    for k, v in src.state_dict().items():  # post_load (act-order re-sort included) left the buffers alone
        assert torch.equal(v, saved[k]), k

    with torch.device("meta"):  # the loader's way: build on meta, assign the tensors, then post_load
        layer = QuantLinear(128, 64, 3, 32, bias=True)
    with pytest.raises(RuntimeError, match="post_load"):
        layer(torch.randn(1, 128))
    with pytest.raises(ValueError, match="meta device"):
        layer.post_load()
    for k, v in saved.items():
        layer._buffers[k] = v
    layer.post_load()
    x = torch.randn(2, 128)
    assert torch.equal(layer(x), src(x))

    layer.checkpoint_format = "gptq_v3"
    with pytest.raises(ValueError, match="checkpoint_format='gptq_v3' is not supported"):
        layer.post_load()
    layer.checkpoint_format = "gptq"
    layer._buffers["g_idx"] = torch.full((128,), 4, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"g_idx values must lie in \[0, 4\)"):
        layer.post_load()
    layer._buffers["g_idx"] = saved["g_idx"]
    layer._buffers["scales"] = saved["scales"][:3]
    with pytest.raises(ValueError, match=r"qzeros must be torch.int32 \[3, 6\] .* got torch.int32 \[4, 6\]"):
        layer.post_load()


def test_load_state_dict_rebuilds_an_existing_layout():
    a = QuantLinear.from_codes(*solver_output(64, 128, 4, 32, seed=1), None, 4, 32)
    b = QuantLinear.from_codes(*solver_output(64, 128, 4, 32, act_order=True, seed=2), None, 4, 32)
    x = torch.randn(2, 128)
    a.load_state_dict(b.state_dict())  # no explicit post_load: the hook rebuilds the kernel layout
    assert torch.equal(a(x), b(x))


def test_inputs_that_require_grad_take_the_differentiable_reference():
    layer = QuantLinear.from_codes(*solver_output(32, 64, 4, 32), torch.randn(32), 4, 32)
    x = torch.randn(3, 64, requires_grad=True)
    assert layer.path_for(x) == "reference"
    layer(x).sum().backward()
    assert torch.allclose(x.grad, layer.dequantized_weight().sum(0).expand(3, 64), atol=1e-5)
    with torch.no_grad():
        assert layer.path_for(x) != "reference" or not kernels.cpu_available()


def test_dtype_and_device_moves_rebuild_the_layout():
    layer = QuantLinear.from_codes(*solver_output(64, 128, 4, 32, sym=False), torch.randn(64), 4, 32)
    x = torch.randn(1, 128)
    y16 = layer(x)
    layer.to(torch.bfloat16)  # scales and bias become bf16; the kernel layout follows
    assert layer.scales.dtype == torch.bfloat16 and layer._layout.scales.dtype == torch.float32
    assert rel_err(layer(x), reference(layer, x)) < TOL[torch.float32]
    assert rel_err(layer(x), y16.double()) < 1e-2
    layer.to("meta")
    assert layer._layout is None


def test_constructor_errors():
    with pytest.raises(ValueError, match="in_features=100 must be divisible by 32"):
        QuantLinear(100, 64, 3, 128, bias=False)
    with pytest.raises(ValueError, match="group_size=0"):
        QuantLinear(128, 64, 4, 0, bias=False)
    layer = QuantLinear.from_codes(*solver_output(32, 64, 4, 32), None, 4, 32)
    with pytest.raises(ValueError, match=r"x must be a floating tensor \[..., 64\]"):
        layer(torch.randn(1, 32))


@pytest.mark.gpu
@pytest.mark.skipif(not kernels.cuda_available(), reason="CUDA kernels cannot run here")
@pytest.mark.parametrize("bits", [3, 4])
def test_cuda_forward(bits):
    codes, scales, zeros, g_idx = solver_output(256, 512, bits, 128, act_order=True, sym=False, seed=bits)
    layer = QuantLinear.from_codes(codes, scales, zeros, g_idx, torch.randn(256), bits, 128).cuda()
    for M in (1, 7, 64):
        for dtype in (torch.float16, torch.bfloat16):
            x = torch.randn(M, 512, device="cuda").to(dtype)
            assert layer.path_for(x) == ("cuda-fused" if M <= 16 else "cuda-dequant")
            assert rel_err(layer(x), reference(layer, x)) < TOL[dtype]
