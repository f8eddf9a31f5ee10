"""The CPU kernels' layout of one quantized linear (`KernelLayout`), and `make_layout`, which builds the layout of
either device once per layer (QuantLinear.post_load) from the checkpoint tensors, which stay untouched:

- rows sorted by group (act-order undone): qweight rows re-packed in that order, `perm` gathers x to match,
  so every group is one contiguous run of rows and its scale/zero are applied once per run;
- scales as fp32 and zero points unpacked to int16 [G, N] (checkpoint_format's +1 already added), so the
  kernels never touch qzeros;
- for the int8-activation kernels (cpu_kernel="int8", CPU with AVX-512 VNNI or AVX-VNNI): the packed words cut into
  column tiles of TILE_COLS stored whole ([tiles, K*bits/32, 64]: each tile one sequential stream over K), and 3-bit
  codes re-packed into the "byte-field" layout (`pack_fields3`: the same 3 words per 32 rows, arranged so that 6 of
  every 8 codes sit whole in a byte and a mask alone yields 4 of them as bytes). The same number of bytes.
On a CUDA device make_layout builds a `CudaLayout` instead (minigptq/kernels/cuda_layout.py). The packed checkpoint
format itself (qweight, qzeros, g_idx) is described once, in minigptq/pack.py. C++ side: cuda/qweight.h (QWeight),
cuda/cpu/qgemm_detail.h (the constants below), cuda/cpu/qgemm_i8.inc (the int8 layout, bit by bit).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import Error
from ..pack import VALID_BITS, pack_rows, unpack_rows, zero_points
from .common import check
from .cuda_layout import CudaLayout, make_cuda_layout

CHUNK_ROWS = 128  # cuda/cpu/qgemm_detail.h kChunkRows: a chunk is at most this many sorted rows of one group
TILE_COLS = 64  # cuda/cpu/qgemm_detail.h kTileCols: columns of one tile of the int8 layout
CHUNK_ROWS_INT8 = 32  # cuda/cpu/qgemm_detail.h kChunkRowsI8: rows sharing one int8 activation scale
INT8_TINY = 2.0**-100  # kTinyI8: a chunk with max|x| below this counts as zero (127 / max|x| would overflow)
CPU_KERNELS = ("int8", "exact")  # the resolved --cpu-kernel choice: int8 activations + VNNI, or fp32 arithmetic


@dataclass(frozen=True, eq=False)
class KernelLayout:
    """One quantized linear in the form the CPU kernels read (all tensors on one device, contiguous)."""

    qweight: Tensor  # int32 [K*bits/32, N] codes packed along K (GPTQ layout), rows in sorted order
    scales: Tensor  # float32 [G, N]
    zeros: Tensor  # int16 [G, N] zero points, W = scales * (q - zeros)
    # int8 layout: qweight [T, K*bits/32, 64], scales [T, G, 64], zeros [T, G, 64] in column tiles (T = ceil(N/64))
    row_group: Tensor  # int32 [K] group of each sorted row, nondecreasing
    perm: Tensor | None  # int32 [K] checkpoint row of each sorted row (x is gathered with it); None = identity
    bits: int
    cpu_kernel: str = "exact"  # "int8": the int8 kernels' layout (column tiles, 3-bit codes in byte fields)
    N: int = -1  # out_features (needed with int8, whose tensors are padded to whole tiles)

    def __post_init__(self) -> None:
        if self.bits not in VALID_BITS:
            raise Error(f"bits={self.bits!r} is not supported; valid: {VALID_BITS}")
        if self.cpu_kernel not in CPU_KERNELS:
            raise Error(f"cpu_kernel={self.cpu_kernel!r} is not one of {', '.join(CPU_KERNELS)}")
        K, dev = self.row_group.numel(), self.scales.device
        if self.cpu_kernel == "int8":
            (T, G, _), N = self.scales.shape, self.N
            if not (T - 1) * TILE_COLS < N <= T * TILE_COLS:
                raise Error(f"N={N} does not fit {T} tiles of {TILE_COLS} columns")
            check(self.qweight, "qweight", torch.int32, [T, K * self.bits // 32, TILE_COLS],
                  "[ceil(N/64), K*bits/32, 64]", dev)
            check(self.scales, "scales", torch.float32, [T, G, TILE_COLS], "[ceil(N/64), G, 64]", dev)
            check(self.zeros, "zeros", torch.int16, [T, G, TILE_COLS], "[ceil(N/64), G, 64]", dev)
        else:
            G, N = self.scales.shape
            if self.N not in (-1, N):
                raise Error(f"N={self.N} disagrees with scales {list(self.scales.shape)}")
            check(self.qweight, "qweight", torch.int32, [K * self.bits // 32, N], "[K*bits/32, N]", dev)
            check(self.scales, "scales", torch.float32, [G, N], "[G, N]", dev)
            check(self.zeros, "zeros", torch.int16, [G, N], "[G, N]", dev)
        check(self.row_group, "row_group", torch.int32, [K], "[K]", dev)
        if self.perm is not None:
            check(self.perm, "perm", torch.int32, [K], "[K]", dev)
        unit = 32 if self.bits == 3 else 32 // self.bits
        if K % unit or K == 0 or N == 0:
            raise Error(f"K={K} must be a positive multiple of {unit} for {self.bits}-bit, N={N} positive")
        if G == 0 or int(self.row_group.min()) < 0 or int(self.row_group.max()) >= G or \
                bool((self.row_group[1:] < self.row_group[:-1]).any()):
            raise Error(f"row_group must be nondecreasing with values in [0, G={G})")
        # Derived once: a decode step calls the kernels hundreds of times, and each tensor query costs a microsecond.
        object.__setattr__(self, "K", K)
        object.__setattr__(self, "N", N)
        object.__setattr__(self, "G", G)
        object.__setattr__(self, "on_cpu", dev.type == "cpu")
        object.__setattr__(self, "ptrs", (self.qweight.data_ptr(), self.scales.data_ptr(), self.zeros.data_ptr(),
                                          self.row_group.data_ptr(), 0 if self.perm is None else self.perm.data_ptr()))

    @property
    def shape(self) -> tuple[int, int]:
        """(K, N): in_features, out_features."""
        return self.K, self.N


def make_layout(qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor, bits: int, fmt: str,
                cpu_kernel: str = "exact", cuda: bool | None = None) -> KernelLayout | CudaLayout:
    """The kernel layout of one checkpoint layer (tensors as in minigptq/pack.py, fmt its checkpoint_format);
    cpu_kernel: "int8" for the int8-activation CPU kernels' layout (ignored off the CPU), "exact" for the fp32 ones;
    cuda: the CUDA kernels' layout (None: when on a CUDA device)."""
    if cpu_kernel not in CPU_KERNELS:
        raise Error(f"cpu_kernel={cpu_kernel!r} is not one of {', '.join(CPU_KERNELS)}")
    K, N = g_idx.numel(), scales.shape[1]
    if qweight.device.type == "cuda" if cuda is None else cuda:
        return make_cuda_layout(qweight, zero_points(qzeros, bits, N, fmt), scales, g_idx, bits)
    if qweight.device.type != "cpu":
        cpu_kernel = "exact"
    zeros = zero_points(qzeros, bits, N, fmt).to(torch.int16)  # (G, N)
    g = g_idx.to(torch.int32)
    perm = None
    if K > 1 and bool((g[1:] < g[:-1]).any()):  # act-order: sort rows so that each group is contiguous
        perm = torch.argsort(g, stable=True)  # (K,) sorted row -> checkpoint row
        qweight = pack_rows(unpack_rows(qweight, bits, K)[perm], bits)  # (K*bits/32, N)
        g = g[perm]
    scales = scales.float()
    if cpu_kernel == "int8":
        qweight = to_tiles(pack_fields3(unpack_rows(qweight, bits, K)) if bits == 3 else qweight)
        scales, zeros = to_tiles(scales), to_tiles(zeros)
    return KernelLayout(qweight.contiguous(), scales.contiguous(), zeros, g.contiguous(),
                        None if perm is None else perm.to(torch.int32), bits, cpu_kernel, N)


