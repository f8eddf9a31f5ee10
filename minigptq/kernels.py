"""Thin wrappers over the compiled GPTQ kernels (minigptq._cpu_kernels, minigptq._cuda_kernels).

The compiled modules know nothing of torch: this file checks every tensor (dtype, shape, device, contiguity) and
passes raw pointers (tensor.data_ptr()), sizes, a thread count (CPU) or the current CUDA stream (GPU). Sources:
cuda/cpu_qgemm*.{h,cpp,inc} and cuda/cuda_qgemm.cu; the torch reference they match is minigptq/pack.py:dequantize.

The kernels read a `KernelLayout`, built once per layer by `make_layout` (QuantLinear.post_load) from the
checkpoint tensors, which stay untouched:
- rows sorted by group (act-order undone): qweight rows re-packed in that order, `perm` gathers x to match,
  so every group is one contiguous run of rows and its scale/zero are applied once per run;
- scales as fp32 and zero points unpacked to int16 [G, N] (checkpoint_format's +1 already added), so the
  kernels never touch qzeros.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

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

ISAS = {"auto": 0, "scalar": 1, "avx2": 2, "avx512": 3}
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # cuda/qweight.h: DType
CPU_DTYPES = (torch.float32, torch.bfloat16)
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FUSED_MAX_ROWS = 16  # up to this many rows of x the fused kernels run; above, dequantize + torch.matmul


def _describe(t: Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')}{'' if t.is_contiguous() else ' non-contiguous'} " \
           f"{list(t.shape)} on {t.device}"


def _check(t: Tensor, name: str, dtype: torch.dtype, shape: list[int], what: str, device: torch.device) -> None:
    if t.dtype != dtype or list(t.shape) != shape or not t.is_contiguous() or t.device != device:
        raise ValueError(f"{name} must be {str(dtype).removeprefix('torch.')} contiguous {what}={shape} on {device}, "
                         f"got {_describe(t)}")


@dataclass(frozen=True, eq=False)
class KernelLayout:
    """One quantized linear in the form the kernels read (all tensors on one device, contiguous)."""

    qweight: Tensor  # int32 [K*bits/32, N] codes packed along K (GPTQ layout), rows in sorted order
    scales: Tensor  # float32 [G, N]
    zeros: Tensor  # int16 [G, N] zero points, W = scales * (q - zeros)
    row_group: Tensor  # int32 [K] group of each sorted row, nondecreasing
    perm: Tensor | None  # int32 [K] checkpoint row of each sorted row (x is gathered with it); None = identity
    bits: int

    def __post_init__(self) -> None:
        if self.bits not in VALID_BITS:
            raise ValueError(f"bits={self.bits!r} is not supported; valid: {VALID_BITS}")
        K, (G, N), dev = self.row_group.numel(), self.scales.shape, self.scales.device
        _check(self.qweight, "qweight", torch.int32, [K * self.bits // 32, N], "[K*bits/32, N]", dev)
        _check(self.scales, "scales", torch.float32, [G, N], "[G, N]", dev)
        _check(self.zeros, "zeros", torch.int16, [G, N], "[G, N]", dev)
        _check(self.row_group, "row_group", torch.int32, [K], "[K]", dev)
        if self.perm is not None:
            _check(self.perm, "perm", torch.int32, [K], "[K]", dev)
        unit = 32 if self.bits == 3 else 32 // self.bits
        if K % unit or K == 0 or N == 0:
            raise ValueError(f"K={K} must be a positive multiple of {unit} for {self.bits}-bit, N={N} positive")
        if G == 0 or int(self.row_group.min()) < 0 or int(self.row_group.max()) >= G or \
                bool((self.row_group[1:] < self.row_group[:-1]).any()):
            raise ValueError(f"row_group must be nondecreasing with values in [0, G={G})")
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


def make_layout(qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor, bits: int, fmt: str) -> KernelLayout:
    """The kernel layout of one checkpoint layer (tensors as in pack.py, fmt its checkpoint_format)."""
    K, N = g_idx.numel(), scales.shape[1]
    zeros = zero_points(qzeros, bits, N, fmt).to(torch.int16)  # (G, N)
    g = g_idx.to(torch.int32)
    if K > 1 and bool((g[1:] < g[:-1]).any()):  # act-order: sort rows so that each group is contiguous
        perm = torch.argsort(g, stable=True)  # (K,) sorted row -> checkpoint row
        qweight = pack_rows(unpack_rows(qweight, bits, K)[perm], bits)  # (K*bits/32, N)
        return KernelLayout(qweight, scales.float().contiguous(), zeros, g[perm].contiguous(),
                            perm.to(torch.int32), bits)
    return KernelLayout(qweight.contiguous(), scales.float().contiguous(), zeros, g.contiguous(), None, bits)


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
        raise ValueError(f"the layout must be on the CPU, got {layout.scales.device}")
    if threads is None:
        threads = torch.get_num_threads()
    elif not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads={threads!r} must be a positive integer")
    isa_code = ISAS.get(isa)
    if isa_code is None:
        raise ValueError(f"isa={isa!r} is not one of {list(ISAS)}")
    return threads, isa_code


def cpu_qgemm(x: Tensor, layout: KernelLayout, threads: int | None = None, isa: str = "auto") -> Tensor:
    """y = x @ W^T-as-dequantized: x float32/bfloat16 contiguous [M, K] on the CPU -> [M, N] in x.dtype.

    Fused kernel (weights read once per call for all M rows; meant for M <= FUSED_MAX_ROWS).
    threads: None = torch.get_num_threads(). isa: "auto" (best available), "avx512", "avx2" or "scalar".
    """
    threads, isa_code = _cpu_args(layout, threads, isa)
    M, K = x.shape if x.dim() == 2 else (0, -1)
    if M < 1 or K != layout.K or x.dtype not in CPU_DTYPES or not x.is_cpu or not x.is_contiguous():
        raise ValueError(f"x must be a float32 or bfloat16 contiguous CPU tensor [M, K={layout.K}] with M >= 1, "
                         f"got {_describe(x)}")
    return _cpu_qgemm_ptrs(x, layout.ptrs, layout.N, layout.G, layout.bits, threads, isa_code)


def _cpu_qgemm_ptrs(x: Tensor, ptrs: tuple[int, ...], N: int, G: int, bits: int, threads: int,
                    isa_code: int = 0) -> Tensor:
    """The module call for a checked x [M, K]; ptrs = KernelLayout.ptrs (qweight, scales, zeros, row_group, perm)."""
    M, K = x.shape
    out = torch.empty(M, N, dtype=x.dtype)
    _cpu.qgemm(x.data_ptr(), DTYPE_CODES[x.dtype], M, *ptrs, K, N, G, bits, out.data_ptr(), threads, isa_code)
    return out


def cpu_dequantize(layout: KernelLayout, dtype: torch.dtype = torch.float32, threads: int | None = None,
                   isa: str = "auto") -> Tensor:
    """The dequantized weight W^T [K, N] in checkpoint row order (= pack.dequantize), float32 or bfloat16."""
    threads, isa_code = _cpu_args(layout, threads, isa)
    if dtype not in CPU_DTYPES:
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
    out = torch.empty(layout.K, layout.N, dtype=dtype)
    _cpu.dequantize(*layout.ptrs, layout.K, layout.N, layout.G, layout.bits, out.data_ptr(), DTYPE_CODES[dtype],
                    threads, isa_code)
    return out


# ----------------------------------------------------------------------------------------------------- CUDA
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


def _cuda_check(layout: KernelLayout) -> None:
    if not cuda_available():
        raise RuntimeError(f"the CUDA kernels cannot run: {cuda_unavailable_reason()}")
    if layout.on_cpu:
        raise ValueError(f"the layout must be on a CUDA device, got {layout.scales.device}")
    if layout.qweight.data_ptr() % 16 or layout.scales.data_ptr() % 16 or layout.zeros.data_ptr() % 8:
        raise ValueError("qweight and scales must be 16-byte aligned, zeros 8-byte aligned (fresh allocations are)")


def cuda_qgemm(x: Tensor, layout: KernelLayout) -> Tensor:
    """y = x @ W: x float16/bfloat16/float32 contiguous [M, K] on the layout's GPU -> [M, N] in x.dtype.

    Fused kernel, fp32 accumulation, launched on torch's current stream; meant for M <= FUSED_MAX_ROWS.
    """
    _cuda_check(layout)
    K, N = layout.shape
    dev = layout.scales.device
    if x.dtype not in CUDA_DTYPES or x.dim() != 2 or x.shape[1] != K or x.shape[0] < 1 or not x.is_contiguous() \
            or x.device != dev:
        raise ValueError(f"x must be a float16, bfloat16 or float32 contiguous tensor [M, K={K}] on {dev} with "
                         f"M >= 1, got {_describe(x)}")
    return _cuda_qgemm_raw(x, layout.qweight, layout.scales, layout.zeros, layout.row_group, layout.perm, layout.bits)


def _cuda_qgemm_raw(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, row_group: Tensor,
                    perm: Tensor | None, bits: int) -> Tensor:
    (M, K), (G, N), dev = x.shape, scales.shape, x.device
    out = torch.empty(M, N, dtype=x.dtype, device=dev)
    work = torch.empty(M, N, dtype=torch.float32, device=dev)  # fp32 partial sums over K slices
    with torch.cuda.device(dev):
        _cuda.qgemm(x.data_ptr(), DTYPE_CODES[x.dtype], M, qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(),
                    row_group.data_ptr(), 0 if perm is None else perm.data_ptr(), K, N, G, bits, work.data_ptr(),
                    out.data_ptr(), torch.cuda.current_stream(dev).cuda_stream)
    return out


def cuda_dequantize(layout: KernelLayout, dtype: torch.dtype = torch.float16) -> Tensor:
    """The dequantized weight W^T [K, N] in checkpoint row order, float16/bfloat16/float32, on the layout's GPU."""
    _cuda_check(layout)
    if dtype not in CUDA_DTYPES:
        raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
    dev = layout.scales.device
    out = torch.empty(layout.K, layout.N, dtype=dtype, device=dev)
    with torch.cuda.device(dev):
        _cuda.dequantize(*layout.ptrs, layout.K, layout.N, layout.G, layout.bits, out.data_ptr(), DTYPE_CODES[dtype],
                         torch.cuda.current_stream(dev).cuda_stream)
    return out


# ---------------------------------------------------------------------------------------- torch.compile
# The fused kernels as one torch custom op, so that a compiled decode step (generate(..., compile=True)) is a single
# graph with the kernels inside it instead of being cut at every QuantLinear. Eager calls skip it and go straight to
# the modules above: the dispatcher would add its overhead to each of the hundreds of calls a token makes.
@torch.library.custom_op("minigptq::qgemm", mutates_args=())
def qgemm_op(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, row_group: Tensor, perm: Tensor | None,
             bits: int) -> Tensor:
    """y = x @ W for x [M, K] (checked by the caller) and a KernelLayout's tensors, on x's device."""
    if x.device.type == "cuda":
        return _cuda_qgemm_raw(x, qweight, scales, zeros, row_group, perm, bits)
    ptrs = (qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), row_group.data_ptr(),
            0 if perm is None else perm.data_ptr())
    return _cpu_qgemm_ptrs(x, ptrs, scales.shape[1], scales.shape[0], bits, torch.get_num_threads())


@qgemm_op.register_fake
def _(x, qweight, scales, zeros, row_group, perm, bits):
    return x.new_empty(x.shape[0], scales.shape[1])
