"""The CPU kernels (minigptq._cpu_kernels, built from cuda/cpu/) behind checked wrappers.

The compiled module knows nothing of torch: these wrappers check every tensor (dtype, shape, device, contiguity)
and pass raw pointers (tensor.data_ptr()), sizes and a thread count (torch.get_num_threads()). Each kernel has a
torch reference that is its test oracle and the fallback where the module is not built:
    cpu_qgemm, cpu_dequantize    minigptq/pack.py:dequantize (+ matmul)
    cpu_qgemm_int8               minigptq/kernels/reference.py:int8_reference (the same int8 arithmetic, exactly,
                                 for decode rows and the batched M > 16 kernel alike)
    cpu_gptq_block               the torch loop of minigptq/gptq.py (bit for bit)
    cpu_rms_norm, cpu_attn_decode, cpu_decode_block
                                 RMSNorm, Attention and Block in minigptq/transformer.py (minigptq/fast_decode.py
                                 calls these for fp32 decode steps)
Sources: cuda/cpu/qgemm.cpp (+ qgemm_x86.cpp, qgemm_simd.inc, qgemm_i8.inc, qgemm_i8b.inc), cuda/cpu/decode.cpp, cuda/cpu/gptq.cpp,
cuda/cpu/bindings.cpp.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import Error
from .common import CPU_DTYPES, DTYPE_CODES, FUSED_MAX_ROWS, describe
from .layout import KernelLayout

try:
    from .. import _cpu_kernels as _cpu
    CPU_IMPORT_ERROR: str | None = None
except ImportError as e:  # not built (pure-Python checkout) or built for another Python
    _cpu, CPU_IMPORT_ERROR = None, str(e)

ISAS = {"auto": 0, "scalar": 1, "avx2": 2, "avx512": 3, "avxvnni": 4, "avx512vnni": 5}
INT8_ISAS = ("avx512vnni", "avxvnni", "avx2")  # int8 kernels: VNNI, else AVX2 vpmaddubsw + vpmaddwd


def cpu_available() -> bool:
    """The compiled CPU module is built and imports (any x86-64 or other CPU: scalar code where no SIMD applies)."""
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
    if layout.cpu_kernel == "int8":
        raise Error("the layout was made for the int8 kernels' layout (make_layout(..., cpu_kernel=\"int8\")); "
                    "cpu_qgemm_int8 runs it")
    _check_x(x, layout)
    return cpu_qgemm_ptrs(x, layout.ptrs, layout.N, layout.G, layout.bits, threads, isa_code)


def _check_x(x: Tensor, layout: KernelLayout) -> None:
    M, K = x.shape if x.dim() == 2 else (0, -1)
    if M < 1 or K != layout.K or x.dtype not in CPU_DTYPES or not x.is_cpu or not x.is_contiguous():
        raise Error(f"x must be a float32 or bfloat16 contiguous CPU tensor [M, K={layout.K}] with M >= 1, "
                    f"got {describe(x)}")


def cpu_qgemm_ptrs(x: Tensor, ptrs: tuple[int, ...], N: int, G: int, bits: int, threads: int,
                   isa_code: int = 0, cpu_kernel: str = "exact", int8_layout: bool | None = None) -> Tensor:
    """The module call, unchecked (the hot path of QuantLinear, which checked x [M, K] and the layout once):
    ptrs = KernelLayout.ptrs (qweight, scales, zeros, row_group, perm); cpu_kernel: "int8" for the int8-activation
    kernels, "exact" for the fp32 ones. int8_layout: the layout is an int8 one (default: cpu_kernel == "int8"); the
    int8 kernels read the exact layout too when M > FUSED_MAX_ROWS (the batched kernel, cuda/cpu/qgemm_i8b.inc)."""
    M, K = x.shape
    out = torch.empty(M, N, dtype=x.dtype)
    args = (x.data_ptr(), DTYPE_CODES[x.dtype], M, *ptrs, K, N, G, bits, out.data_ptr(), threads, isa_code)
    if cpu_kernel == "int8":
        _cpu.qgemm_i8(*args, int(cpu_kernel == "int8" if int8_layout is None else int8_layout))
    else:
        _cpu.qgemm(*args)
    return out


def cpu_dequantize(layout: KernelLayout, dtype: torch.dtype = torch.float32, threads: int | None = None,
                   isa: str = "auto") -> Tensor:
    """The dequantized weight W^T [K, N] in checkpoint row order (= pack.dequantize), float32 or bfloat16."""
    threads, isa_code = _cpu_args(layout, threads, isa)
    if dtype not in CPU_DTYPES:
        raise Error(f"dtype must be float32 or bfloat16, got {dtype}")
    out = torch.empty(layout.K, layout.N, dtype=dtype)
    _cpu.dequantize(*layout.ptrs, layout.K, layout.N, layout.G, layout.bits, out.data_ptr(), DTYPE_CODES[dtype],
                    threads, isa_code, int(layout.cpu_kernel == "int8"))
    return out


def cpu_int8_available() -> bool:
    """The int8-activation kernels can run here: the module is built and the CPU has AVX-512 VNNI, AVX-VNNI or
    AVX2 (integer dot products by vpmaddubsw + vpmaddwd)."""
    return any(isa in INT8_ISAS for isa in cpu_isas())


def cpu_qgemm_int8(x: Tensor, layout: KernelLayout, threads: int | None = None, isa: str = "auto") -> Tensor:
    """y = x @ W with x quantized to int8 per chunk (<= CHUNK_ROWS_INT8 = 32 rows of one group, one fp32 scale
    each) and integer dot products: x float32/bfloat16 contiguous [M, K] -> [M, N] in x.dtype. Equals
    int8_reference exactly. M > FUSED_MAX_ROWS runs the batched kernel (cuda/cpu/qgemm_i8b.inc: each column tile
    unpacked to bytes once, a register-blocked micro-kernel over rows x columns).

    layout: made with cpu_kernel="int8"; for M > FUSED_MAX_ROWS the exact kernels' layout works too.
    isa: "auto" (AVX-512 VNNI, else AVX-VNNI, else AVX2), "avx512vnni", "avxvnni" or "avx2".
    """
    threads, isa_code = _cpu_args(layout, threads, isa)
    M = x.shape[0] if x.dim() == 2 else 0
    if layout.cpu_kernel != "int8" and M <= FUSED_MAX_ROWS:
        raise Error(f"the layout was made for the fp32 kernels, which the int8 kernels read only for M > "
                    f"{FUSED_MAX_ROWS} rows (got M={M}); make_layout(..., cpu_kernel=\"int8\") makes one for these")
    if isa_code not in (0,) + tuple(ISAS[i] for i in INT8_ISAS):
        raise Error(f"isa={isa!r}: the int8 kernels run on {', '.join(INT8_ISAS)} (or auto)")
    _check_x(x, layout)
    return cpu_qgemm_ptrs(x, layout.ptrs, layout.N, layout.G, layout.bits, threads, isa_code, cpu_kernel="int8",
                          int8_layout=layout.cpu_kernel == "int8")


# ------------------------------------------------------------------------------------------- the GPTQ solver
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
                    f"[b, N] contiguous; got {describe(W1)}, {describe(Hinv1)}, {describe(S)}, {describe(Z)}")
    if _cpu is None:
        raise RuntimeError(f"minigptq._cpu_kernels is not built ({CPU_IMPORT_ERROR}); pip install -e . builds it")
    codes, err = torch.empty_like(W1), torch.empty_like(W1)
    _cpu.gptq_block(W1.data_ptr(), N, b, Hinv1.data_ptr(), Hinv1.stride(0), S.data_ptr(), Z.data_ptr(), float(maxq),
                    codes.data_ptr(), err.data_ptr(), torch.get_num_threads())
    return codes, err


# ----------------------------------------------------------------------------- CPU decode-step operations
# One call each for what a decode step otherwise spends a dozen torch operators on (cuda/cpu/decode.cpp). Their
# references and fallbacks are RMSNorm, Attention and Block in minigptq/transformer.py; minigptq/fast_decode.py calls
# these only for fp32 tensors on the CPU outside torch.compile, after checking shapes; the wrappers check what would
# corrupt memory.
def cpu_rms_norm(x: Tensor, w: Tensor, eps: float) -> Tensor:
    """w * x / sqrt(mean(x^2, -1) + eps) for contiguous fp32 CPU x [..., D] and w [D]."""
    D = w.numel()
    if x.dtype != torch.float32 or w.dtype != torch.float32 or x.shape[-1] != D or not x.is_contiguous() \
            or not w.is_contiguous() or not x.is_cpu or not w.is_cpu or x.numel() == 0:
        raise Error(f"x must be contiguous float32 [..., {D}] on the CPU, w float32 [{D}], got "
                    f"{describe(x)}, {describe(w)}")
    out = torch.empty_like(x)
    _cpu.rms_norm(x.data_ptr(), w.data_ptr(), float(eps), x.numel() // D, D, out.data_ptr())
    return out


def cpu_attn_decode(q: Tensor, k: Tensor, v: Tensor, q_row: int, kv_row: int, head_stride: int,
                    cos: Tensor | None, sin: Tensor | None, k_cache: Tensor, v_cache: Tensor, layer: int,
                    mask: Tensor | None, H: int, slot: int) -> Tensor:
    """One new token per sequence (cuda/cpu/decode.h): RoPE on q/k, k/v written to the caches (layers, B, KVH, Smax,
    hd) at `slot`, attention over slots [0, slot] -> [B, 1, H*hd]. q/k/v are fp32 views into one or three
    contiguous tensors, addressed by row and head strides (in elements); cos/sin [B, 1, 1, hd] or None; mask:
    additive [B, 1 or H, 1, slot + 1] or None. All fp32 (the caches fp32, fp16 or bf16), contiguous, on the CPU
    (checked by the caller)."""
    L_, B, KVH, Smax, hd = k_cache.shape
    kv_type = _kv_type(k_cache, v_cache)
    if not 0 <= layer < L_ or not 0 <= slot < Smax or H % KVH or v_cache.shape != k_cache.shape or \
            (cos is not None and (cos.numel() != B * hd or sin.numel() != B * hd)) or \
            (mask is not None and (mask.shape[0] != B or mask.shape[-1] != slot + 1 or mask.shape[1] not in (1, H))):
        raise Error(f"attn_decode: layer={layer}, slot={slot}, H={H} do not fit the cache "
                    f"{list(k_cache.shape)} or the cos/mask shapes")
    out = torch.empty(B, 1, H * hd)
    step = B * KVH * Smax * hd * k_cache.element_size()  # bytes of one layer of the cache
    _cpu.attn_decode(q.data_ptr(), k.data_ptr(), v.data_ptr(), q_row, kv_row, head_stride,
                     0 if cos is None else cos.data_ptr(), 0 if sin is None else sin.data_ptr(),
                     k_cache.data_ptr() + layer * step, v_cache.data_ptr() + layer * step,
                     0 if mask is None else mask.data_ptr(), 0 if mask is None else mask.shape[1],
                     0 if mask is None else mask.shape[-1], out.data_ptr(), B, H, KVH, hd, Smax, slot,
                     torch.get_num_threads(), kv_type)
    return out


_KV_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # cuda/cpu/decode.h: KvType


def _kv_type(k_cache: Tensor, v_cache: Tensor) -> int:
    """The KvType code of a pair of contiguous CPU caches of one dtype (fp32, fp16 or bf16)."""
    if k_cache.dtype not in _KV_TYPES or v_cache.dtype != k_cache.dtype or not k_cache.is_contiguous() or \
            not v_cache.is_contiguous() or not k_cache.is_cpu or not v_cache.is_cpu:
        raise Error(f"the KV caches must be contiguous fp32, fp16 or bf16 CPU tensors of one dtype, got "
                    f"{describe(k_cache)}, {describe(v_cache)}")
    return _KV_TYPES[k_cache.dtype]


class DecodeBlockPlan:
    """One block's fixed pointers for cpu_decode_block, with the tensors they point into kept alive."""

    def __init__(self, block, cfg, layouts: list[KernelLayout], biases: list[Tensor | None]):
        self.parts = (block.attn.fused, block.mlp.fused, block.attn.o, block.mlp.down)
        self.keep = (layouts, biases, block.attn_norm.weight, block.mlp_norm.weight)
        self.handle = _cpu.block_plan(
            [(*L.ptrs, L.K, L.N, L.G, L.bits) for L in layouts], [0 if b is None else b.data_ptr() for b in biases],
            block.attn_norm.weight.data_ptr(), block.mlp_norm.weight.data_ptr(), float(block.attn_norm.eps),
            int(layouts[0].cpu_kernel == "int8"), cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
            cfg.intermediate_size)

    def current(self, block) -> bool:
        """The block still has the layers (and layouts) this plan points into."""
        a, m, o, d = self.parts
        return block.attn.fused is a and block.mlp.fused is m and block.attn.o is o and block.mlp.down is d \
            and o._layout is self.keep[0][1] and d._layout is self.keep[0][3]

    @classmethod
    def make(cls, block, cfg) -> "DecodeBlockPlan | None":
        """The plan, or None if this block cannot run as one call (see fast_decode.FastTransformer.decode_plans)."""
        if _cpu is None:
            return None
        attn, mlp = block.attn, block.mlp
        fq, fg, o, d = attn.fused, mlp.fused, attn.o, mlp.down
        if fq is None or fg is None or getattr(o, "_layout", None) is None or getattr(d, "_layout", None) is None:
            return None
        layouts = [fq.layout, o._layout, fg.layout, d._layout]
        if not all(L.on_cpu for L in layouts) or len({L.cpu_kernel for L in layouts}) != 1 or any(
                w.dtype != torch.float32 for w in (block.attn_norm.weight, block.mlp_norm.weight)):
            return None
        biases = [None if b is None else b.float().contiguous() for b in (fq.bias, o.bias, fg.bias, d.bias)]
        return cls(block, cfg, layouts, biases)