def to_tiles(words: Tensor) -> Tensor:
    """[R, N] (packed words, scales or zeros) -> [ceil(N/64), R, 64] (columns past N zero): the int8 kernels'
    column tiles."""
    R, N = words.shape
    T = -(-N // TILE_COLS)
    padded = torch.zeros(R, T * TILE_COLS, dtype=words.dtype, device=words.device)
    padded[:, :N] = words
    return padded.view(R, T, TILE_COLS).transpose(0, 1).contiguous()


def from_tiles(tiles: Tensor, N: int) -> Tensor:
    """The inverse of to_tiles -> [R, N]."""
    T, R, C = tiles.shape
    return tiles.transpose(0, 1).reshape(R, T * C)[:, :N]


def _field_positions(K: int, device=None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """For each row r of K (a multiple of 32) in the 3-bit byte-field layout (cuda/cpu/qgemm_i8.inc): (word row of
    its low bits, their shift, how many low bits (3 or 2), word row of its high bit, its shift or -1 for none).
    Row 4s + b of a unit (quad s, byte b): s < 6 whole in word s // 2 at bit 8b + 3 (s % 2); s = 6, 7: the low 2 bits
    in word s - 6 at bit 8b + 6, the high bit in word 2 at bit 8b + s."""
    r = torch.arange(K, device=device)
    u, s, b = r // 32, r % 32 // 4, r % 4
    whole = s < 6
    lw = 3 * u + torch.where(whole, s // 2, s - 6)
    ls = 8 * b + torch.where(whole, 3 * (s % 2), 6)
    return lw, ls, torch.where(whole, 3, 2), 3 * u + 2, torch.where(whole, -1, 8 * b + s)


def pack_fields3(codes: Tensor) -> Tensor:
    """3-bit codes [K, N] (K a multiple of 32) -> int32 [3K/32, N] in the byte-field layout of the int8 kernels."""
    K, N = codes.shape
    if K % 32:
        raise Error(f"the 3-bit byte-field layout needs K divisible by 32, got K={K}")
    lw, ls, lbits, hw, hs = _field_positions(K, codes.device)
    c = codes.to(torch.int64)
    out = torch.zeros(3 * K // 32, N, dtype=torch.int64, device=codes.device)
    out.index_add_(0, lw, (c & ((1 << lbits) - 1)[:, None]) << ls[:, None])  # disjoint bit fields: adding is OR-ing
    split = hs >= 0
    out.index_add_(0, hw[split], (c[split] >> 2) << hs[split, None])
    return (out - (out >= 2**31).to(torch.int64) * 2**32).to(torch.int32)  # uint32 bit patterns as int32


def unpack_fields3(packed: Tensor, K: int) -> Tensor:
    """The inverse of pack_fields3 -> int32 codes [K, N]."""
    lw, ls, lbits, hw, hs = _field_positions(K, packed.device)
    w = packed.to(torch.int64) & 0xFFFFFFFF
    low = (w[lw] >> ls[:, None]) & ((1 << lbits) - 1)[:, None]
    high = ((w[hw] >> hs.clamp(min=0)[:, None]) & 1) * (hs >= 0)[:, None]
    return (low | (high << 2)).to(torch.int32)
