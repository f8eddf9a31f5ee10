"""Thin wrappers over the compiled GPTQ kernels (minigptq._cpu_kernels, minigptq._cuda_kernels).

The compiled modules know nothing of torch: this file checks every tensor (dtype, shape, device, contiguity) and
passes raw pointers (tensor.data_ptr()), sizes, a thread count (CPU) or the current CUDA stream (GPU). Sources:
cuda/cpu_qgemm*.{h,cpp,inc} and cuda/cuda_qgemm.cu; the torch reference they match is minigptq/pack.py:dequantize.

The kernels read a `KernelLayout`, built once per layer by `make_layout` (QuantLinear.post_load) from the
checkpoint tensors, which stay untouched:
- rows sorted by group (act-order undone): qweight rows re-packed in that order, `perm` gathers x to match,
  so every group is one contiguous run of rows and its scale/zero are applied once per run;
- scales as fp32 and zero points unpacked to int16 [G, N] (checkpoint_format's +1 already added), so the
  kernels never touch qzeros;
- for the int8-activation kernels (`int8=True`, CPU with AVX-512 VNNI or AVX-VNNI): the packed words cut into
  column tiles of TILE_COLS stored whole ([tiles, K*bits/32, 64]: each tile one sequential stream over K), and 3-bit
  codes re-packed into the "byte-field" layout (`pack_fields3`: the same 3 words per 32 rows, arranged so that 6 of
  every 8 codes sit whole in a byte and a mask alone yields 4 of them as bytes). The same number of bytes; `int8_reference` is their torch reference:
  the same int8 scheme with integer accumulation.
On a CUDA device make_layout builds a `CudaLayout` instead (its own interleaved layout for the tensor-core kernel:
see the CUDA section below and the comment block at the top of cuda/cuda_qgemm.cu).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import Error
from .pack import VALID_BITS, pack_rows, unpack_rows, zero_points

try:
    from . import _cpu_kernels as _cpu
    CPU_IMPORT_ERROR: str | None = None
except ImportError as e:  # not built (pure-Python checkout) or built for another Python
    _cpu, CPU_IMPORT_ERROR = None, str(e)
try:
    from . import _cuda_kernels as _cuda
    CUDA_IMPORT_ERROR: str | None = None
except ImportError as e:  # built without a CUDA toolkit, or no CUDA driver on this machine
    _cuda, CUDA_IMPORT_ERROR = None, str(e)

ISAS = {"auto": 0, "scalar": 1, "avx2": 2, "avx512": 3, "avxvnni": 4, "avx512vnni": 5}
INT8_ISAS = ("avx512vnni", "avxvnni")
CHUNK_ROWS = 128  # cuda/cpu_qgemm_detail.h kChunkRows: a chunk is at most this many sorted rows of one group
TILE_COLS = 64  # cuda/cpu_qgemm_detail.h kTileCols: columns of one tile of the int8 layout
CHUNK_ROWS_INT8 = 32  # cuda/cpu_qgemm_detail.h kChunkRowsI8: rows sharing one int8 activation scale
INT8_TINY = 2.0**-100  # kTinyI8: a chunk with max|x| below this counts as zero (127 / max|x| would overflow)
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # cuda/qweight.h: DType
CPU_DTYPES = (torch.float32, torch.bfloat16)
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FUSED_MAX_ROWS = 16  # up to this many rows of x the fused kernels run; above, dequantize + torch.matmul


def _describe(t: Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')}{'' if t.is_contiguous() else ' non-contiguous'} " \
           f"{list(t.shape)} on {t.device}"


def _check(t: Tensor, name: str, dtype: torch.dtype, shape: list[int], what: str, device: torch.device) -> None:
    if t.dtype != dtype or list(t.shape) != shape or not t.is_contiguous() or t.device != device:
        raise Error(f"{name} must be {str(dtype).removeprefix('torch.')} contiguous {what}={shape} on {device}, "
                         f"got {_describe(t)}")


@dataclass(frozen=True, eq=False)
class KernelLayout:
    """One quantized linear in the form the kernels read (all tensors on one device, contiguous)."""

    qweight: Tensor  # int32 [K*bits/32, N] codes packed along K (GPTQ layout), rows in sorted order
    scales: Tensor  # float32 [G, N]
    zeros: Tensor  # int16 [G, N] zero points, W = scales * (q - zeros)
    # int8 layout: qweight [T, K*bits/32, 64], scales [T, G, 64], zeros [T, G, 64] in column tiles (T = ceil(N/64))
    row_group: Tensor  # int32 [K] group of each sorted row, nondecreasing
    perm: Tensor | None  # int32 [K] checkpoint row of each sorted row (x is gathered with it); None = identity
    bits: int
    int8: bool = False  # the int8 kernels' layout: column tiles, 3-bit codes in byte fields
    N: int = -1  # out_features (needed with int8, whose tensors are padded to whole tiles)

    def __post_init__(self) -> None:
        if self.bits not in VALID_BITS:
            raise Error(f"bits={self.bits!r} is not supported; valid: {VALID_BITS}")
        K, dev = self.row_group.numel(), self.scales.device
        if self.int8:
            (T, G, _), N = self.scales.shape, self.N
            if not (T - 1) * TILE_COLS < N <= T * TILE_COLS:
                raise Error(f"N={N} does not fit {T} tiles of {TILE_COLS} columns")
            _check(self.qweight, "qweight", torch.int32, [T, K * self.bits // 32, TILE_COLS],
                   "[ceil(N/64), K*bits/32, 64]", dev)
            _check(self.scales, "scales", torch.float32, [T, G, TILE_COLS], "[ceil(N/64), G, 64]", dev)
            _check(self.zeros, "zeros", torch.int16, [T, G, TILE_COLS], "[ceil(N/64), G, 64]", dev)
        else:
            G, N = self.scales.shape
            if self.N not in (-1, N):
                raise Error(f"N={self.N} disagrees with scales {list(self.scales.shape)}")
            _check(self.qweight, "qweight", torch.int32, [K * self.bits // 32, N], "[K*bits/32, N]", dev)
            _check(self.scales, "scales", torch.float32, [G, N], "[G, N]", dev)
            _check(self.zeros, "zeros", torch.int16, [G, N], "[G, N]", dev)
        _check(self.row_group, "row_group", torch.int32, [K], "[K]", dev)
        if self.perm is not None:
            _check(self.perm, "perm", torch.int32, [K], "[K]", dev)
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
                int8: bool = False, cuda: bool | None = None) -> "KernelLayout | CudaLayout":
    """The kernel layout of one checkpoint layer (tensors as in pack.py, fmt its checkpoint_format); int8: for the
    int8-activation CPU kernels (ignored off the CPU); cuda: the CUDA kernels' layout (None: when on a CUDA device)."""
    K, N = g_idx.numel(), scales.shape[1]
    if qweight.device.type == "cuda" if cuda is None else cuda:
        return make_cuda_layout(qweight, zero_points(qzeros, bits, N, fmt), scales, g_idx, bits)
    int8 = int8 and qweight.device.type == "cpu"
    zeros = zero_points(qzeros, bits, N, fmt).to(torch.int16)  # (G, N)
    g = g_idx.to(torch.int32)
    perm = None
    if K > 1 and bool((g[1:] < g[:-1]).any()):  # act-order: sort rows so that each group is contiguous
        perm = torch.argsort(g, stable=True)  # (K,) sorted row -> checkpoint row
        qweight = pack_rows(unpack_rows(qweight, bits, K)[perm], bits)  # (K*bits/32, N)
        g = g[perm]
    scales = scales.float()
    if int8:
        qweight = to_tiles(pack_fields3(unpack_rows(qweight, bits, K)) if bits == 3 else qweight)
        scales, zeros = to_tiles(scales), to_tiles(zeros)
    return KernelLayout(qweight.contiguous(), scales.contiguous(), zeros, g.contiguous(),
                        None if perm is None else perm.to(torch.int32), bits, int8, N)


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
    """For each row r of K (a multiple of 32) in the 3-bit byte-field layout (cuda/cpu_qgemm_i8.inc): (word row of
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


# ------------------------------------------------------------------------------------------------------ CPU
def cpu_available() -> bool:
    return _cpu is not None


def cpu_isas() -> list[str]:
    """Instruction sets the CPU kernels can use here, best last ([] if the module is not built)."""
    return list(_cpu.available_isas()) if _cpu is not None else []


def _cpu_args(layout: KernelLayout, threads: int | None, isa: str) -> tuple[int, int]:
    if _cpu is None:
        raise RuntimeError(f"minigptq._cpu_kernels is not built ({CPU_IMPORT_ERROR}); pip install -e . builds it")
    if not layout.on_cpu:
        raise Error(f"the layout must be on the CPU, got {layout.scales.device}")
    if threads is None:
        threads = torch.get_num_threads()
    elif not isinstance(threads, int) or threads < 1:
        raise Error(f"threads={threads!r} must be a positive integer")
    isa_code = ISAS.get(isa)
    if isa_code is None:
        raise Error(f"isa={isa!r} is not one of {list(ISAS)}")
    return threads, isa_code


def cpu_qgemm(x: Tensor, layout: KernelLayout, threads: int | None = None, isa: str = "auto") -> Tensor:
    """y = x @ W^T-as-dequantized: x float32/bfloat16 contiguous [M, K] on the CPU -> [M, N] in x.dtype.

    Fused kernel (weights read once per call for all M rows; meant for M <= FUSED_MAX_ROWS).
    threads: None = torch.get_num_threads(). isa: "auto" (best available), "avx512", "avx2" or "scalar".
    """
    threads, isa_code = _cpu_args(layout, threads, isa)
    if layout.int8:
        raise Error("the layout was made for the int8 kernels' layout (make_layout(..., int8=True)); "
                         "cpu_qgemm_int8 runs it")
    _check_cpu_x(x, layout)
    return _cpu_qgemm_ptrs(x, layout.ptrs, layout.N, layout.G, layout.bits, threads, isa_code)


def _check_cpu_x(x: Tensor, layout: KernelLayout) -> None:
    M, K = x.shape if x.dim() == 2 else (0, -1)
    if M < 1 or K != layout.K or x.dtype not in CPU_DTYPES or not x.is_cpu or not x.is_contiguous():
        raise Error(f"x must be a float32 or bfloat16 contiguous CPU tensor [M, K={layout.K}] with M >= 1, "
                         f"got {_describe(x)}")


def _cpu_qgemm_ptrs(x: Tensor, ptrs: tuple[int, ...], N: int, G: int, bits: int, threads: int,
                    isa_code: int = 0, int8: bool = False) -> Tensor:
    """The module call for a checked x [M, K]; ptrs = KernelLayout.ptrs (qweight, scales, zeros, row_group, perm);
    int8: the int8-activation kernels (the layout must be an int8 one)."""
    M, K = x.shape
    out = torch.empty(M, N, dtype=x.dtype)
    (_cpu.qgemm_i8 if int8 else _cpu.qgemm)(x.data_ptr(), DTYPE_CODES[x.dtype], M, *ptrs, K, N, G, bits,
                                            out.data_ptr(), threads, isa_code)
    return out


def cpu_dequantize(layout: KernelLayout, dtype: torch.dtype = torch.float32, threads: int | None = None,
                   isa: str = "auto") -> Tensor:
    """The dequantized weight W^T [K, N] in checkpoint row order (= pack.dequantize), float32 or bfloat16."""
    threads, isa_code = _cpu_args(layout, threads, isa)
    if dtype not in CPU_DTYPES:
        raise Error(f"dtype must be float32 or bfloat16, got {dtype}")
    out = torch.empty(layout.K, layout.N, dtype=dtype)
    _cpu.dequantize(*layout.ptrs, layout.K, layout.N, layout.G, layout.bits, out.data_ptr(), DTYPE_CODES[dtype],
                    threads, isa_code, int(layout.int8))
    return out


def cpu_int8_available() -> bool:
    """The int8-activation kernels can run here: the module is built and the CPU has AVX-512 VNNI or AVX-VNNI."""
    return any(isa in INT8_ISAS for isa in cpu_isas())


def cpu_qgemm_int8(x: Tensor, layout: KernelLayout, threads: int | None = None, isa: str = "auto") -> Tensor:
    """y = x @ W with x quantized to int8 per chunk (<= CHUNK_ROWS_INT8 rows of one group, one fp32 scale each) and
    integer dot products (VNNI): x float32/bfloat16 contiguous [M, K] -> [M, N] in x.dtype. Equals int8_reference
    exactly.

    layout: made with int8=True. isa: "auto" (AVX-512 VNNI, else AVX-VNNI), "avx512vnni" or "avxvnni".
    """
    threads, isa_code = _cpu_args(layout, threads, isa)
    if not layout.int8:
        raise Error("the layout was made for the fp32 kernels; make_layout(..., int8=True) makes one for these")
    if isa_code not in (0, ISAS["avxvnni"], ISAS["avx512vnni"]):
        raise Error(f"isa={isa!r}: the int8 kernels run on avx512vnni or avxvnni")
    _check_cpu_x(x, layout)
    return _cpu_qgemm_ptrs(x, layout.ptrs, layout.N, layout.G, layout.bits, threads, isa_code, int8=True)


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
    """Torch reference of the int8 kernels, the same arithmetic step by step: x [M, K] -> y [M, N] float32.

    Per chunk (CHUNK_ROWS_INT8 rows of one group): xq = round(x * (127 / max|x|)) clamped to [-127, 127] (0 where
    max|x| < INT8_TINY), sx = max|x| / 127 (NaN where the chunk holds Inf or NaN); part += sx * float(xq @ q) with
    the integer products summed exactly (int64), zs += sx * float(sum(xq)); after a group's last chunk
    y += s[g] * (part - float(z[g]) * zs), and part, zs restart at 0. Every step one fp32 rounding, in chunk order.
    """
    K, N = layout.K, layout.N
    words, scales, zeros = layout.qweight, layout.scales, layout.zeros
    if layout.int8:
        words, scales, zeros = (from_tiles(t, N) for t in (words, scales, zeros))
    codes = (unpack_fields3(words, K) if layout.int8 and layout.bits == 3
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


# ----------------------------------------------------------------------------- CPU decode-step operations
# One call each for what a decode step otherwise spends a dozen torch operators on (cuda/cpu_decode.cpp). Their
# references and fallbacks are RMSNorm and Attention in minigptq/transformer.py, which call these only for fp32
# tensors on the CPU outside torch.compile, after checking shapes; the wrappers check what would corrupt memory.
def cpu_gptq_block(W1: Tensor, Hinv1: Tensor, S: Tensor, Z: Tensor, maxq: int) -> tuple[Tensor, Tensor]:
    """GPTQ's inner loop over one block of b columns (gptq.py, Algorithm 1 lines 4-7), bit for bit as the torch loop:
    W1 [N, b] contiguous fp32 is error-compensated in place; Hinv1 [b, b] (rows may be strided) the block of the
    upper Cholesky factor of H^-1; S, Z [b, N] each column's scale and zero point. -> (codes, E), both [N, b]."""
    N, b = W1.shape
    # A one-column block (blocksize 1, or the last column after groups of 3 on 64 inputs) reads only Hinv1[0, 0]:
    # its strides do not matter, and a slice of a column-major factor has stride (1, K) that .contiguous() keeps.
    ok = all(t.dtype == torch.float32 and t.is_cpu for t in (W1, Hinv1, S, Z)) and W1.is_contiguous() \
        and S.is_contiguous() and Z.is_contiguous() and Hinv1.shape == (b, b) and (Hinv1.stride(1) == 1 or b == 1) \
        and S.shape == (b, N) and Z.shape == (b, N)
    if not ok:
        raise Error(f"need float32 CPU tensors W1 [N, b] contiguous, Hinv1 [b, b] with unit column stride, S and Z "
                    f"[b, N] contiguous; got {_describe(W1)}, {_describe(Hinv1)}, {_describe(S)}, {_describe(Z)}")
    if _cpu is None:
        raise RuntimeError(f"minigptq._cpu_kernels is not built ({CPU_IMPORT_ERROR}); pip install -e . builds it")
    codes, err = torch.empty_like(W1), torch.empty_like(W1)
    _cpu.gptq_block(W1.data_ptr(), N, b, Hinv1.data_ptr(), Hinv1.stride(0), S.data_ptr(), Z.data_ptr(), float(maxq),
                    codes.data_ptr(), err.data_ptr(), torch.get_num_threads())
    return codes, err


