"""The int8-activation CPU kernels (AVX-512 VNNI / AVX-VNNI) and the fused q/k/v, gate/up projections.

- The kernels equal their torch reference (kernels.int8_reference: the same int8 scheme with integer accumulation)
  bit for bit, for every bit width, groups (with a partial last group), act-order, odd shapes and 1..16 rows; the
  batched kernel (M > 16) too, from either layout, including the codes and activations where AVX2's int16 pair sums
  would saturate if the scheme allowed it.
- They stay within a stated tolerance of the exact fp32 result (the cost of int8 activations).
- Fused projections give the same logits as separate calls, bit for bit, in both kernel modes.
"""
from __future__ import annotations

import pytest
import torch

from minigptq import kernels
from minigptq.pack import dequantize, pack_cols, pack_rows
from minigptq.qlinear import QuantLinear

needs_vnni = pytest.mark.skipif(not kernels.cpu_int8_available(),
                                reason="this CPU (or build) has none of AVX2, AVX-512 VNNI, AVX-VNNI (the int8 "
                                       "kernels' hardware)")
ISAS = [isa for isa in kernels.INT8_ISAS if isa in kernels.cpu_isas()]
INT8_REL_TOL = 0.02  # |y_int8 - y_fp32| / |y_fp32| (Frobenius) for Gaussian activations; measured ~0.006


