"""Packing of integer codes into the GPTQ checkpoint format, and the torch reference dequantization.

This is the one place the packed layout is documented (docs/gptq-format.md has the same facts, gathered from
AutoGPTQ / GPTQModel / transformers / vLLM). Notation: K = in_features, N = out_features, G = number of groups.

    qweight  int32 [K*bits/32, N]  codes q[k, n] packed along K (the input dimension)
    qzeros   int32 [G, N*bits/32]  zero points packed along N, stored as z' = zero - 1 ("gptq", v1)
                                   or as the raw zero ("gptq_v2")
    scales   fp16  [G, N]          W[k, n] = scales[g, n] * (q[k, n] - zero[g, n]),  g = g_idx[k]
    g_idx    int32 [K]             group of each input channel (k // group_size unless act-order)

Both packings are one little-endian bit stream per column (qweight) or per row (qzeros): value i occupies
stream bits [bits*i, bits*i + bits), and stream bit b lives in word b // 32 at bit b % 32. The words are
uint32 bit patterns stored as int32.

bits = 2, 4, 8: 32/bits values per word, none crosses a word boundary (4-bit shown, v0 = first row):

    word     bit 31                                    bit 0
             | v7 | v6 | v5 | v4 | v3 | v2 | v1 | v0 |        v_j = (word >> (4*j)) & 0xF

bits = 3: 32 values fill exactly 3 words; v10 and v21 straddle a word boundary:

    word0    | v10.lo2 | v9 | v8 | ... | v1 | v0 |            v0..v9 at shifts 0, 3, ..., 27, v10 bits 0-1 at 30
    word1    | v21.lo1 | v20 | ... | v11 | v10.hi1 |          v10 bit 2 at 0, v11..v20 at shifts 1, 4, ..., 28,
                                                              v21 bit 0 at 31
    word2    | v31 | ... | v23 | v22 | v21.hi2 |              v21 bits 1-2 at 0-1, v22..v31 at shifts 2, 5, ..., 29

    v10 = ((w0 >> 30) & 3) | ((w1 & 1) << 2)        v21 = ((w1 >> 31) & 1) | ((w2 & 3) << 1)

Unpack with the mask AFTER the shift (int32 `>>` sign-extends). Symmetric v1 qzeros are the handy test vectors
0x77777777 (4-bit, z' = 7), 0x7F7F7F7F (8-bit, z' = 127) and 0x55555555 (2-bit, z' = 1).

Reading v1 zero points (`zero_points`). An asymmetric zero point of 0 is stored as -1. GPTQModel (and transformers,
which loads GPTQ checkpoints through it) writes and reads v1 at 2/4/8 bits by subtracting / adding 0x55555555 /
0x11111111 / 0x01010101 to each whole int32 word, so a zero of 0 is written as all ones *with a borrow from the next
field*, and reading adds the carry back. At 3 bits it shifts each field by one, modulo 8, without carries. minigptq
reads both the same way, so every v1 file they write dequantizes here exactly as there. (minigptq itself writes v1
zero points >= 1, so its files never wrap and both rules agree on them.)

`dequantize` is the plain torch reference: it is both the fallback of QuantLinear and the test oracle of the
compiled kernels (minigptq/kernels/).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import Error

VALID_BITS = (2, 3, 4, 8)
FORMATS = ("gptq", "gptq_v2")  # checkpoint_format: v1 stores zero - 1 in qzeros, v2 the zero itself
V1_WORD_OFFSET = {2: 0x55555555, 4: 0x11111111, 8: 0x01010101}  # +1 in every field of one int32 word


def _block(bits: int) -> tuple[int, int]:
    """(values, words) of the smallest whole packing unit: 32/bits values in 1 word, or 32 values in 3 words."""
    if bits not in VALID_BITS:
        raise Error(f"bits={bits!r} is not supported; valid: {VALID_BITS}")
    return (32, 3) if bits == 3 else (32 // bits, 1)


def can_pack(in_features: int, out_features: int, bits: int) -> str | None:
    """None if a [out_features, in_features] linear can be stored in the GPTQ format, else the reason."""
    if bits not in VALID_BITS:
        return f"bits={bits} is not supported; valid: {VALID_BITS}"
    values, _ = _block(bits)
    for name, size in (("in_features", in_features), ("out_features", out_features)):
        if size < 1:
            return f"{name}={size} must be positive"
        if size % values:
            return f"{name}={size} must be divisible by {values} for {bits}-bit packing"
    return None


def pack_rows(q: Tensor, bits: int) -> Tensor:
    """Integer codes [K, N] in [0, 2^bits - 1] -> int32 [K*bits/32, N] packed along K (the qweight layout)."""
    values, words = _block(bits)
    if q.dim() != 2 or q.shape[0] % values:
        raise Error(f"{bits}-bit packing along rows needs a 2-D tensor with rows divisible by {values}, "
                         f"got shape {list(q.shape)}")
    if q.is_floating_point():
        raise Error(f"codes must be an integer tensor, got {q.dtype}")
    maxq = 2**bits - 1
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > maxq):
        raise Error(f"{bits}-bit codes must lie in [0, {maxq}], got [{int(q.min())}, {int(q.max())}]")
    K, N = q.shape
    q = q.to(torch.int32).reshape(K // values, values, N)  # (blocks, values per block, N)
    out = torch.zeros(K // values, words, N, dtype=torch.int32, device=q.device)
    for j in range(values):  # int32 shifts wrap like uint32 ones: the bit patterns are what is stored
        w, shift = divmod(bits * j, 32)
        out[:, w] |= q[:, j] << shift
        if shift + bits > 32:  # 3-bit v10 / v21: the high part goes to the low bits of the next word
            out[:, w + 1] |= q[:, j] >> (32 - shift)
    return out.reshape(K // values * words, N)  # (K*bits/32, N)


def unpack_rows(packed: Tensor, bits: int, K: int) -> Tensor:
    """int32 [K*bits/32, N] packed along K -> int32 codes [K, N]."""
    values, words = _block(bits)
    if packed.dim() != 2 or K % values or packed.shape[0] != K // values * words:
        raise Error(f"packed {bits}-bit rows for K={K} must have shape [{K * bits // 32}, N] with K divisible "
                         f"by {values}, got {list(packed.shape)}")
    N = packed.shape[1]
    w = packed.to(torch.int32).reshape(K // values, words, N)
    mask = 2**bits - 1
    out = torch.empty(K // values, values, N, dtype=torch.int32, device=packed.device)
    for j in range(values):
        wi, shift = divmod(bits * j, 32)
        if shift + bits <= 32:
            out[:, j] = (w[:, wi] >> shift) & mask  # mask after the (sign-extending) shift
        else:  # low bits from the top of word wi (masked: >> sign-extends), high bits from word wi + 1
            low = (w[:, wi] >> shift) & (2 ** (32 - shift) - 1)
            out[:, j] = (low | (w[:, wi + 1] << (32 - shift))) & mask
    return out.reshape(K, N)  # (K/values, values, N) -> (K, N)


def pack_cols(z: Tensor, bits: int) -> Tensor:
    """Integer values [G, N] -> int32 [G, N*bits/32] packed along N (the qzeros layout)."""
    values, _ = _block(bits)
    if z.dim() != 2 or z.shape[1] % values:
        raise Error(f"{bits}-bit packing along columns needs a 2-D tensor with columns divisible by {values}, "
                         f"got shape {list(z.shape)}")
    return pack_rows(z.T, bits).T.contiguous()


def unpack_cols(packed: Tensor, bits: int, N: int) -> Tensor:
    """int32 [G, N*bits/32] packed along N -> int32 [G, N]."""
    values, words = _block(bits)
    if packed.dim() != 2 or N % values or packed.shape[1] != N // values * words:
        raise Error(f"packed {bits}-bit columns for N={N} must have shape [G, {N * bits // 32}] with N divisible "
                         f"by {values}, got {list(packed.shape)}")
    return unpack_rows(packed.T, bits, N).T.contiguous()


def zero_points(qzeros: Tensor, bits: int, N: int, fmt: str) -> Tensor:
    """Stored qzeros [G, N*bits/32] -> zero points int32 [G, N] in [0, 2^bits - 1], for checkpoint_format fmt
    ("gptq": v1, read as GPTQModel reads it, see the module docstring; "gptq_v2": raw)."""
    if fmt not in FORMATS:
        raise Error(f"checkpoint_format={fmt!r} is not supported; valid: {list(FORMATS)}")
    if fmt == "gptq_v2":
        return unpack_cols(qzeros, bits, N)
    if bits == 3:
        return (unpack_cols(qzeros, bits, N) + 1) & 7
    _block(bits)
    words = (qzeros.to(torch.int64) + V1_WORD_OFFSET[bits]).to(torch.int32)  # wraps like uint32: carries cross fields
    return unpack_cols(words, bits, N)


def dequantize(qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor, bits: int, fmt: str) -> Tensor:
    """Reference dequantization: W^T [K, N] in scales.dtype, W^T[k, n] = scales[g, n] * (q[k, n] - zero[g, n]).

    zero = zero_points(qzeros, bits, N, fmt) with fmt the checkpoint_format ("gptq" or "gptq_v2"); g = g_idx[k].
    """
    K, (G, N) = g_idx.shape[0], scales.shape
    q = unpack_rows(qweight, bits, K)  # (K, N)
    zero = zero_points(qzeros, bits, N, fmt)  # (G, N)
    if zero.shape[0] != G:
        raise Error(f"qzeros has {zero.shape[0]} groups but scales has {G}")
    g = g_idx.long()  # (K,)
    if K and (int(g.min()) < 0 or int(g.max()) >= G):
        raise Error(f"g_idx values must lie in [0, {G}) (the number of groups), got [{int(g.min())}, "
                         f"{int(g.max())}]")
    return scales[g] * (q - zero[g]).to(scales.dtype)  # (K, N); |q - zero| <= 256 is exact in fp16/bf16
