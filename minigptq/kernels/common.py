"""What every kernel wrapper shares: the dtype codes the compiled modules read, the fused kernels' row limit, and the
tensor check whose error names the constraint and the offending tensor (dtype, shape, contiguity, device).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import Error

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # cuda/qweight.h: DType
CPU_DTYPES = (torch.float32, torch.bfloat16)  # activations the CPU kernels take
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # activations the CUDA kernels take
FUSED_MAX_ROWS = 16  # up to this many rows of x the fused kernels run; above, dequantize + torch.matmul


def describe(t: Tensor) -> str:
    """"float32 non-contiguous [4, 8] on cpu": what an error message says of a tensor it refuses."""
    return f"{str(t.dtype).removeprefix('torch.')}{'' if t.is_contiguous() else ' non-contiguous'} " \
           f"{list(t.shape)} on {t.device}"


def check(t: Tensor, name: str, dtype: torch.dtype, shape: list[int], what: str, device: torch.device) -> None:
    """Raise Error unless t is a contiguous `dtype` tensor of `shape` (spelled `what`, e.g. "[G, N]") on device."""
    if t.dtype != dtype or list(t.shape) != shape or not t.is_contiguous() or t.device != device:
        raise Error(f"{name} must be {str(dtype).removeprefix('torch.')} contiguous {what}={shape} on {device}, "
                    f"got {describe(t)}")