def cpu_decode_block(plan: DecodeBlockPlan, x: Tensor, cos: Tensor | None, sin: Tensor | None, k_cache: Tensor,
                     v_cache: Tensor, layer: int, mask: Tensor | None, slot: int) -> None:
    """Block `layer`'s decode step in place on x [B, 1, hidden] (fp32, contiguous, CPU; checked by the caller):
    cuda/cpu/decode.h: decode_block. Caches (layers, B, KVH, Smax, hd) fp32, fp16 or bf16; mask additive
    [B, 1|H, 1, slot+1]."""
    L_, B, KVH, Smax, hd = k_cache.shape
    kv_type = _kv_type(k_cache, v_cache)
    if not 0 <= layer < L_ or not 0 <= slot < Smax or x.shape[0] != B or \
            (mask is not None and (mask.shape[0] != B or mask.shape[-1] != slot + 1)):
        raise Error(f"decode_block: layer={layer}, slot={slot} or x {list(x.shape)} do not fit the cache "
                    f"{list(k_cache.shape)}")
    step = B * KVH * Smax * hd * k_cache.element_size()  # bytes of one layer of the cache
    _cpu.decode_block(plan.handle, x.data_ptr(), B, 0 if cos is None else cos.data_ptr(),
                      0 if sin is None else sin.data_ptr(), k_cache.data_ptr() + layer * step,
                      v_cache.data_ptr() + layer * step, 0 if mask is None else mask.data_ptr(),
                      0 if mask is None else mask.shape[1], 0 if mask is None else mask.shape[-1], Smax, slot,
                      torch.get_num_threads(), kv_type)
