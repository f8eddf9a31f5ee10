"""The fused kernels as one torch custom op (minigptq::qgemm_tensors), so that a compiled decode step (generate(...,
compile=True)) is a single graph with the kernels inside it instead of being cut at every QuantLinear.

Eager calls skip it and go straight to the wrappers (minigptq/kernels/cpu.py, minigptq/kernels/cuda.py): the
dispatcher would add its overhead to each of the hundreds of calls a token makes. The KV cache's writes have their
own ops, beside the cache (minigptq/kv_cache.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .cpu import cpu_qgemm_ptrs
from .cuda import cuda_qgemm_tensors


# A changed signature takes a new name: torch's on-disk compile cache (/tmp/torchinductor_<user>) was seen to replay
# a graph compiled against the earlier signature under the same name (minigptq::qgemm, whose last argument was
# `int8: bool`), which then fails at its first call.
@torch.library.custom_op("minigptq::qgemm_tensors", mutates_args=())
def qgemm_op(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, row_group: Tensor, perm: Tensor | None,
             bits: int, N: int, cpu_kernel: str = "exact") -> Tensor:
    """y = x @ W for x [M, K] (checked by the caller) and a layout's tensors (N = layout.N), on x's device;
    cpu_kernel: the layout's ("int8": the int8-activation kernels and their tiled layout; "exact" otherwise)."""
    if x.device.type == "cuda":
        return cuda_qgemm_tensors(x, qweight, scales, zeros, perm, bits, N)
    ptrs = (qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), row_group.data_ptr(),
            0 if perm is None else perm.data_ptr())
    G = scales.shape[1] if cpu_kernel == "int8" else scales.shape[0]  # int8: tiled scales [T, G, 64]
    return cpu_qgemm_ptrs(x, ptrs, N, G, bits, torch.get_num_threads(), cpu_kernel=cpu_kernel)


@qgemm_op.register_fake
def _(x, qweight, scales, zeros, row_group, perm, bits, N, cpu_kernel="exact"):
    return x.new_empty(x.shape[0], N)
