"""The GPTQ packed format (minigptq/pack.py): round trips, the format's test vectors, a hand-computed 3-bit example,
the packing loop the GPTQ-for-LLaMa / AutoGPTQ writers use as an independent oracle, and the reference dequantize."""
import numpy as np
import pytest
import torch

from minigptq.pack import V1_WORD_OFFSET, can_pack, dequantize, pack_cols, pack_rows, unpack_cols, unpack_rows

BITS = (2, 3, 4, 8)


def u32(t: torch.Tensor) -> np.ndarray:
    """int32 words -> their uint32 bit patterns."""
    return t.numpy().astype(np.int64) & 0xFFFFFFFF


def legacy_pack(intweight: np.ndarray, bits: int) -> np.ndarray:
    """The row-packing loop of GPTQ-for-LLaMa / AutoGPTQ's QuantLinear.pack, transcribed: codes [K, N] -> uint32."""
    intweight = intweight.astype(np.uint32)
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                qweight[row] |= intweight[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        else:  # 3 bits
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i))
            i += 10
            qweight[row] |= intweight[i] << 30
            row += 1
            qweight[row] |= (intweight[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 1)
            i += 10
            qweight[row] |= intweight[i] << 31
            row += 1
            qweight[row] |= (intweight[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return qweight


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("K,N", [(32, 1), (64, 7), (96, 33), (256, 40)])
def test_round_trip_rows_and_cols(bits, K, N):
    g = torch.Generator().manual_seed(1000 * bits + K + N)
    q = torch.randint(0, 2**bits, (K, N), generator=g, dtype=torch.int32)
    packed = pack_rows(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (K * bits // 32, N)
    assert torch.equal(unpack_rows(packed, bits, K), q)
    z = q.T.contiguous()  # (N, K): pack along the last dim
    packed_c = pack_cols(z, bits)
    assert packed_c.shape == (N, K * bits // 32)
    assert torch.equal(unpack_cols(packed_c, bits, K), z)
    assert torch.equal(packed_c, packed.T)


@pytest.mark.parametrize("bits", BITS)
def test_matches_the_legacy_packing_loop(bits):
    g = torch.Generator().manual_seed(7 + bits)
    q = torch.randint(0, 2**bits, (128, 24), generator=g)
    assert np.array_equal(u32(pack_rows(q, bits)), legacy_pack(q.numpy(), bits))


@pytest.mark.parametrize("bits,word", [(4, 0x77777777), (8, 0x7F7F7F7F), (2, 0x55555555)])
def test_symmetric_v1_qzeros_test_vectors(bits, word):
    zero = 2 ** (bits - 1)  # symmetric zero point; v1 stores zero - 1
    packed = pack_cols(torch.full((3, 64), zero - 1), bits)
    assert (u32(packed) == word).all()
    assert (unpack_cols(packed, bits, 64) + 1 == zero).all()


def test_3bit_values_straddling_word_boundaries():
    # Only v10 and v21 set to 7 (0b111): v10 -> bits 30-31 of word0 and bit 0 of word1,
    # v21 -> bit 31 of word1 and bits 0-1 of word2.
    v = torch.zeros(32, 1, dtype=torch.int32)
    v[10] = v[21] = 7
    assert u32(pack_rows(v, 3))[:, 0].tolist() == [0xC0000000, 0x80000001, 0x00000003]
    assert torch.equal(unpack_rows(pack_rows(v, 3), 3, 32), v)


def test_3bit_example_by_the_bit_diagram():
    v = [(5 * i + 3) % 8 for i in range(32)]
    w0 = sum(v[i] << (3 * i) for i in range(10)) | ((v[10] & 3) << 30)
    w1 = (v[10] >> 2) | sum(v[i] << (3 * (i - 11) + 1) for i in range(11, 21)) | ((v[21] & 1) << 31)
    w2 = (v[21] >> 1) | sum(v[i] << (3 * (i - 22) + 2) for i in range(22, 32))
    q = torch.tensor(v, dtype=torch.int32)[:, None]  # (32, 1)
    assert u32(pack_rows(q, 3))[:, 0].tolist() == [w0, w1, w2]
    # the two unpack formulas of the diagram
    assert ((w0 >> 30) & 3) | ((w1 & 1) << 2) == v[10]
    assert ((w1 >> 31) & 1) | ((w2 & 3) << 1) == v[21]


@pytest.mark.parametrize("bits", BITS)
def test_high_bits_are_not_sign_extended(bits):
    q = torch.full((64, 2), 2**bits - 1, dtype=torch.int32)  # every bit set: the int32 words are -1
    packed = pack_rows(q, bits)
    assert (packed == -1).all()
    assert torch.equal(unpack_rows(packed, bits, 64), q)


def test_pack_rejects_out_of_range_codes_and_bad_shapes():
    with pytest.raises(ValueError, match=r"4-bit codes must lie in \[0, 15\], got \[-1, 3\]"):
        pack_rows(torch.tensor([[-1], [3]] * 4), 4)
    with pytest.raises(ValueError, match="must lie in"):
        pack_cols(torch.full((1, 8), 16), 4)
    with pytest.raises(ValueError, match="rows divisible by 32"):
        pack_rows(torch.zeros(40, 4, dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="columns divisible by 8"):
        pack_cols(torch.zeros(2, 12, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="bits=5"):
        pack_rows(torch.zeros(32, 4, dtype=torch.int32), 5)
    with pytest.raises(ValueError, match=r"must have shape \[12, N\]"):
        unpack_rows(torch.zeros(10, 4, dtype=torch.int32), 3, 128)


def test_can_pack():
    assert can_pack(4096, 11008, 4) is None and can_pack(4096, 4096, 3) is None
    assert "in_features=100 must be divisible by 32" in can_pack(100, 64, 3)
    assert "out_features=48 must be divisible by 32" in can_pack(64, 48, 3)
    assert "in_features=12 must be divisible by 8" in can_pack(12, 8, 4)
    assert can_pack(12, 8, 8) is None
    assert "bits=5" in can_pack(64, 64, 5)


@pytest.mark.parametrize("fmt,fmt_offset", [("gptq", 1), ("gptq_v2", 0)])  # v1 stores zero - 1, v2 the zero
def test_dequantize_by_hand(fmt, fmt_offset):
    K, N, bits = 16, 8, 4
    q = torch.arange(K * N).reshape(K, N) % 16  # (K, N)
    stored = torch.tensor([[3] * N, [9] * N])  # (G=2, N) as written in qzeros
    scales = torch.tensor([[0.5] * N, [0.25] * N], dtype=torch.float16)
    g_idx = torch.tensor([0] * 8 + [1] * 8, dtype=torch.int32)
    W = dequantize(pack_rows(q, bits), pack_cols(stored, bits), scales, g_idx, bits, fmt)
    assert W.dtype == torch.float16 and W.shape == (K, N)
    zero = stored + fmt_offset
    expect = torch.cat([0.5 * (q[:8] - zero[0]), 0.25 * (q[8:] - zero[1])]).to(torch.float16)
    assert torch.equal(W, expect)


def test_dequantize_act_order_groups():
    K, N, bits = 64, 32, 3
    g = torch.Generator().manual_seed(3)
    q = torch.randint(0, 8, (K, N), generator=g)
    z = torch.randint(0, 8, (4, N), generator=g)
    s = torch.rand(4, N, generator=g)
    g_idx = (torch.randperm(K, generator=g) // 16).to(torch.int32)  # act-order: non-monotone groups
    W = dequantize(pack_rows(q, bits), pack_cols(z, bits), s, g_idx, bits, "gptq_v2")
    for k in (0, 17, 63):
        assert torch.equal(W[k], s[g_idx[k]] * (q[k] - z[g_idx[k]]).float())


def gptqmodel_v1_qzeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """v1 qzeros as GPTQModel writes them from raw zeros: a whole-word subtraction of 0x55555555 / 0x11111111 /
    0x01010101 at 2/4/8 bits (a zero of 0 borrows from the next field), (zero - 1) mod 8 per field at 3 bits."""
    if bits == 3:
        return pack_cols((zeros - 1) & 7, 3)
    return (pack_cols(zeros, bits).to(torch.int64) - V1_WORD_OFFSET[bits]).to(torch.int32)


@pytest.mark.parametrize("bits", BITS)
def test_wrapped_v1_zero_points_read_like_gptqmodel(bits):
    """Zero points of 0 (and of the maximum) survive v1 exactly as GPTQModel reads it; the naive field + 1 does not."""
    from minigptq.pack import zero_points
    g = torch.Generator().manual_seed(bits)
    N, maxq = 64, 2**bits - 1
    zeros = torch.randint(0, maxq + 1, (6, N), generator=g, dtype=torch.int32)
    zeros[0] = 0  # a whole group of zero points of 0: every field wraps
    zeros[1, ::3] = 0
    zeros[2, ::2] = maxq
    v1 = gptqmodel_v1_qzeros(zeros, bits)
    assert torch.equal(zero_points(v1, bits, N, "gptq"), zeros)
    assert torch.equal(zero_points(pack_cols(zeros, bits), bits, N, "gptq_v2"), zeros)
    naive = unpack_cols(v1, bits, N) + 1  # field + 1: 2^bits where a zero of 0 wrapped, and the borrow stays
    assert not torch.equal(naive, zeros)
    # the same layer stored both ways dequantizes identically, through the reference and the QuantLinear paths
    from minigptq.qlinear import QuantLinear
    K = 192  # 6 groups of 32
    q = torch.randint(0, maxq + 1, (K, N), generator=g)
    s = torch.rand(6, N, generator=g).half() + 0.01
    g_idx = (torch.arange(K) // 32).to(torch.int32)
    W1 = dequantize(pack_rows(q, bits), v1, s, g_idx, bits, "gptq")
    W2 = dequantize(pack_rows(q, bits), pack_cols(zeros, bits), s, g_idx, bits, "gptq_v2")
    assert torch.equal(W1, W2) and torch.equal(W1, s[g_idx.long()] * (q - zeros[g_idx.long()]).half())
    x = torch.randn(3, K, generator=g)
    ys = []
    for fmt, qz in (("gptq", v1), ("gptq_v2", pack_cols(zeros, bits))):
        ql = QuantLinear(K, N, bits, 32, bias=False)
        ql.checkpoint_format = fmt
        ql.load_state_dict({"qweight": pack_rows(q, bits), "qzeros": qz, "scales": s, "g_idx": g_idx})
        ql.post_load()
        ys.append(ql(x))
    torch.testing.assert_close(ys[0], ys[1], rtol=0, atol=0)
    W = dequantize(pack_rows(q, bits), pack_cols(zeros, bits), s.float(), g_idx, bits, "gptq_v2")  # exact in fp32
    torch.testing.assert_close(ys[0], x @ W, rtol=1e-4, atol=1e-4)
