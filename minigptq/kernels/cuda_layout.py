"""The CUDA kernels' layout of one quantized linear (`CudaLayout`, built by make_cuda_layout: for a CUDA device, or
anywhere with make_layout(..., cuda=True): the host-emulation tests build it on the CPU). Bit-level description: the
comment block at the top of cuda/gpu/qgemm.cu; its torch read-back (a test of the layout independent of the kernels)
is minigptq/kernels/reference.py:cuda_layout_weight. In short, per layer, once:
- rows sorted by group (act-order undone) and every group padded with empty rows to `group_rows` (32, 64 or a
  multiple of 128), so that a group starts on a 16-row tensor-core tile and its scale/zero are set once per group;
  `perm` [Kp] gathers x (-1: a padding row, x = 0 there); K is padded to a multiple of 128 (one k-block); when
  perm is the identity on the first K rows (no act-order, no padded groups) `perm_identity` is set and the kernel
  streams x as it is, else one gather pass per call applies perm;
- codes interleaved so that each thread's 128-bit loads hold exactly its mma.m16n8k16 A fragments, two codes per
  16-bit half pair (bits p and 16 + p of a word): one AND/OR with the exponent of 1024 (fp16) or 128 (bf16) makes
  two 16-bit floats, one half2 FMA removes the bias and the zero point;
- scales as fp16 pairs (bf16 when the checkpoint's scales are bf16 values fp16 cannot hold), zero points packed
  4 bits each (8 for 8-bit): 2.5 bytes per group and column, 0.0195 bytes per weight at group size 128.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import Error
from ..pack import unpack_rows
from .common import check, describe

CUDA_KBLOCK = 128  # rows of one k-block (cuda/gpu/qgemm.cu kKB)
CUDA_WORDS = {2: 4, 3: 6, 4: 8, 8: 16}  # 32-bit words per lane per k-block and 16-column tile

# data_ptr -> perm tensor of every live layout whose perm is the identity: the torch.compile path, which gets the
# tensors and not the layout, looks its perm up here (a live entry's memory cannot hold another perm).
IDENTITY_PERMS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


@dataclass(frozen=True, eq=False)
class CudaLayout:
    """One quantized linear in the CUDA kernels' layout (cuda/gpu/qgemm.cu), all tensors on one device."""

    qweight: Tensor  # int32 [ntiles, Kp/128, 32 lanes * words]: interleaved codes, 16 columns x 128 rows per chunk
    scales: Tensor  # float16 or bfloat16 [G, ntiles, 8, 2]: (scale of column g, of column g + 8) per tile
    zeros: Tensor  # uint8 [G, ntiles, 8, 1] (z_g | z_{g+8} << 4) or [G, ntiles, 8, 2] (8-bit: z_g, z_{g+8})
    row_group: Tensor  # int32 [Kp] group of each padded sorted row (= row // group_rows)
    perm: Tensor  # int32 [Kp] checkpoint row of each padded sorted row, -1 for padding
    bits: int
    N: int  # out_features
    K: int  # in_features
    group_rows: int  # rows per (padded) group: 32, 64 or a multiple of 128

    cpu_kernel = "exact"  # (KernelLayout's fields that QuantLinear reads)
    on_cpu = False

    def __post_init__(self) -> None:
        G, T = self.scales.shape[:2]
        Kp, dev = self.perm.numel(), self.scales.device
        ok = (self.bits in CUDA_WORDS and Kp % CUDA_KBLOCK == 0 and Kp == G * self.group_rows and
              (self.group_rows in (32, 64) or self.group_rows % CUDA_KBLOCK == 0) and (T - 1) * 16 < self.N <= T * 16
              and 0 < self.K <= Kp)
        if not ok:
            raise Error(f"inconsistent CUDA layout: bits={self.bits}, K={self.K}, N={self.N}, Kp={Kp}, "
                        f"group_rows={self.group_rows}, scales {list(self.scales.shape)}")
        check(self.qweight, "qweight", torch.int32, [T, Kp // CUDA_KBLOCK, 32 * CUDA_WORDS[self.bits]],
              "[ntiles, Kp/128, 32*words]", dev)
        if self.scales.dtype not in (torch.float16, torch.bfloat16) or list(self.scales.shape) != [G, T, 8, 2]:
            raise Error(f"scales must be float16/bfloat16 [G, ntiles, 8, 2], got {describe(self.scales)}")
        check(self.zeros, "zeros", torch.uint8, [G, T, 8, 2 if self.bits == 8 else 1], "[G, ntiles, 8, 1|2]", dev)
        check(self.perm, "perm", torch.int32, [Kp], "[Kp]", dev)
        object.__setattr__(self, "G", G)
        rows = torch.arange(Kp, device=dev, dtype=torch.int32)
        identity = bool(torch.equal(self.perm, torch.where(rows < self.K, rows, -1)))  # once per layer
        object.__setattr__(self, "perm_identity", identity)
        if identity:
            IDENTITY_PERMS[self.perm.data_ptr()] = self.perm
        # The module's view of the layer (cuda/gpu/bindings.cpp WeightTuple), built once: a decode step makes
        # hundreds of calls.
        object.__setattr__(self, "args", (self.qweight.data_ptr(), self.scales.data_ptr(), self.zeros.data_ptr(),
                                          self.perm.data_ptr(), self.K, self.N, Kp, G, self.group_rows, self.bits,
                                          int(self.scales.dtype == torch.bfloat16), int(identity)))
        object.__setattr__(self, "_ws_need", {})  # (M, dtype code, x aligned) -> workspace sizes: cuda.py

    @property
    def shape(self) -> tuple[int, int]:
        """(K, N): in_features, out_features."""
        return self.K, self.N


def cuda_fragment_index(bits: int, device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For lane l (0..31) and pair p (0..31) of a 128-row x 16-column chunk: (row of the low code, column, word,
    bit position) [32, 32]; the high code is the next row at position + 16. pos = -1: the 3-bit spare pair, whose
    3 code bits sit at bit 9 (+16) of words `word`, `word + 1`, `word + 2`. Mirrors cuda/gpu/qgemm.cu slot()."""
    lane, p = torch.meshgrid(torch.arange(32, device=device), torch.arange(32, device=device), indexing="ij")
    g, t, kt, r = lane // 4, lane % 4, p // 4, p % 4  # mma A fragment: register r of k-tile kt
    row = 16 * kt + 2 * t + 8 * (r // 2)
    col = g + 8 * (r % 2)
    if bits == 3:
        q, i = p // 16, p % 16
        word = 3 * q + torch.where(i == 15, 0, i // 5)
        pos = torch.where(i == 15, -1, (i % 5) * 3 + (i % 5 >= 3).long())
    else:
        per = 16 // bits
        word, pos = p // per, (p % per) * bits
    return row, col, word, pos


def make_cuda_layout(qweight: Tensor, zeros: Tensor, scales: Tensor, g_idx: Tensor, bits: int) -> CudaLayout:
    """The CUDA layout from checkpoint qweight, integer zero points [G, N] (fmt's +1 applied), scales [G, N] and
    g_idx [K], on their device."""
    K, N, dev = g_idx.numel(), scales.shape[1], qweight.device
    g = g_idx.long()
    G = scales.shape[0]
    counts = torch.bincount(g, minlength=G)
    most = int(counts.max())
    group_rows = max(32, 1 << (most - 1).bit_length()) if most <= CUDA_KBLOCK else -(-most // CUDA_KBLOCK) * CUDA_KBLOCK
    per_block = max(1, CUDA_KBLOCK // group_rows)
    Gp = -(-G // per_block) * per_block  # whole k-blocks
    Kp, T = Gp * group_rows, -(-N // 16)
    order = torch.argsort(g, stable=True)  # sorted row -> checkpoint row
    start = torch.cumsum(counts, 0) - counts
    gs = g[order]
    padded_row = gs * group_rows + torch.arange(K, device=dev) - start[gs]  # sorted row -> padded row
    perm = torch.full((Kp,), -1, dtype=torch.int32, device=dev)
    perm[padded_row] = order.to(torch.int32)
    codes = torch.zeros(Kp, T * 16, dtype=torch.int64, device=dev)
    codes[padded_row, :N] = unpack_rows(qweight, bits, K)[order].long()
    # (T, KB, 128, 16) chunks -> per lane and pair the low and high codes
    chunks = codes.view(Kp // CUDA_KBLOCK, CUDA_KBLOCK, T, 16).permute(2, 0, 1, 3)
    row, col, word, pos = cuda_fragment_index(bits, dev)
    lo, hi = chunks[:, :, row, col], chunks[:, :, row + 1, col]  # (T, KB, 32 lanes, 32 pairs)
    W = CUDA_WORDS[bits]
    words = torch.zeros(*lo.shape[:3], W, dtype=torch.int64, device=dev)
    plain = pos >= 0
    val = torch.where(plain, (lo << pos.clamp(min=0)) | (hi << (pos.clamp(min=0) + 16)), 0)
    words.scatter_add_(3, word.expand_as(val), val)  # disjoint bit fields: adding is OR-ing
    if bits == 3:  # spare pair: code bit b -> bit 9 (low code) / 25 (high code) of word `word + b`
        for b in range(3):
            spare = torch.where(plain, 0, (((lo >> b) & 1) << 9) | (((hi >> b) & 1) << 25))
            words.scatter_add_(3, torch.where(plain, word, word + b).expand_as(val), spare)
    words = words.view(T, Kp // CUDA_KBLOCK, 32, W)
    parts = [words[..., c:c + 4].reshape(T, Kp // CUDA_KBLOCK, -1) for c in range(0, W, 4)]  # [c][lane][<=4]
    packed = torch.cat(parts, dim=-1)
    packed = (packed - (packed >= 2**31).long() * 2**32).to(torch.int32)  # uint32 bit patterns as int32
    # metadata: groups padded to Gp (scale 0, zero 0), columns to T*16
    s16 = torch.float16
    if scales.dtype == torch.bfloat16 or not torch.equal(scales.float().half().float(), scales.float()):
        s16 = torch.bfloat16 if torch.equal(scales.float().bfloat16().float(), scales.float()) else torch.float16
    S = torch.zeros(Gp, T * 16, dtype=s16, device=dev)
    S[:G, :N] = scales.to(s16)
    Z = torch.zeros(Gp, T * 16, dtype=torch.int64, device=dev)
    Z[:G, :N] = zeros.long()
    S = S.view(Gp, T, 2, 8).transpose(2, 3).contiguous()  # (Gp, T, 8, 2)
    Z = Z.view(Gp, T, 2, 8).transpose(2, 3)
    Z = (Z if bits == 8 else (Z[..., :1] | (Z[..., 1:] << 4))).to(torch.uint8).contiguous()
    row_group = (torch.arange(Kp, device=dev) // group_rows).to(torch.int32)
    return CudaLayout(packed.contiguous(), S, Z, row_group, perm, bits, N, K, group_rows)
