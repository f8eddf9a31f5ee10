"""The GPTQ packed format (minigptq/pack.py): round trips, the format's test vectors, a hand-computed 3-bit example,
the packing loop the GPTQ-for-LLaMa / AutoGPTQ writers use as an independent oracle, and the reference dequantize."""
import numpy as np
import pytest
import torch

from minigptq.pack import can_pack, dequantize, pack_cols, pack_rows, unpack_cols, unpack_rows

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


@pytest.mark.parametrize("fmt_offset", [1, 0])  # "gptq" (v1) stores zero - 1, "gptq_v2" the zero itself
def test_dequantize_by_hand(fmt_offset):
    K, N, bits = 16, 8, 4
    q = torch.arange(K * N).reshape(K, N) % 16  # (K, N)
    stored = torch.tensor([[3] * N, [9] * N])  # (G=2, N) as written in qzeros
    scales = torch.tensor([[0.5] * N, [0.25] * N], dtype=torch.float16)
    g_idx = torch.tensor([0] * 8 + [1] * 8, dtype=torch.int32)
    W = dequantize(pack_rows(q, bits), pack_cols(stored, bits), scales, g_idx, bits, fmt_offset)
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
    W = dequantize(pack_rows(q, bits), pack_cols(z, bits), s, g_idx, bits, 0)
    for k in (0, 17, 63):
        assert torch.equal(W[k], s[g_idx[k]] * (q[k] - z[g_idx[k]]).float())
