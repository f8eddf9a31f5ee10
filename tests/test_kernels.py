"""Compiled kernels (minigptq/kernels/) against the torch reference (pack.dequantize + matmul in float64).

Random layers with fresh seeds: every bit width, odd and Llama-like shapes, groups with a partial last group, groups
not aligned to the packing unit, group_size -1, and act-order g_idx. CPU tests run every instruction set the CPU
has (scalar, avx2, avx512); CUDA tests are marked gpu and skip without a usable GPU.
"""

import pytest
import torch

from minigptq import kernels
from minigptq.pack import dequantize, pack_cols, pack_rows

# Largest |y - y_ref| allowed, relative to max |y_ref|, per output dtype: fp32 accumulation in another order,
# or the final rounding to a 16-bit float.
TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}

# (K, N, group_size, act_order): small odd shapes, unaligned / partial groups, one group, act-order, Llama-like.
CASES = [
    (256, 96, 64, False),
    (384, 160, 128, False),    # 3 groups, N not a multiple of the 64-column tile
    (128, 40, 32, False),      # N not a multiple of the 16 (AVX-512) / 8 (AVX2) lanes (4- and 8-bit only)
    (320, 64, 48, False),      # groups cross packing units (48 % 32), partial last group (320 = 6*48 + 32)
    (160, 32, 20, True),       # act-order, tiny unaligned groups (only for bits where 160 is whole units)
    (512, 128, -1, False),     # one group
    (1024, 288, 128, True),    # act-order
    (4096, 1024, 128, False),  # Llama-like K
]
CPU_ISAS = kernels.cpu_isas()
needs_cpu = pytest.mark.skipif(not kernels.cpu_available(), reason=f"no CPU kernels: {kernels.CPU_IMPORT_ERROR}")
needs_gpu = pytest.mark.skipif(not kernels.cuda_available(), reason="CUDA kernels cannot run here")