def random_layer(K, N, bits, gs, act_order, seed):
    g = torch.Generator().manual_seed(seed)
    G = -(-K // gs)
    q = torch.randint(0, 2**bits, (K, N), generator=g)
    z = torch.randint(0, 2**bits, (G, N), generator=g)
    s = (torch.rand(G, N, generator=g) * 0.05 + 0.001).half()
    g_idx = (torch.randperm(K, generator=g) // gs if act_order else torch.arange(K) // gs).to(torch.int32)
    return pack_rows(q, bits), pack_cols(z, bits), s, g_idx


CASES = [  # (K, N, group size): partial last groups, N not a multiple of the 64-column tile, tiny and wide
    (256, 96, 64), (160, 224, 48), (96, 64, 32), (64, 320, -1), (512, 32, 128), (608, 160, 128),
]


@needs_vnni
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_int8_kernels_equal_their_reference_exactly(bits, act_order):
    unit = 32 if bits == 3 else 32 // bits
    for i, (K, N, gs) in enumerate(CASES):
        if K % unit or N % unit:
            continue
        gs = K if gs == -1 else gs
        qw, qz, s, g_idx = random_layer(K, N, bits, gs, act_order, seed=10 * bits + i)
        L = kernels.make_layout(qw, qz, s, g_idx, bits, "gptq_v2", cpu_kernel="int8")
        exact = kernels.make_layout(qw, qz, s, g_idx, bits, "gptq_v2")
        assert torch.equal(kernels.cpu_dequantize(L), kernels.cpu_dequantize(exact))  # the M > 16 path
        for M in (1, 2, 3, 5, 16):
            x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
            ref = kernels.int8_reference(x, L)
            for isa in ISAS:
                y = kernels.cpu_qgemm_int8(x, L, isa=isa)
                assert torch.equal(y, ref), (bits, act_order, K, N, gs, M, isa, (y - ref).abs().max())
            y_fp32 = x @ dequantize(qw, qz, s.float(), g_idx, bits, "gptq_v2")
            rel = ((ref - y_fp32).norm() / y_fp32.norm()).item()
            assert rel < INT8_REL_TOL, (bits, K, N, M, rel)


@needs_vnni
def test_int8_kernels_bf16_and_threads():
    qw, qz, s, g_idx = random_layer(512, 192, 4, 128, True, seed=1)
    L = kernels.make_layout(qw, qz, s, g_idx, 4, "gptq", cpu_kernel="int8")
    x = torch.randn(4, 512, generator=torch.Generator().manual_seed(2)).bfloat16()
    ref = kernels.int8_reference(x, L)
    for threads in (1, 2, 3):
        y = kernels.cpu_qgemm_int8(x, L, threads=threads)
        assert y.dtype == torch.bfloat16 and torch.equal(y, ref.bfloat16())


@needs_vnni
def test_int8_kernels_exact_when_every_step_is_exact():
    """Activations already on an int8 grid with power-of-two scales: the int8 path loses nothing, and equals the
    fp32 result computed in float64."""
    K, N, bits = 256, 128, 4
    qw, qz, _, g_idx = random_layer(K, N, bits, 128, False, seed=3)
    s = torch.full((2, N), 2.0**-6).half()
    g = torch.Generator().manual_seed(4)
    x = torch.randint(-127, 128, (3, K), generator=g).float() * 2.0**-5
    x[:, ::kernels.CHUNK_ROWS_INT8] = 127 * 2.0**-5  # max |x| of every chunk = 127 * 2^-5: its scale is 2^-5 exactly
    L = kernels.make_layout(qw, qz, s, g_idx, bits, "gptq", cpu_kernel="int8")
    W = dequantize(qw, qz, s.double(), g_idx, bits, "gptq")
    assert torch.equal(kernels.cpu_qgemm_int8(x, L).double(), x.double() @ W)


@needs_vnni
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_int8_staging_edge_values(bits):
    """The activation staging (vector code for whole chunks, scalar for the rest) on the values where rounding and
    special cases differ: exact ties of x * 127 / max|x| (round half to even), all-zero chunks, subnormal maxima
    (counted as zero: 127 / max|x| would overflow), large values, and Inf or NaN in one chunk (the whole output row
    NaN, as the fp32 kernels give)."""
    K, N = 256, 64
    qw, qz, s, g_idx = random_layer(K, N, bits, 128, False, seed=7)
    L = kernels.make_layout(qw, qz, s, g_idx, bits, "gptq", cpu_kernel="int8")
    g = torch.Generator().manual_seed(8)
    x = torch.randn(6, K, generator=g)
    x[0, :32] = torch.arange(32) - 15.5  # with max|x| = 127 the codes are round(x): ties at every -15.5 .. 15.5
    x[0, 0] = 127.0
    x[0, 32:64] = (torch.arange(32) % 5 - 2) / 254  # x * 127 / max|x| = 63.5 k: ties at +-63.5
    x[1, :64] = 0.0  # zero chunks: scale 0, codes 0
    x[2, :32] = torch.randn(32, generator=g) * 1e-40  # subnormals
    x[2, 32:64] = torch.randn(32, generator=g) * 1e30  # large, yet no overflow in the sums
    x[3, 40] = float("inf")
    x[4, 100] = float("nan")
    x[5] = -x[5].abs()
    ref = kernels.int8_reference(x, L)
    for isa in ISAS:
        y = kernels.cpu_qgemm_int8(x, L, isa=isa)
        assert torch.equal(y.isnan(), ref.isnan()), isa
        finite = ~ref.isnan()
        assert torch.equal(y[finite], ref[finite]), (isa, (y - ref)[finite].abs().max())
    assert y[3].isnan().all() and y[4].isnan().all() and not y[[0, 1, 2, 5]].isnan().any()


@needs_vnni
def test_int8_layout_and_bad_calls():
    q = torch.randint(0, 8, (64, 96))
    assert torch.equal(kernels.unpack_fields3(kernels.pack_fields3(q), 64), q.int())
    words = torch.randint(-2**31, 2**31, (10, 100), dtype=torch.int32)
    assert kernels.to_tiles(words).shape == (2, 10, 64) and torch.equal(kernels.from_tiles(kernels.to_tiles(words), 100),
                                                                         words)
    qw, qz, s, g_idx = random_layer(128, 64, 4, 32, False, seed=5)
    L8 = kernels.make_layout(qw, qz, s, g_idx, 4, "gptq", cpu_kernel="int8")
    L = kernels.make_layout(qw, qz, s, g_idx, 4, "gptq")
    x = torch.randn(1, 128)
    with pytest.raises(ValueError, match="fp32 kernels"):
        kernels.cpu_qgemm_int8(x, L)
    with pytest.raises(ValueError, match="int8 kernels' layout"):
        kernels.cpu_qgemm(x, L8)
    with pytest.raises(ValueError, match="isa"):
        kernels.cpu_qgemm_int8(x, L8, isa="avx512")  # an fp32 instruction set
    with pytest.raises(ValueError, match="K=128"):
        kernels.cpu_qgemm_int8(torch.randn(1, 64), L8)
    y = kernels.cpu_qgemm_int8(torch.full((1, 128), float("nan")), L8)
    assert torch.isnan(y).all()  # NaN in, NaN out, as the fp32 kernels


@needs_vnni
def test_quantlinear_int8_path_and_bias():
    g = torch.Generator().manual_seed(6)
    args = (torch.randint(0, 16, (96, 256), generator=g), torch.rand(2, 96, generator=g) * 0.1,
            torch.randint(1, 16, (2, 96), generator=g), torch.arange(256) // 128, torch.randn(96, generator=g), 4, 128)
    exact, int8 = QuantLinear.from_codes(*args), QuantLinear.from_codes(*args, cpu_kernel="int8")
    x = torch.randn(2, 3, 256, generator=g)
    assert int8.path_for(x) == "cpu-int8" and exact.path_for(x) == "cpu-fused"
    assert int8.path_for(torch.randn(17, 256)) == "cpu-int8"  # prefill: the batched int8 kernel
    assert exact.path_for(torch.randn(17, 256)) == "cpu-dequant"  # --cpu-kernel exact: dequantize + fp32 matmul
    y = int8(x)
    ref = kernels.int8_reference(x.reshape(6, 256), int8._layout) + int8.bias.float()
    assert torch.equal(y.reshape(6, 96), ref)
    assert ((y - exact(x)).norm() / exact(x).norm()).item() < INT8_REL_TOL


def test_cpu_kernel_setting(monkeypatch):
    from minigptq.loader import resolve_cpu_kernel
    assert resolve_cpu_kernel("exact") is False
    assert resolve_cpu_kernel("auto") is kernels.cpu_int8_available()
    monkeypatch.setattr(kernels, "cpu_int8_available", lambda: False)
    assert resolve_cpu_kernel("auto") is False
    with pytest.raises(ValueError, match="needs AVX2, AVX-VNNI or AVX-512 VNNI"):
        resolve_cpu_kernel("int8")
    with pytest.raises(ValueError, match="auto, int8, exact"):
        resolve_cpu_kernel("fast")


@pytest.fixture(scope="module")
def tiny_gptq(hf_checkpoints, tmp_path_factory):
    """4-bit act-order checkpoints of a tiny Llama (q/k/v and gate/up fusable) and a tiny OPT (q/k/v with biases)."""
    from conftest import WIKI_VALID
    from minigptq.quantize import quantize_model
    from minigptq.quantizer import QuantConfig
    root = tmp_path_factory.mktemp("fuse")
    calib = root / "calib.txt"
    calib.write_text(WIKI_VALID.read_text()[:20000])
    return {kind: quantize_model(hf_checkpoints(kind), root / kind, qcfg=QuantConfig(bits=4, group_size=32,
                                                                                      act_order=True),
                                 dataset=calib, nsamples=4, seqlen=64, log=lambda m: None)
            for kind in ("llama-gqa-tied", "opt")}


@pytest.mark.parametrize("kind,fused_per_block", [("llama-gqa-tied", 2), ("opt", 1)])
@pytest.mark.parametrize("cpu_kernel", ["exact", "int8"])
def test_fused_projections_equal_separate_calls(tiny_gptq, kind, fused_per_block, cpu_kernel):
    from minigptq import load_model
    from minigptq.generate import generate
    from minigptq.loader import fuse_projections
    if cpu_kernel == "int8" and not kernels.cpu_int8_available():
        pytest.skip("no VNNI on this CPU")
    sep = load_model(tiny_gptq[kind], dtype="fp32", cpu_kernel=cpu_kernel, fuse=False)
    fused = load_model(tiny_gptq[kind], dtype="fp32", cpu_kernel=cpu_kernel)
    assert sum(m.fused is not None for m in fused.modules() if hasattr(m, "fused")) == 2 * fused_per_block
    assert all(getattr(m, "fused", None) is None for m in sep.modules())
    tokens = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        for T in (1, 9):  # the fused kernels (decode-sized) and the dequantize path are both exact
            assert torch.equal(fused(tokens[:1, :T]), sep(tokens[:1, :T]))
        a, _ = generate(fused, tokens.tolist(), max_new_tokens=6)
        b, _ = generate(sep, tokens.tolist(), max_new_tokens=6)
    assert a == b
    assert fused.state_dict().keys() == sep.state_dict().keys()  # fusion adds no tensor to the checkpoint
    assert fuse_projections(sep) == 2 * fused_per_block


@pytest.mark.parametrize("cpu_kernel", ["exact", "int8"])
def test_decode_block_in_one_call_equals_the_modules(tiny_gptq, monkeypatch, cpu_kernel):
    """The CPU decode step as one C++ call per block (FastTransformer.decode_plans) gives the modules' logits, for a
    single sequence and a left-padded batch."""
    from minigptq import load_model
    from minigptq.generate import generate
    from minigptq.fast_decode import FastTransformer
    from minigptq.transformer import KVCache
    if cpu_kernel == "int8" and not kernels.cpu_int8_available():
        pytest.skip("no VNNI on this CPU")
    model = load_model(tiny_gptq["llama-gqa-tied"], dtype="fp32", cpu_kernel=cpu_kernel)
    assert model.decode_plans() is not None and len(model.decode_plans()) == model.cfg.num_layers
    tokens = torch.randint(3, 500, (1, 12), generator=torch.Generator().manual_seed(8))

    def steps(plans_on: bool) -> list[torch.Tensor]:
        with monkeypatch.context() as m:
            if not plans_on:
                m.setattr(FastTransformer, "decode_plans", lambda self: None)
            cache = KVCache(model.cfg, 1, 16, torch.float32, "cpu")
            with torch.inference_mode():
                model(tokens[:, :8], cache, 0)
                return [model(tokens[:, t:t + 1], cache, t) for t in range(8, 12)]
    for a, b in zip(steps(True), steps(False)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    batch = [tokens[0, :9].tolist(), tokens[0, :5].tolist()]  # left-padded: the padding mask goes to C++ too
    new_fast, _ = generate(model, batch, max_new_tokens=5)
    with monkeypatch.context() as m:
        m.setattr(FastTransformer, "decode_plans", lambda self: None)
        new_ref, _ = generate(model, batch, max_new_tokens=5)
    assert new_fast == new_ref


BATCH_ROWS = (17, 31, 70)  # > FUSED_MAX_ROWS: the batched kernel; 70 = several micro-kernel blocks and a remainder


@needs_vnni
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("layout_kind", ["int8", "exact"])
def test_batched_int8_equals_reference_exactly(bits, layout_kind):
    """M > 16 rows: each column tile unpacked to bytes once (cuda/cpu/qgemm_i8b.inc), from the int8 layout or the
    exact kernels' one; bit for bit int8_reference, every bit width, act-order, partial groups and tiles."""
    unit = 32 if bits == 3 else 32 // bits
    for i, (K, N, gs) in enumerate([(256, 96, 64), (160, 224, 48), (608, 160, 128)]):
        if K % unit:
            continue
        qw, qz, s, g_idx = random_layer(K, N, bits, gs, i % 2 == 0, seed=100 + 10 * bits + i)
        L = kernels.make_layout(qw, qz, s, g_idx, bits, "gptq_v2", cpu_kernel=layout_kind)
        for M in BATCH_ROWS:
            x = torch.randn(M, K, generator=torch.Generator().manual_seed(M + i))
            ref = kernels.int8_reference(x, L)
            for isa in ISAS:
                y = kernels.cpu_qgemm_int8(x, L, isa=isa)
                assert torch.equal(y, ref), (bits, layout_kind, K, N, gs, M, isa, (y - ref).abs().max())


@needs_vnni
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_batched_int8_extreme_codes_do_not_saturate(bits):
    """All codes at 2^bits - 1 and activations at +-127 after scaling: the largest int16 pair sums AVX2's
    vpmaddubsw can meet (8-bit codes go through nibble planes); still exactly the reference, and exactly x @ W in
    float64 (power-of-two scales, activations on the int8 grid)."""
    K, N = 128, 96
    top = 2**bits - 1
    qw, qz = pack_rows(torch.full((K, N), top), bits), pack_cols(torch.zeros(1, N, dtype=torch.int64), bits)
    s, g_idx = torch.full((1, N), 2.0**-8).half(), torch.zeros(K, dtype=torch.int32)
    x = torch.full((20, K), 127.0) * torch.tensor([1.0, -1.0]).repeat(10)[:, None]
    for layout_kind in ("int8", "exact"):
        L = kernels.make_layout(qw, qz, s, g_idx, bits, "gptq_v2", cpu_kernel=layout_kind)
        W = dequantize(qw, qz, s.double(), g_idx, bits, "gptq_v2")
        for isa in ISAS:
            y = kernels.cpu_qgemm_int8(x, L, isa=isa)
            assert torch.equal(y, kernels.int8_reference(x, L)), (layout_kind, isa)
            assert torch.equal(y.double(), x.double() @ W), (layout_kind, isa)


@needs_vnni
def test_batched_int8_bf16_threads_and_bad_calls():
    qw, qz, s, g_idx = random_layer(512, 200, 4, 128, True, seed=11)
    L = kernels.make_layout(qw, qz, s, g_idx, 4, "gptq", cpu_kernel="int8")
    x = torch.randn(40, 512, generator=torch.Generator().manual_seed(12)).bfloat16()
    ref = kernels.int8_reference(x, L).bfloat16()
    for threads in (1, 2, 3, 7):  # work items split across tiles and blocks of rows
        y = kernels.cpu_qgemm_int8(x, L, threads=threads)
        assert y.dtype == torch.bfloat16 and torch.equal(y, ref), threads
    exact = kernels.make_layout(qw, qz, s, g_idx, 4, "gptq")
    with pytest.raises(ValueError, match="M > 16 rows"):  # decode rows need the int8 layout
        kernels.cpu_qgemm_int8(torch.randn(16, 512), exact)
    with pytest.raises(ValueError, match="int8 kernels run on"):
        kernels.cpu_qgemm_int8(torch.randn(20, 512), L, isa="avx512")


@pytest.mark.parametrize("isa", kernels.INT8_ISAS)
def test_each_int8_instruction_set_or_skip(isa):
    """Every int8 build (AVX-512 VNNI, AVX-VNNI, AVX2) against the reference, decode and batched rows; one that this
    CPU cannot run is skipped with the reason (the VNNI builds compile everywhere, run only on such CPUs)."""
    if isa not in kernels.cpu_isas():
        pytest.skip(f"this CPU lacks {isa} (it has {kernels.cpu_isas()}); the {isa} int8 kernels cannot run here")
    qw, qz, s, g_idx = random_layer(288, 160, 3, 96, True, seed=13)
    L = kernels.make_layout(qw, qz, s, g_idx, 3, "gptq", cpu_kernel="int8")
    for M in (1, 5, 16, 17, 53):
        x = torch.randn(M, 288, generator=torch.Generator().manual_seed(M))
        assert torch.equal(kernels.cpu_qgemm_int8(x, L, isa=isa), kernels.int8_reference(x, L)), M
