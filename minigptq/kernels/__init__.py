"""The compiled GPTQ kernels (minigptq._cpu_kernels from cuda/cpu/, minigptq._cuda_kernels from cuda/gpu/) behind
thin checked wrappers, one concern per file:

    common.py       dtype codes, the fused kernels' row limit (FUSED_MAX_ROWS), the tensor check behind every wrapper
    layout.py       KernelLayout (the CPU kernels' form of a layer), make_layout (either device), int8 tiles, 3-bit
                    byte fields
    cuda_layout.py  CudaLayout (the CUDA kernels' interleaved form of a layer), make_cuda_layout
    cpu.py          the CPU module and its wrappers: qgemm (fp32 and int8 activations), dequantize, the GPTQ inner
                    loop, the decode-step operations (rms_norm, attn_decode, decode_block)
    cuda.py         the CUDA module and its wrappers: qgemm, dequantize, the K-split workspace
    ops.py          qgemm_op: the fused kernels as a torch custom op, for torch.compile
    reference.py    plain torch references used as the tests' oracles (int8_reference, cuda_layout_weight)

The public names are re-exported here, so `from minigptq import kernels; kernels.cpu_qgemm(x, layout)` works; the
compiled modules themselves are kernels.cpu._cpu and kernels.cuda._cuda (None where not built).
Every kernel has a plain torch reference: minigptq/pack.py:dequantize (+ matmul) for the matmuls, reference.py for
the int8 kernels, the torch loop of minigptq/gptq.py for the solver's inner loop, and the modules of
minigptq/transformer.py for the decode-step operations. QuantLinear (minigptq/qlinear.py) is their main caller;
minigptq/fast_decode.py calls the decode-step operations.
"""
from .common import CPU_DTYPES, CUDA_DTYPES, DTYPE_CODES, FUSED_MAX_ROWS
from .cpu import (CPU_IMPORT_ERROR, INT8_ISAS, ISAS, DecodeBlockPlan, cpu_attn_decode, cpu_available,
                  cpu_decode_block, cpu_dequantize, cpu_gptq_block, cpu_int8_available, cpu_isas, cpu_qgemm,
                  cpu_qgemm_int8, cpu_qgemm_ptrs, cpu_rms_norm)
from .cuda import CUDA_IMPORT_ERROR, cuda_available, cuda_dequantize, cuda_qgemm, cuda_unavailable_reason
from .cuda_layout import CUDA_KBLOCK, CUDA_WORDS, CudaLayout, make_cuda_layout
from .layout import (CHUNK_ROWS, CHUNK_ROWS_INT8, CPU_KERNELS, INT8_TINY, TILE_COLS, KernelLayout, from_tiles,
                     make_layout, pack_fields3, to_tiles, unpack_fields3)
from .ops import qgemm_op
from .reference import chunks_of, cuda_layout_weight, int8_reference

__all__ = [
    "CPU_DTYPES", "CUDA_DTYPES", "DTYPE_CODES", "FUSED_MAX_ROWS",
    "CPU_IMPORT_ERROR", "INT8_ISAS", "ISAS", "DecodeBlockPlan", "cpu_attn_decode", "cpu_available",
    "cpu_decode_block", "cpu_dequantize", "cpu_gptq_block", "cpu_int8_available", "cpu_isas", "cpu_qgemm",
    "cpu_qgemm_int8", "cpu_qgemm_ptrs", "cpu_rms_norm",
    "CUDA_IMPORT_ERROR", "cuda_available", "cuda_dequantize", "cuda_qgemm", "cuda_unavailable_reason",
    "CUDA_KBLOCK", "CUDA_WORDS", "CudaLayout", "make_cuda_layout",
    "CHUNK_ROWS", "CHUNK_ROWS_INT8", "CPU_KERNELS", "INT8_TINY", "TILE_COLS", "KernelLayout", "from_tiles",
    "make_layout", "pack_fields3", "to_tiles", "unpack_fields3",
    "qgemm_op",
    "chunks_of", "cuda_layout_weight", "int8_reference",
]