def cpu_rms_norm(x: Tensor, w: Tensor, eps: float) -> Tensor:
    """w * x / sqrt(mean(x^2, -1) + eps) for contiguous fp32 CPU x [..., D] and w [D]."""
    D = w.numel()
    if x.dtype != torch.float32 or w.dtype != torch.float32 or x.shape[-1] != D or not x.is_contiguous() \
            or not w.is_contiguous() or not x.is_cpu or not w.is_cpu or x.numel() == 0:
        raise Error(f"x must be contiguous float32 [..., {D}] on the CPU, w float32 [{D}], got "
                         f"{_describe(x)}, {_describe(w)}")
    out = torch.empty_like(x)
    _cpu.rms_norm(x.data_ptr(), w.data_ptr(), float(eps), x.numel() // D, D, out.data_ptr())
    return out


def cpu_attn_decode(q: Tensor, k: Tensor, v: Tensor, q_row: int, kv_row: int, head_stride: int,
                    cos: Tensor | None, sin: Tensor | None, k_cache: Tensor, v_cache: Tensor, layer: int,
                    mask: Tensor | None, H: int, slot: int) -> Tensor:
    """One new token per sequence (cuda/cpu_decode.h): RoPE on q/k, k/v written to the caches (layers, B, KVH, Smax,
    hd) at `slot`, attention over slots [0, slot] -> [B, 1, H*hd]. q/k/v are fp32 views into one or three
    contiguous tensors, addressed by row and head strides (in elements); cos/sin [B, 1, 1, hd] or None; mask:
    additive [B, 1 or H, 1, slot + 1] or None. All fp32, contiguous, on the CPU (checked by the caller)."""
    L_, B, KVH, Smax, hd = k_cache.shape
    if not 0 <= layer < L_ or not 0 <= slot < Smax or H % KVH or v_cache.shape != k_cache.shape or \
            (cos is not None and (cos.numel() != B * hd or sin.numel() != B * hd)) or \
            (mask is not None and (mask.shape[0] != B or mask.shape[-1] != slot + 1 or mask.shape[1] not in (1, H))):
        raise Error(f"attn_decode: layer={layer}, slot={slot}, H={H} do not fit the cache "
                         f"{list(k_cache.shape)} or the cos/mask shapes")
    out = torch.empty(B, 1, H * hd)
    step = B * KVH * Smax * hd * 4  # bytes of one layer of the cache
    _cpu.attn_decode(q.data_ptr(), k.data_ptr(), v.data_ptr(), q_row, kv_row, head_stride,
                     0 if cos is None else cos.data_ptr(), 0 if sin is None else sin.data_ptr(),
                     k_cache.data_ptr() + layer * step, v_cache.data_ptr() + layer * step,
                     0 if mask is None else mask.data_ptr(), 0 if mask is None else mask.shape[1],
                     0 if mask is None else mask.shape[-1], out.data_ptr(), B, H, KVH, hd, Smax, slot,
                     torch.get_num_threads())
    return out


class DecodeBlockPlan:
    """One block's fixed pointers for cpu_decode_block, with the tensors they point into kept alive."""

    def __init__(self, block, cfg, layouts: list[KernelLayout], biases: list[Tensor | None]):
        self.parts = (block.attn.fused, block.mlp.fused, block.attn.o, block.mlp.down)
        self.keep = (layouts, biases, block.attn_norm.weight, block.mlp_norm.weight)
        self.handle = _cpu.block_plan(
            [(*L.ptrs, L.K, L.N, L.G, L.bits) for L in layouts], [0 if b is None else b.data_ptr() for b in biases],
            block.attn_norm.weight.data_ptr(), block.mlp_norm.weight.data_ptr(), float(block.attn_norm.eps),
            int(layouts[0].int8), cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
            cfg.intermediate_size)

    def current(self, block) -> bool:
        """The block still has the layers (and layouts) this plan points into."""
        a, m, o, d = self.parts
        return block.attn.fused is a and block.mlp.fused is m and block.attn.o is o and block.mlp.down is d \
            and o._layout is self.keep[0][1] and d._layout is self.keep[0][3]

    @classmethod
    def make(cls, block, cfg) -> "DecodeBlockPlan | None":
        """The plan, or None if this block cannot run as one call (see Transformer.decode_plans)."""
        if _cpu is None:
            return None
        attn, mlp = block.attn, block.mlp
        fq, fg, o, d = attn.fused, mlp.fused, attn.o, mlp.down
        if fq is None or fg is None or getattr(o, "_layout", None) is None or getattr(d, "_layout", None) is None:
            return None
        layouts = [fq.layout, o._layout, fg.layout, d._layout]
        if not all(L.on_cpu for L in layouts) or len({L.int8 for L in layouts}) != 1 or any(
                w.dtype != torch.float32 for w in (block.attn_norm.weight, block.mlp_norm.weight)):
            return None
        biases = [None if b is None else b.float().contiguous() for b in (fq.bias, o.bias, fg.bias, d.bias)]
        return cls(block, cfg, layouts, biases)


def cpu_decode_block(plan: DecodeBlockPlan, x: Tensor, cos: Tensor | None, sin: Tensor | None, k_cache: Tensor,
                     v_cache: Tensor, layer: int, mask: Tensor | None, slot: int) -> None:
    """Block `layer`'s decode step in place on x [B, 1, hidden] (fp32, contiguous, CPU; checked by the caller):
    cuda/cpu_decode.h: decode_block. Caches (layers, B, KVH, Smax, hd) fp32; mask additive [B, 1|H, 1, slot+1]."""
    L_, B, KVH, Smax, hd = k_cache.shape
    if not 0 <= layer < L_ or not 0 <= slot < Smax or x.shape[0] != B or \
            (mask is not None and (mask.shape[0] != B or mask.shape[-1] != slot + 1)):
        raise Error(f"decode_block: layer={layer}, slot={slot} or x {list(x.shape)} do not fit the cache "
                         f"{list(k_cache.shape)}")
    step = B * KVH * Smax * hd * 4  # bytes of one layer of the cache
    _cpu.decode_block(plan.handle, x.data_ptr(), B, 0 if cos is None else cos.data_ptr(),
                      0 if sin is None else sin.data_ptr(), k_cache.data_ptr() + layer * step,
                      v_cache.data_ptr() + layer * step, 0 if mask is None else mask.data_ptr(),
                      0 if mask is None else mask.shape[1], 0 if mask is None else mask.shape[-1], Smax, slot,
                      torch.get_num_threads())


# ----------------------------------------------------------------------------------------------------- CUDA
# The CUDA kernels read their own layout (`CudaLayout`, built by make_layout for a CUDA device, or with cuda=True
# anywhere: the host-emulation tests build it on the CPU). Bit-level description: the comment block at the top of
# cuda/cuda_qgemm.cu. In short, per layer, once:
# - rows sorted by group (act-order undone) and every group padded with empty rows to `group_rows` (32, 64 or a
#   multiple of 128), so that a group starts on a 16-row tensor-core tile and its scale/zero are set once per group;
#   `perm` [Kp] gathers x (-1: a padding row, x = 0 there); K is padded to a multiple of 128 (one k-block);
# - codes interleaved so that each thread's 128-bit loads hold exactly its mma.m16n8k16 A fragments, two codes per
#   16-bit half pair (bits p and 16 + p of a word): one AND/OR with the exponent of 1024 (fp16) or 128 (bf16) makes
#   two 16-bit floats, one half2 FMA removes the bias and the zero point;
# - scales as fp16 pairs (bf16 when the checkpoint's scales are bf16 values fp16 cannot hold), zero points packed
#   4 bits each (8 for 8-bit): 2.5 bytes per group and column, 0.0195 bytes per weight at group size 128.
CUDA_KBLOCK = 128  # rows of one k-block (cuda_qgemm.cu kKB)
CUDA_WORDS = {2: 4, 3: 6, 4: 8, 8: 16}  # 32-bit words per lane per k-block and 16-column tile


@dataclass(frozen=True, eq=False)
class CudaLayout:
    """One quantized linear in the CUDA kernels' layout (cuda/cuda_qgemm.cu), all tensors on one device."""

    qweight: Tensor  # int32 [ntiles, Kp/128, 32 lanes * words]: interleaved codes, 16 columns x 128 rows per chunk
    scales: Tensor  # float16 or bfloat16 [G, ntiles, 8, 2]: (scale of column g, of column g + 8) per tile
    zeros: Tensor  # uint8 [G, ntiles, 8, 1] (z_g | z_{g+8} << 4) or [G, ntiles, 8, 2] (8-bit: z_g, z_{g+8})
    row_group: Tensor  # int32 [Kp] group of each padded sorted row (= row // group_rows)
    perm: Tensor  # int32 [Kp] checkpoint row of each padded sorted row, -1 for padding
    bits: int
    N: int  # out_features
    K: int  # in_features
    group_rows: int  # rows per (padded) group: 32, 64 or a multiple of 128

    int8 = False  # (KernelLayout's fields that QuantLinear reads)
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
        _check(self.qweight, "qweight", torch.int32, [T, Kp // CUDA_KBLOCK, 32 * CUDA_WORDS[self.bits]],
               "[ntiles, Kp/128, 32*words]", dev)
        if self.scales.dtype not in (torch.float16, torch.bfloat16) or list(self.scales.shape) != [G, T, 8, 2]:
            raise Error(f"scales must be float16/bfloat16 [G, ntiles, 8, 2], got {_describe(self.scales)}")
        _check(self.zeros, "zeros", torch.uint8, [G, T, 8, 2 if self.bits == 8 else 1], "[G, ntiles, 8, 1|2]", dev)
        _check(self.perm, "perm", torch.int32, [Kp], "[Kp]", dev)
        object.__setattr__(self, "G", G)
        # The module's view of the layer (cuda_bindings.cpp WeightTuple), built once: a decode step calls hundreds.
        object.__setattr__(self, "args", (self.qweight.data_ptr(), self.scales.data_ptr(), self.zeros.data_ptr(),
                                          self.perm.data_ptr(), self.K, self.N, Kp, G, self.group_rows, self.bits,
                                          int(self.scales.dtype == torch.bfloat16)))
        object.__setattr__(self, "_ws_need", {})  # (M, dtype code) -> (workspace floats, counters), see _cuda_launch

    @property
    def shape(self) -> tuple[int, int]:
        """(K, N): in_features, out_features."""
        return self.K, self.N


def _cuda_fragment_index(bits: int, device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For lane l (0..31) and pair p (0..31) of a 128-row x 16-column chunk: (row of the low code, column, word,
    bit position) [32, 32]; the high code is the next row at position + 16. pos = -1: the 3-bit spare pair, whose
    3 code bits sit at bit 9 (+16) of words `word`, `word + 1`, `word + 2`. Mirrors cuda_qgemm.cu slot()."""
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
    row, col, word, pos = _cuda_fragment_index(bits, dev)
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
    row, col, word, pos = _cuda_fragment_index(L.bits, w.device)
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


_cuda_status: str | None = None  # why the CUDA kernels cannot run here ("" = they can), computed once


def cuda_unavailable_reason() -> str:
    """"" if the CUDA kernels can run here, else why not (not built, no GPU, driver older than the toolkit)."""
    global _cuda_status
    if _cuda_status is None:
        if _cuda is None:
            _cuda_status = f"minigptq._cuda_kernels is not built ({CUDA_IMPORT_ERROR})"
        elif not torch.cuda.is_available():
            _cuda_status = "torch sees no CUDA device"
        else:
            _cuda_status = _cuda.runtime_status()
    return _cuda_status


def cuda_available() -> bool:
    """The CUDA module is built and its CUDA runtime reaches a device."""
    return cuda_unavailable_reason() == ""


def _cuda_check(layout: CudaLayout) -> None:
    if not cuda_available():
        raise RuntimeError(f"the CUDA kernels cannot run: {cuda_unavailable_reason()}")
    if not isinstance(layout, CudaLayout) or layout.scales.device.type != "cuda":
        raise Error(f"the layout must be on a CUDA device (make_layout on CUDA tensors), got "
                    f"{type(layout).__name__} on {layout.scales.device}")
    if layout.qweight.data_ptr() % 16:
        raise Error("qweight must be 16-byte aligned (fresh allocations are)")


_cuda_sms: dict[int, int] = {}  # device index -> SM count, queried once
_cuda_workspaces: dict[int, tuple[Tensor, Tensor]] = {}  # device index -> (fp32 partial sums, int32 counters)
_cuda_retired: list[tuple[Tensor, Tensor]] = []  # outgrown workspaces: a captured CUDA graph may still use them


def _cuda_workspace(dev: torch.device, need: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """The device's K-split workspace, grown to `need` = (floats, counters). Shared by every call on the device, so
    fused calls must not run concurrently on two streams. Counters start at zero; every call leaves them zero."""
    ws = _cuda_workspaces.get(dev.index)
    if ws is None or ws[0].numel() < need[0] or ws[1].numel() < need[1]:
        if ws is not None:
            _cuda_retired.append(ws)
        floats = max(need[0], 1 << 18, 0 if ws is None else ws[0].numel())
        counters = max(need[1], 1 << 12, 0 if ws is None else ws[1].numel())
        ws = (torch.empty(floats, dtype=torch.float32, device=dev), torch.zeros(counters, dtype=torch.int32, device=dev))
        _cuda_workspaces[dev.index] = ws
    return ws


def _cuda_sm_count(dev: torch.device) -> int:
    sms = _cuda_sms.get(dev.index)
    if sms is None:
        sms = _cuda_sms[dev.index] = torch.cuda.get_device_properties(dev).multi_processor_count
    return sms


def cuda_qgemm(x: Tensor, layout: CudaLayout) -> Tensor:
    """y = x @ W: x float16/bfloat16/float32 contiguous [M, K] on the layout's GPU -> [M, N] in x.dtype.

    One launch on torch's current stream (tensor cores for fp16/bf16, a plain kernel for fp32), fp32 accumulation,
    bitwise-identical results run to run; no allocation or synchronisation after the first call of a shape (CUDA
    graphs can capture it). Meant for M <= FUSED_MAX_ROWS.
    """
    _cuda_check(layout)
    K, N = layout.shape
    dev = layout.scales.device
    if x.dtype not in CUDA_DTYPES or x.dim() != 2 or x.shape[1] != K or x.shape[0] < 1 or not x.is_contiguous() \
            or x.device != dev:
        raise Error(f"x must be a float16, bfloat16 or float32 contiguous tensor [M, K={K}] on {dev} with "
                         f"M >= 1, got {_describe(x)}")
    return _cuda_qgemm_args(x, layout.args, layout._ws_need)


def _cuda_qgemm_args(x: Tensor, args: tuple, need_cache: dict | None) -> Tensor:
    """The module call for a checked x [M, K] and CudaLayout.args; need_cache: (M, dtype) -> workspace size."""
    M, dev, code = x.shape[0], x.device, DTYPE_CODES[x.dtype]
    sms = _cuda_sm_count(dev)
    need = None if need_cache is None else need_cache.get((M, code))
    if need is None:
        need = _cuda.qgemm_workspace(args, M, code, sms)
        if need_cache is not None:
            need_cache[(M, code)] = need
    ws, counters = _cuda_workspace(dev, need)
    out = torch.empty(M, args[5], dtype=x.dtype, device=dev)
    with torch.cuda.device(dev):
        _cuda.qgemm(args, x.data_ptr(), code, M, out.data_ptr(), ws.data_ptr(), ws.numel(), counters.data_ptr(),
                    counters.numel(), sms, torch.cuda.current_stream(dev).cuda_stream)
    return out


def _cuda_qgemm_raw(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, perm: Tensor, bits: int,
                    N: int) -> Tensor:
    """cuda_qgemm from a CudaLayout's tensors (the torch.compile custom op's path)."""
    G, Kp = scales.shape[0], perm.numel()
    args = (qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), perm.data_ptr(), x.shape[1], N, Kp, G, Kp // G,
            bits, int(scales.dtype == torch.bfloat16))
    return _cuda_qgemm_args(x, args, None)


def cuda_dequantize(layout: CudaLayout, dtype: torch.dtype = torch.float16) -> Tensor:
    """The dequantized weight W^T [K, N] in checkpoint row order, float16/bfloat16/float32, on the layout's GPU."""
    _cuda_check(layout)
    if dtype not in CUDA_DTYPES:
        raise Error(f"dtype must be float16, bfloat16 or float32, got {dtype}")
    dev = layout.scales.device
    out = torch.empty(layout.K, layout.N, dtype=dtype, device=dev)
    with torch.cuda.device(dev):
        _cuda.dequantize(layout.args, out.data_ptr(), DTYPE_CODES[dtype], torch.cuda.current_stream(dev).cuda_stream)
    return out


# ---------------------------------------------------------------------------------------- torch.compile
# The fused kernels as one torch custom op, so that a compiled decode step (generate(..., compile=True)) is a single
# graph with the kernels inside it instead of being cut at every QuantLinear. Eager calls skip it and go straight to
# the modules above: the dispatcher would add its overhead to each of the hundreds of calls a token makes.
@torch.library.custom_op("minigptq::qgemm", mutates_args=())
def qgemm_op(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, row_group: Tensor, perm: Tensor | None,
             bits: int, N: int, int8: bool = False) -> Tensor:
    """y = x @ W for x [M, K] (checked by the caller) and a KernelLayout's tensors (N = layout.N), on x's device."""
    if x.device.type == "cuda":
        return _cuda_qgemm_raw(x, qweight, scales, zeros, perm, bits, N)
    ptrs = (qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), row_group.data_ptr(),
            0 if perm is None else perm.data_ptr())
    G = scales.shape[1] if int8 else scales.shape[0]  # int8: tiled scales [T, G, 64]
    return _cpu_qgemm_ptrs(x, ptrs, N, G, bits, torch.get_num_threads(), int8=int8)


@qgemm_op.register_fake
def _(x, qweight, scales, zeros, row_group, perm, bits, N, int8=False):
    return x.new_empty(x.shape[0], N)
