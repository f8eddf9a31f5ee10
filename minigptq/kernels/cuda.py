"""The CUDA kernels (minigptq._cuda_kernels, built from cuda/gpu/) behind checked wrappers.

The compiled module knows nothing of torch (its bindings include no CUDA header either): these wrappers check every
tensor and pass raw pointers, the layer's CudaLayout.args (minigptq/kernels/cuda_layout.py), the SM count, a
K-split workspace per (device, stream) and torch's current stream. Torch references (test oracles and fallback):
minigptq/pack.py:dequantize (+ matmul) for cuda_qgemm and cuda_dequantize; the layout alone is checked by
minigptq/kernels/reference.py:cuda_layout_weight.
Sources: cuda/gpu/qgemm.cu, cuda/gpu/bindings.cpp; without a GPU, tests/test_cuda_emu.py runs them on the host.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import Error
from .common import CUDA_DTYPES, DTYPE_CODES, describe
from .cuda_layout import CUDA_WORDS, IDENTITY_PERMS, CudaLayout

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


CUDA_FUSED_MAX_ROWS = 64  # rows of fp16/bf16 x the fused kernel takes; above, dequantize + torch.matmul
CUDA_FUSED_MAX_ROWS_F32 = 21  # fp32 x: split into three bf16 rows each (cuda/gpu/qgemm.cu), 3 * 21 <= 64

_cuda_sms: dict[int, int] = {}  # device index -> SM count, queried once
# (device index, stream handle) -> [fp32 pieces, int32 counters, zeroed]: one per stream, so that calls on two
# streams never share it. zeroed False: created during a CUDA-graph capture, its counters are zeroed by the graph's
# own memset node, and by an eager zero_() before its first use outside a capture.
_cuda_workspaces: dict[tuple[int, int], list] = {}
_cuda_retired: list[list] = []  # outgrown workspaces: a captured CUDA graph may still use them


def _cuda_workspace(dev: torch.device, stream: int, need: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """The K-split workspace of (dev, stream), at least `need` = (floats, counters). Counters start at zero; every
    call leaves them zero. Never grown while the stream is being captured (the graph holds the old buffers)."""
    key, capturing = (dev.index, stream), torch.cuda.is_current_stream_capturing()
    ws = _cuda_workspaces.get(key)
    if ws is not None and (ws[0].numel() < need[0] or ws[1].numel() < need[1]):
        if capturing:
            raise Error(f"the CUDA kernels' workspace of this stream is too small for this call ({need[0]} floats, "
                        f"{need[1]} counters needed) and cannot grow during a CUDA-graph capture: make one call "
                        f"with the same shapes on this stream before capturing")
        _cuda_retired.append(ws)
        ws = None
    if ws is None:
        floats, counters = max(need[0], 1 << 18), max(need[1], 1 << 10)
        ws = [torch.empty(floats, dtype=torch.float32, device=dev),
              torch.zeros(counters, dtype=torch.int32, device=dev), not capturing]
        _cuda_workspaces[key] = ws
    elif not ws[2] and not capturing:
        ws[1].zero_()
        ws[2] = True
    return ws[0], ws[1]


def _cuda_sm_count(dev: torch.device) -> int:
    sms = _cuda_sms.get(dev.index)
    if sms is None:
        sms = _cuda_sms[dev.index] = torch.cuda.get_device_properties(dev).multi_processor_count
    return sms


def _check_x(x: Tensor, K: int, dev: torch.device) -> None:
    if x.dtype not in CUDA_DTYPES or x.dim() != 2 or x.shape[1] != K or x.shape[0] < 1 or not x.is_contiguous() \
            or x.device != dev:
        raise Error(f"x must be a float16, bfloat16 or float32 contiguous tensor [M, K={K}] on {dev} with "
                    f"M >= 1, got {describe(x)}")


def cuda_qgemm(x: Tensor, layout: CudaLayout) -> Tensor:
    """y = x @ W: x float16/bfloat16/float32 contiguous [M, K] on the layout's GPU -> [M, N] in x.dtype.

    Up to CUDA_FUSED_MAX_ROWS rows (CUDA_FUSED_MAX_ROWS_F32 for fp32 x): the fused kernel on torch's current
    stream (a gather pass first where the layout has act-order or x is fp32 or unaligned), fp32 accumulation,
    bitwise-identical results run to run, no synchronisation (CUDA graphs can capture it). More rows: the
    dequantized weight (cuda_dequantize) and torch.matmul.
    """
    _cuda_check(layout)
    _check_x(x, layout.K, layout.scales.device)
    return _cuda_qgemm_args(x, layout.args, layout._ws_need)


def _cuda_qgemm_args(x: Tensor, args: tuple, need_cache: dict | None) -> Tensor:
    """The module call for a checked x [M, K] and CudaLayout.args; need_cache: (M, dtype, aligned) -> sizes."""
    M, dev, code = x.shape[0], x.device, DTYPE_CODES[x.dtype]
    if M > (CUDA_FUSED_MAX_ROWS_F32 if x.dtype == torch.float32 else CUDA_FUSED_MAX_ROWS):
        return x @ _cuda_dequantize_args(args, x.dtype, dev)
    sms = _cuda_sm_count(dev)
    key = (M, code, x.data_ptr() % 16 == 0)
    need = None if need_cache is None else need_cache.get(key)
    if need is None:
        need = _cuda.qgemm_workspace(args, M, code, sms, x.data_ptr())
        if need_cache is not None:
            need_cache[key] = need
    stream = torch.cuda.current_stream(dev).cuda_stream
    ws, counters = _cuda_workspace(dev, stream, need[:2])
    xg = torch.empty(max(need[2], 16), dtype=torch.uint8, device=dev)  # gathered x (caching allocator: no sync)
    out = torch.empty(M, args[5], dtype=x.dtype, device=dev)
    with torch.cuda.device(dev):
        _cuda.qgemm(args, x.data_ptr(), code, M, out.data_ptr(), ws.data_ptr(), ws.numel(), counters.data_ptr(),
                    counters.numel(), xg.data_ptr(), xg.numel(), sms, stream)
    return out


def cuda_qgemm_tensors(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, perm: Tensor, bits: int,
                       N: int) -> Tensor:
    """cuda_qgemm from a CudaLayout's tensors: the torch.compile custom op's path (kernels/ops.py), with the same
    checks as cuda_qgemm (x, devices, dtypes, shapes, alignment)."""
    if not cuda_available():
        raise RuntimeError(f"the CUDA kernels cannot run: {cuda_unavailable_reason()}")
    dev, Kp = scales.device, perm.numel()
    G = scales.shape[0] if scales.dim() == 4 else 0
    ok = (dev.type == "cuda" and bits in CUDA_WORDS and G > 0 and Kp % G == 0 and Kp % 128 == 0 and
          all(t.device == dev and t.is_contiguous() for t in (qweight, scales, zeros, perm)) and
          qweight.dtype == torch.int32 and scales.dtype in (torch.float16, torch.bfloat16) and
          zeros.dtype == torch.uint8 and perm.dtype == torch.int32 and
          list(qweight.shape) == [scales.shape[1], Kp // 128, 32 * CUDA_WORDS.get(bits, 0)] and
          list(scales.shape) == [G, qweight.shape[0], 8, 2] and
          list(zeros.shape) == [G, qweight.shape[0], 8, 2 if bits == 8 else 1] and
          (qweight.shape[0] - 1) * 16 < N <= qweight.shape[0] * 16 and qweight.data_ptr() % 16 == 0)
    if not ok:
        raise Error(f"inconsistent CUDA layout tensors: bits={bits}, N={N}, qweight {describe(qweight)}, scales "
                    f"{describe(scales)}, zeros {describe(zeros)}, perm {describe(perm)} (make_cuda_layout's)")
    _check_x(x, x.shape[1] if x.dim() == 2 else -1, dev)
    if x.shape[1] > Kp:
        raise Error(f"x has K={x.shape[1]} columns, the layout at most {Kp}")
    identity = IDENTITY_PERMS.get(perm.data_ptr()) is not None
    args = (qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), perm.data_ptr(), x.shape[1], N, Kp, G, Kp // G,
            bits, int(scales.dtype == torch.bfloat16), int(identity))
    return _cuda_qgemm_args(x, args, None)


def _cuda_dequantize_args(args: tuple, dtype: torch.dtype, dev: torch.device) -> Tensor:
    out = torch.empty(args[4], args[5], dtype=dtype, device=dev)
    with torch.cuda.device(dev):
        _cuda.dequantize(args, out.data_ptr(), DTYPE_CODES[dtype], torch.cuda.current_stream(dev).cuda_stream)
    return out


def cuda_dequantize(layout: CudaLayout, dtype: torch.dtype = torch.float16) -> Tensor:
    """The dequantized weight W^T [K, N] in checkpoint row order, float16/bfloat16/float32, on the layout's GPU
    (whole rows stored with 16-byte stores: the prefill path's input to torch.matmul)."""
    _cuda_check(layout)
    if dtype not in CUDA_DTYPES:
        raise Error(f"dtype must be float16, bfloat16 or float32, got {dtype}")
    return _cuda_dequantize_args(layout.args, dtype, layout.scales.device)
