"""The CUDA kernels (minigptq._cuda_kernels, built from cuda/gpu/) behind checked wrappers.

The compiled module knows nothing of torch (its bindings include no CUDA header either): these wrappers check every
tensor and pass raw pointers, the layer's CudaLayout.args (minigptq/kernels/cuda_layout.py), the SM count, a K-split
workspace and torch's current stream. Torch references (test oracles and fallback): minigptq/pack.py:dequantize
(+ matmul) for cuda_qgemm and cuda_dequantize; the layout alone is checked by
minigptq/kernels/reference.py:cuda_layout_weight.
Sources: cuda/gpu/qgemm.cu, cuda/gpu/bindings.cpp; without a GPU, tests/test_cuda_emu.py runs them on the host.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import Error
from .common import CUDA_DTYPES, DTYPE_CODES, describe
from .cuda_layout import CudaLayout

try:
    from .. import _cuda_kernels as _cuda
    CUDA_IMPORT_ERROR: str | None = None
except ImportError as e:  # built without a CUDA toolkit, or no CUDA driver on this machine
    _cuda, CUDA_IMPORT_ERROR = None, str(e)

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
        ws = (torch.empty(floats, dtype=torch.float32, device=dev),
              torch.zeros(counters, dtype=torch.int32, device=dev))
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
                    f"M >= 1, got {describe(x)}")
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


def cuda_qgemm_tensors(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, perm: Tensor, bits: int,
                       N: int) -> Tensor:
    """cuda_qgemm from a CudaLayout's tensors, unchecked: the torch.compile custom op's path (kernels/ops.py)."""
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
