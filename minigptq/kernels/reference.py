"""Plain torch references of the kernels, used as the tests' oracles (in the spirit of ggml's *_generic twins):
the same arithmetic written step by step, slow and obviously right.

- int8_reference: the int8-activation CPU kernels, exactly: same chunks, same roundings, for the decode kernels
  (cuda/cpu/qgemm_i8.inc, M <= 16 rows) and the batched one (cuda/cpu/qgemm_i8b.inc, M > 16) on every instruction
  set (AVX-512 VNNI, AVX-VNNI, AVX2), from the int8 layout or the exact kernels' one.
- cuda_layout_weight: the dequantized weight read back from a CudaLayout in torch, a test of the CUDA layout
  (minigptq/kernels/cuda_layout.py) independent of the kernels.
The references of the other kernels live with the code they mirror: minigptq/pack.py:dequantize (+ matmul) for the
fp32 CPU and the CUDA matmuls, the torch loop of minigptq/gptq.py for cpu_gptq_block, and RMSNorm, Attention and
Block in minigptq/transformer.py for the CPU decode-step operations.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..pack import unpack_rows
from .cuda_layout import CUDA_WORDS, CudaLayout, cuda_fragment_index
from .layout import CHUNK_ROWS, CHUNK_ROWS_INT8, INT8_TINY, KernelLayout, from_tiles, unpack_fields3


def chunks_of(row_group: Tensor, rows: int = CHUNK_ROWS) -> list[tuple[int, int, int]]:
    """(r0, r1, group) of every chunk of sorted rows: a run of one group, cut at multiples of `rows`."""
    g = row_group.tolist()
    out = []
    for r, gr in enumerate(g):
        if r == 0 or gr != g[r - 1] or r % rows == 0:
            out.append([r, r, gr])
        out[-1][1] = r + 1
    return [tuple(c) for c in out]


def int8_reference(x: Tensor, layout: KernelLayout) -> Tensor:
    """Torch reference of the int8 kernels, the same arithmetic step by step: x [M, K] -> y [M, N] float32, for
    any M and either layout (cpu_kernel "int8" or "exact").

    Per chunk (CHUNK_ROWS_INT8 rows of one group): xq = round(x * (127 / max|x|)) clamped to [-127, 127] (0 where
    max|x| < INT8_TINY), sx = max|x| / 127 (NaN where the chunk holds Inf or NaN); part += sx * float(xq @ q) with
    the integer products summed exactly (int64), zs += sx * float(sum(xq)); after a group's last chunk
    y += s[g] * (part - float(z[g]) * zs), and part, zs restart at 0. Every step one fp32 rounding, in chunk order.
    """
    K, N = layout.K, layout.N
    words, scales, zeros = layout.qweight, layout.scales, layout.zeros
    if layout.cpu_kernel == "int8":
        words, scales, zeros = (from_tiles(t, N) for t in (words, scales, zeros))
    codes = (unpack_fields3(words, K) if layout.cpu_kernel == "int8" and layout.bits == 3
             else unpack_rows(words, layout.bits, K)).to(torch.int64)  # (K, N) sorted rows
    xs = x.float()[:, layout.perm.long()] if layout.perm is not None else x.float()  # (M, K) sorted rows
    M = x.shape[0]
    y = torch.zeros(M, layout.N)
    part, zs = torch.zeros(M, layout.N), torch.zeros(M, 1)  # this group's chunks so far
    chunks = chunks_of(layout.row_group, CHUNK_ROWS_INT8)
    for i, (r0, r1, g) in enumerate(chunks):
        xc = xs[:, r0:r1]
        finite = xc.isfinite().all(dim=1, keepdim=True)  # (M, 1); a chunk with Inf or NaN: codes 0, scale NaN
        xc = torch.where(finite, xc, 0.0)
        amax = xc.abs().amax(dim=1, keepdim=True)  # (M, 1)
        c127 = torch.full_like(amax, 127.0)  # tensor / tensor: one rounding (127.0 / t is reciprocal, then multiply)
        inv = torch.where(amax >= INT8_TINY, c127 / amax, torch.zeros_like(amax))
        xq = torch.round(xc * inv).clamp(-127, 127).to(torch.int64)  # (M, r1 - r0)
        sx = torch.where(finite, amax / c127, float("nan"))
        part = part + sx * (xq @ codes[r0:r1]).float()  # the integer sum is exact (int64), then one rounding
        zs = zs + sx * xq.sum(dim=1, keepdim=True).float()
        if i + 1 == len(chunks) or chunks[i + 1][2] != g:  # the group's last chunk: its scale and zero point
            y = y + scales[g] * (part - zeros[g].float() * zs)
            part, zs = torch.zeros_like(part), torch.zeros_like(zs)
    return y


def cuda_layout_weight(L: CudaLayout) -> Tensor:
    """The dequantized weight [K, N] fp32 in checkpoint row order, read back from a CudaLayout in torch (a test of
    the layout independent of the kernels)."""
    T, KB, _ = L.qweight.shape
    W = CUDA_WORDS[L.bits]
    w = L.qweight.long() & 0xFFFFFFFF
    parts, c = [], 0
    for c in range(0, W, 4):
        n = min(4, W - c)
        parts.append(w[..., 32 * c: 32 * c + 32 * n].reshape(T, KB, 32, n))
    words = torch.cat(parts, dim=-1)  # (T, KB, 32, W)
    row, col, word, pos = cuda_fragment_index(L.bits, w.device)
    wd = torch.gather(words, 3, word.expand(T, KB, 32, 32))
    mask = 2**L.bits - 1
    lo, hi = (wd >> pos.clamp(min=0)) & mask, (wd >> (pos.clamp(min=0) + 16)) & mask
    if L.bits == 3:
        wb = [torch.where(pos >= 0, word, word + b) for b in range(3)]
        spare_lo = sum(((torch.gather(words, 3, wb[b].expand(T, KB, 32, 32)) >> 9) & 1) << b for b in range(3))
        spare_hi = sum(((torch.gather(words, 3, wb[b].expand(T, KB, 32, 32)) >> 25) & 1) << b for b in range(3))
        lo, hi = torch.where(pos >= 0, lo, spare_lo), torch.where(pos >= 0, hi, spare_hi)
    codes = torch.zeros(T, KB, 128, 16, dtype=torch.int64, device=w.device)
    codes[:, :, row, col], codes[:, :, row + 1, col] = lo, hi
    codes = codes.permute(1, 2, 0, 3).reshape(KB * 128, T * 16)  # (Kp, T*16)
    Z = L.zeros.long()
    Z = torch.cat([Z[..., :1] & 15, Z[..., :1] >> 4], -1) if L.bits != 8 else Z  # (G, T, 8, 2)
    Z = Z.transpose(2, 3).reshape(L.G, T * 16)
    S = L.scales.float().transpose(2, 3).reshape(L.G, T * 16)
    Wp = S[L.row_group.long()] * (codes - Z[L.row_group.long()]).float()  # (Kp, T*16)
    out = torch.zeros(L.K, T * 16, device=w.device)
    keep = L.perm >= 0
    out[L.perm[keep].long()] = Wp[keep]
    return out[:, :L.N]