def random_layer(K, N, group_size, act_order, bits, seed):
    """Checkpoint tensors (qweight, qzeros, scales, g_idx) of a random layer, qzeros stored raw (checkpoint_format gptq_v2)."""
    g = torch.Generator().manual_seed(seed)
    G = 1 if group_size == -1 else -(-K // group_size)
    q = torch.randint(0, 2**bits, (K, N), generator=g)
    zeros = torch.randint(0, 2**bits, (G, N), generator=g)
    scales = (torch.rand(G, N, generator=g) * 0.02 + 0.001).half()
    g_idx = torch.arange(K) // (K if group_size == -1 else group_size)
    if act_order:
        g_idx = g_idx[torch.randperm(K, generator=g)]
    return pack_rows(q, bits), pack_cols(zeros, bits), scales, g_idx.to(torch.int32)


def cases(bits):
    unit = 32 if bits == 3 else 32 // bits
    return [c for c in CASES if c[0] % unit == 0 and c[1] % unit == 0]


def rel_err(y, ref):
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module")
def layers():
    """bits -> list of (case, layout, W fp32 [K, N] reference), built once (packing 4096 x 1024 takes a moment)."""
    out = {}
    for bits in (2, 3, 4, 8):
        out[bits] = []
        for i, case in enumerate(cases(bits)):
            qw, qz, s, g_idx = random_layer(*case, bits, seed=100 * bits + i)
            W = dequantize(qw, qz, s.float(), g_idx, bits, "gptq_v2")  # exact fp32 values of s * (q - z)
            out[bits].append((case, kernels.make_layout(qw, qz, s, g_idx, bits, "gptq_v2"), W))
    return out


# ---------------------------------------------------------------------------------------------------------- CPU
@needs_cpu
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_cpu_qgemm_matches_reference(layers, bits, isa):
    seed = torch.seed()  # fresh activations every run; printed on failure
    for case, layout, W in layers[bits]:
        if isa == "scalar" and case[0] * case[1] > 2**20:
            continue  # the portable build is slow; the big shape runs on the SIMD builds
        for M in (1, 3, 16):
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(M, case[0]).to(dtype)
                y = kernels.cpu_qgemm(x, layout, isa=isa)
                assert y.dtype == dtype and y.shape == (M, case[1])
                err = rel_err(y, x.double() @ W.double())
                assert err < TOL[dtype], f"{case=} {M=} {dtype=} {isa=} seed={seed}: rel err {err:.2e}"


@needs_cpu
@pytest.mark.parametrize("bits", [3, 4])
def test_cpu_qgemm_llama_shape(bits):
    qw, qz, s, g_idx = random_layer(4096, 4096, 128, True, bits, seed=torch.seed() % 2**31)
    layout = kernels.make_layout(qw, qz, s, g_idx, bits, "gptq_v2")
    W = dequantize(qw, qz, s.float(), g_idx, bits, "gptq_v2")
    x = torch.randn(2, 4096)
    assert rel_err(kernels.cpu_qgemm(x, layout), x.double() @ W.double()) < TOL[torch.float32]


@needs_cpu
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_cpu_dequantize_is_exact(layers, bits, isa):
    for case, layout, W in layers[bits][:4]:
        assert torch.equal(kernels.cpu_dequantize(layout, torch.float32, isa=isa), W), case
        assert torch.equal(kernels.cpu_dequantize(layout, torch.bfloat16, isa=isa), W.bfloat16()), case


@needs_cpu
def test_cpu_thread_count_does_not_change_the_result(layers):
    _, layout, _ = layers[4][-1]
    x = torch.randn(5, layout.shape[0])
    ys = [kernels.cpu_qgemm(x, layout, threads=t) for t in (1, 2, 3)]
    assert torch.equal(ys[0], ys[1]) and torch.equal(ys[0], ys[2])


@needs_cpu
def test_cpu_wrapper_errors(layers):
    _, layout, _ = layers[4][0]  # K=256, N=96
    msg = r"x must be a float32 or bfloat16 contiguous CPU tensor \[M, K=256\].*float16"
    with pytest.raises(ValueError, match=msg):
        kernels.cpu_qgemm(torch.randn(1, 256).half(), layout)
    with pytest.raises(ValueError, match=r"\[M, K=256\].*\[2, 128\]"):
        kernels.cpu_qgemm(torch.randn(2, 128), layout)
    with pytest.raises(ValueError, match="non-contiguous"):
        kernels.cpu_qgemm(torch.randn(256, 2).T, layout)
    with pytest.raises(ValueError, match="on meta"):
        kernels.cpu_qgemm(torch.randn(1, 256, device="meta"), layout)
    with pytest.raises(ValueError, match="threads=0"):
        kernels.cpu_qgemm(torch.randn(1, 256), layout, threads=0)
    with pytest.raises(ValueError, match="isa='sse'"):
        kernels.cpu_qgemm(torch.randn(1, 256), layout, isa="sse")
    with pytest.raises(ValueError, match="dtype must be float32 or bfloat16"):
        kernels.cpu_dequantize(layout, torch.float16)


def test_layout_errors():
    qw, qz, s, g_idx = random_layer(96, 64, 32, False, 4, seed=0)
    good = kernels.make_layout(qw, qz, s, g_idx, 4, "gptq")
    fields = dict(qweight=good.qweight, scales=good.scales, zeros=good.zeros, row_group=good.row_group, perm=None,
                  bits=4)
    with pytest.raises(ValueError, match=r"qweight must be int32 contiguous \[K\*bits/32, N\]=\[12, 64\] on cpu, "
                                         r"got int64 \[12, 64\]"):
        kernels.KernelLayout(**{**fields, "qweight": good.qweight.long()})
    with pytest.raises(ValueError, match=r"qweight .*got int32 non-contiguous \[12, 64\]"):
        kernels.KernelLayout(**{**fields, "qweight": good.qweight.T.contiguous().T})
    with pytest.raises(ValueError, match=r"scales must be float32 contiguous \[G, N\]=\[3, 64\].*got float16"):
        kernels.KernelLayout(**{**fields, "scales": good.scales.half()})
    with pytest.raises(ValueError, match=r"zeros must be int16 contiguous \[G, N\]=\[3, 64\].*\[3, 32\]"):
        kernels.KernelLayout(**{**fields, "zeros": good.zeros[:, :32].contiguous()})
    with pytest.raises(ValueError, match="row_group must be nondecreasing"):
        kernels.KernelLayout(**{**fields, "row_group": good.row_group.flip(0).contiguous()})
    with pytest.raises(ValueError, match=r"perm must be int32 contiguous \[K\]=\[96\]"):
        kernels.KernelLayout(**{**fields, "perm": torch.arange(96)})
    with pytest.raises(ValueError, match="bits=5"):
        kernels.KernelLayout(**{**fields, "bits": 5})


@needs_cpu
def test_compiled_module_checks_indices_itself():
    """The C++ side re-checks the values that index memory (row_group, perm) and raises ValueError."""
    qw, qz, s, g_idx = random_layer(64, 32, 32, False, 4, seed=0)
    L = kernels.make_layout(qw, qz, s, g_idx, 4, "gptq")
    x, out = torch.randn(1, 64), torch.empty(1, 32)
    bad_group = torch.full((64,), 5, dtype=torch.int32)
    bad_perm = torch.full((64,), 64, dtype=torch.int32)
    for rg, pm, msg in ((bad_group, 0, r"row_group\[0\]=5"), (L.row_group, bad_perm.data_ptr(), r"perm\[0\]=64")):
        with pytest.raises(ValueError, match=msg):
            kernels.cpu._cpu.qgemm(x.data_ptr(), 0, 1, L.qweight.data_ptr(), L.scales.data_ptr(), L.zeros.data_ptr(),
                               rg.data_ptr(), pm, 64, 32, 2, 4, out.data_ptr(), 1, 0)


def test_act_order_layout_sorts_rows_and_keeps_inputs():
    qw, qz, s, g_idx = random_layer(128, 32, 32, True, 4, seed=1)
    before = qw.clone()
    L = kernels.make_layout(qw, qz, s, g_idx, 4, "gptq")
    assert torch.equal(qw, before)  # the checkpoint tensor is untouched
    assert L.perm is not None and bool((L.row_group[1:] >= L.row_group[:-1]).all())
    assert torch.equal(L.row_group, g_idx[L.perm.long()])
    plain = kernels.make_layout(*random_layer(128, 32, 32, False, 4, seed=1), 4, "gptq")
    assert plain.perm is None


# --------------------------------------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_cuda_qgemm_matches_reference(bits):
    seed = torch.seed()  # fresh layers and activations every run; printed on failure
    for i, case in enumerate(cases(bits)):
        qw, qz, s, g_idx = random_layer(*case, bits, seed=(seed + i) % 2**31)
        W = dequantize(qw, qz, s.float(), g_idx, bits, "gptq_v2").cuda()
        L = kernels.make_layout(qw.cuda(), qz.cuda(), s.cuda(), g_idx.cuda(), bits, "gptq_v2")
        for M in (1, 2, 5, 16, 20):
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                x = torch.randn(M, case[0], device="cuda").to(dtype)
                y = kernels.cuda_qgemm(x, L)
                assert y.dtype == dtype and y.shape == (M, case[1])
                err = rel_err(y, x.double() @ W.double())
                assert err < TOL[dtype], f"{case=} {M=} {dtype=} seed={seed}: rel err {err:.2e}"


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_cuda_dequantize_is_exact(bits):
    for i, case in enumerate(cases(bits)):
        qw, qz, s, g_idx = random_layer(*case, bits, seed=i)
        W = dequantize(qw, qz, s.float(), g_idx, bits, "gptq_v2").cuda()
        L = kernels.make_layout(qw.cuda(), qz.cuda(), s.cuda(), g_idx.cuda(), bits, "gptq_v2")
        assert torch.equal(kernels.cuda_dequantize(L, torch.float32), W), case
        assert torch.equal(kernels.cuda_dequantize(L, torch.float16), W.half()), case
        assert torch.equal(kernels.cuda_dequantize(L, torch.bfloat16), W.bfloat16()), case


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_qgemm_is_deterministic_and_capturable(dtype):
    """Bitwise-identical results run to run (fixed-order K reduction), and one call can be captured in a CUDA graph
    (no allocation, sync or device query inside; the workspace counters are left at zero)."""
    qw, qz, s, g_idx = random_layer(4096, 1024, 128, True, 4, seed=3)
    L = kernels.make_layout(qw.cuda(), qz.cuda(), s.cuda(), g_idx.cuda(), 4, "gptq_v2")
    x = (torch.randn(1, 4096, device="cuda") * 30).to(dtype)
    ys = [kernels.cuda_qgemm(x, L) for _ in range(5)]
    assert all(torch.equal(ys[0], y) for y in ys[1:])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on the capture's side stream, as torch.cuda.graphs asks
        kernels.cuda_qgemm(x, L)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_graph = kernels.cuda_qgemm(x, L)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y_graph, ys[0])


@pytest.mark.gpu
@needs_gpu
def test_cuda_wrapper_errors():
    qw, qz, s, g_idx = random_layer(256, 96, 64, False, 4, seed=0)
    L = kernels.make_layout(qw.cuda(), qz.cuda(), s.cuda(), g_idx.cuda(), 4, "gptq_v2")
    with pytest.raises(ValueError, match=r"x must be a float16, bfloat16 or float32 contiguous tensor \[M, K=256\]"):
        kernels.cuda_qgemm(torch.randn(1, 256), L)  # on the CPU
    with pytest.raises(ValueError, match="non-contiguous"):
        kernels.cuda_qgemm(torch.randn(256, 2, device="cuda").T, L)
    with pytest.raises(ValueError, match="layout must be on a CUDA device"):
        kernels.cuda_qgemm(torch.randn(1, 256, device="cuda"), kernels.make_layout(qw, qz, s, g_idx, 4, "gptq_v2"))


# The CUDA kernels' logic without a GPU (host emulation): tests/test_cuda_emu.py.
