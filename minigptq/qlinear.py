"""QuantLinear: an inference-only linear layer stored in the GPTQ checkpoint format (minigptq/pack.py).

Its buffers are exactly the checkpoint tensors (qweight, qzeros, scales, g_idx, bias), so state_dict() is what
goes to disk. post_load() builds, once, the layout the compiled kernels read (minigptq/kernels/layout.py:make_layout:
rows sorted by group for act-order, fp32 scales, unpacked int16 zeros); it is a plain attribute, not a buffer,
so loaders that enumerate buffers and state_dict() never see it. forward() picks the fastest path for the input:

    CPU,  int8 layout    `cpu_kernel` "int8" and a CPU with AVX-512 VNNI / AVX-VNNI / AVX2: int8 activations and
                         integer dot products; M <= 16 rows the fused kernel, M > 16 the batched one (each column
                         tile unpacked once, kernels/cpu.py:cpu_qgemm_int8); OpenMP threads = torch.get_num_threads()
    CPU,  M <= 16        (exact) fused C++ kernel in fp32 (AVX-512 / AVX2)
    CPU,  M > 16         (exact) C++ dequantize to fp32/bf16, then torch.matmul
    CUDA, M <= 16        fused CUDA kernel on the current stream
    CUDA, M > 16         CUDA dequantize to x.dtype, then torch.matmul
    otherwise            torch reference: pack.dequantize, then matmul (warns once that it is the slow path)
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn

from . import Error
from . import kernels
from .pack import can_pack, dequantize, pack_cols, pack_rows

_warned: set[str] = set()  # device types for which the slow-path warning was given


def _warn_once(device_type: str, reason: str) -> None:
    if device_type not in _warned:
        _warned.add(device_type)
        warnings.warn(f"minigptq: no compiled {device_type} kernel ({reason}); QuantLinear uses the torch reference "
                      f"(dequantize + matmul), which is much slower", RuntimeWarning, stacklevel=3)


class QuantLinear(nn.Module):
    """y = x @ W^T + b with W [N, K] stored as `bits`-bit GPTQ codes; K = in_features, N = out_features."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool,
                 dtype: torch.dtype = torch.float16, device: torch.device | str | None = None) -> None:
        super().__init__()
        reason = can_pack(in_features, out_features, bits)
        if reason is not None:
            raise Error(f"QuantLinear({in_features}, {out_features}): {reason}")
        if not isinstance(group_size, int) or not (group_size == -1 or group_size > 0):
            raise Error(f"group_size={group_size!r} must be -1 (one group) or a positive integer")
        K, N = in_features, out_features
        G = 1 if group_size == -1 else math.ceil(K / group_size)
        self.in_features, self.out_features, self.bits, self.group_size = K, N, bits, group_size
        self.checkpoint_format = "gptq"  # how qzeros is read: "gptq" (v1, stores zero - 1) or "gptq_v2" (raw zero)
        self.cpu_kernel = "exact"  # "int8": on the CPU, the int8-activation (VNNI) kernels where the CPU has them
        self._fused = False  # a part of a FusedQuantLinear: its own layout is built only if it is called alone
        self.register_buffer("qweight", torch.zeros(K * bits // 32, N, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(G, N * bits // 32, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(G, N, dtype=dtype, device=device))
        g_idx = torch.arange(K, dtype=torch.int32, device=device) // (K if group_size == -1 else group_size)
        self.register_buffer("g_idx", g_idx)
        self.register_buffer("bias", torch.zeros(N, dtype=dtype, device=device) if bias else None)
        self._layout: kernels.KernelLayout | None = None  # built by post_load()
        self.register_load_state_dict_post_hook(QuantLinear._after_load_state_dict)

    @classmethod
    def from_codes(cls, codes: Tensor, scales: Tensor, zeros: Tensor, g_idx: Tensor, bias: Tensor | None,
                   bits: int, group_size: int, dtype: torch.dtype = torch.float16,
                   cpu_kernel: str = "exact") -> "QuantLinear":
        """Pack a solver result: codes int [N, K], scales [G, N], zeros int [G, N] (raw, W = s * (q - z)), g_idx [K].

        qzeros are stored in the v1 form zero - 1 (checkpoint_format "gptq"), so every zero must be >= 1.
        """
        N, K = codes.shape
        mod = cls(K, N, bits, group_size, bias is not None, dtype=dtype, device=codes.device)
        mod.cpu_kernel = cpu_kernel
        G = mod.scales.shape[0]
        for name, t, shape in (("scales", scales, [G, N]), ("zeros", zeros, [G, N]), ("g_idx", g_idx, [K])):
            if list(t.shape) != shape:
                raise Error(f"{name} must have shape {shape} for codes [N={N}, K={K}] and group_size="
                                 f"{group_size}, got {list(t.shape)}")
        zeros = zeros.round().to(torch.int64) if zeros.is_floating_point() else zeros.to(torch.int64)
        if zeros.numel() and (int(zeros.min()) < 1 or int(zeros.max()) > 2**bits - 1):
            raise Error(f"zero points must lie in [1, {2**bits - 1}] to be stored in the v1 'gptq' format "
                             f"(zero - 1 in {bits} bits), got [{int(zeros.min())}, {int(zeros.max())}]; clamp them")
        mod.qweight = pack_rows(codes.T, bits)  # (K*bits/32, N)
        mod.qzeros = pack_cols(zeros - 1, bits)  # (G, N*bits/32)
        mod.scales = scales.to(dtype).contiguous()
        mod.g_idx = g_idx.to(torch.int32).contiguous()
        if bias is not None:
            mod.bias = bias.to(dtype).contiguous()
        mod.post_load()
        return mod

    def post_load(self) -> None:
        """Check the loaded buffers against each other and build the kernel layout (call once after loading)."""
        K, N, bits = self.in_features, self.out_features, self.bits
        G = self.scales.shape[0] if self.scales.dim() == 2 else -1
        expect = {"qweight": (torch.int32, [K * bits // 32, N]), "qzeros": (torch.int32, [G, N * bits // 32]),
                  "scales": (None, [G, N]), "g_idx": (None, [K])}
        if self.bias is not None:
            expect["bias"] = (None, [N])
        for name, (dtype, shape) in expect.items():
            t = getattr(self, name)
            if list(t.shape) != shape or (dtype is not None and t.dtype != dtype) or t.device != self.qweight.device:
                raise Error(f"{name} must be {'' if dtype is None else str(dtype) + ' '}{shape} on "
                                 f"{self.qweight.device} for in_features={K}, out_features={N}, bits={bits}, "
                                 f"{G} groups; got {t.dtype} {list(t.shape)} on {t.device}")
        if not self.scales.is_floating_point() or self.g_idx.is_floating_point():
            raise Error(f"scales must be floating point and g_idx integer, got {self.scales.dtype}, "
                             f"{self.g_idx.dtype}")
        if self.qweight.device.type == "meta":
            raise Error("post_load() needs the loaded tensors; the buffers are still on the meta device")
        if G < 1 or int(self.g_idx.min()) < 0 or int(self.g_idx.max()) >= G:
            raise Error(f"g_idx values must lie in [0, {G}) (the number of scale groups), got "
                             f"[{int(self.g_idx.min())}, {int(self.g_idx.max())}]")
        # The kernels compute W = scale * (q - zero) in fp32 with |q - zero| <= 2^bits: a finite but huge scale
        # (3e38) would make W Inf, the outputs NaN, and a NaN query is silently zeroed by CPU attention.
        limit = torch.finfo(torch.float32).max / 2**bits
        top = float(self.scales.detach().abs().max()) if self.scales.numel() else 0.0
        if not top <= limit:
            raise Error(f"scales hold a value of magnitude {top:.3g}: the dequantized weights scale * (q - zero) "
                        f"would overflow float32; valid: |scale| <= {limit:.3g} (real ones are far smaller)")
        self._layout = kernels.make_layout(self.qweight, self.qzeros, self.scales, self.g_idx, bits,
                                           self.checkpoint_format, cpu_kernel=_runnable(self.cpu_kernel))

    @staticmethod
    def _after_load_state_dict(module: "QuantLinear", incompatible_keys) -> None:
        if module._layout is not None:  # new buffers under an existing layout: rebuild it so it cannot go stale
            module.post_load()

    def _apply(self, fn, recurse=True):  # .to(device) / .half() / ...: rebuild the layout from the moved buffers
        super()._apply(fn, recurse)
        if self._layout is not None:
            if self.qweight.device.type == "meta":
                self._layout = None
            else:
                self.post_load()
        return self

    def path_for(self, x: Tensor) -> str:
        """Which implementation forward(x) uses: cpu-int8, cpu-fused, cpu-dequant, cuda-fused, cuda-dequant or
        reference.

        The kernels are inference-only: an x that requires grad (with grad mode on) takes the differentiable reference.
        """
        return kernel_path(x, self._layout)

    def forward(self, x: Tensor) -> Tensor:
        L = self._layout
        if L is None:
            if not self._fused:
                raise RuntimeError("QuantLinear.post_load() must be called after its state is loaded")
            self.post_load()  # a part of a fused projection, called on its own: build its layout now
            L = self._layout
        K, N = self.in_features, self.out_features
        if x.shape[-1] != K or not x.is_floating_point() or x.is_cpu != L.on_cpu or \
                (not L.on_cpu and x.device != L.scales.device):
            raise Error(f"x must be a floating tensor [..., {K}] on {L.scales.device}, got {x.dtype} "
                             f"{list(x.shape)} on {x.device}")
        x2 = x.reshape(-1, K)  # (M, K)
        path = kernel_path(x2, L)
        if path != "reference":
            y = kernel_matmul(x2, L, path)
        else:
            if not x.requires_grad:
                reason = kernels.CPU_IMPORT_ERROR if x.device.type == "cpu" else kernels.cuda_unavailable_reason()
                _warn_once(x.device.type, reason or f"no kernel for {x.device.type}")
            half = x.device.type == "cuda" and x2.dtype in (torch.float16, torch.bfloat16)
            W = dequantize(self.qweight, self.qzeros, self.scales.float(), self.g_idx, self.bits, self.checkpoint_format)
            y = x2.to(x2.dtype if half else torch.float32) @ W.to(x2.dtype if half else torch.float32)  # (M, N)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        bias = self._buffers["bias"]  # direct: nn.Module.__getattr__ is slow on the hot path
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.view(*x.shape[:-1], N)

    def dequantized_weight(self) -> Tensor:
        """W [N, K] in float32, from the checkpoint buffers via the torch reference."""
        W = dequantize(self.qweight, self.qzeros, self.scales.float(), self.g_idx, self.bits, self.checkpoint_format)
        return W.T.contiguous()  # (K, N) -> (N, K)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, format={self.checkpoint_format}"
                f"{', cpu_kernel=int8' if self.cpu_kernel == 'int8' else ''}")


def _runnable(cpu_kernel: str) -> str:
    """A layer's cpu_kernel setting -> the kernels its layout is built for: "int8" only where they can run here."""
    if cpu_kernel not in kernels.CPU_KERNELS:
        raise Error(f"cpu_kernel={cpu_kernel!r} is not one of {', '.join(kernels.CPU_KERNELS)}")
    return "int8" if cpu_kernel == "int8" and kernels.cpu_int8_available() else "exact"


def kernel_path(x: Tensor, L: kernels.KernelLayout | None) -> str:
    """The implementation for x [..., K] and layout L: cpu-int8, cpu-fused, cpu-dequant, cuda-fused, cuda-dequant or
    reference (no kernel here, or x requires grad)."""
    if x.requires_grad and torch.is_grad_enabled():
        return "reference"
    rows = x.numel() // max(x.shape[-1], 1)
    size = "fused" if rows <= (kernels.FUSED_MAX_ROWS, kernels.cuda.CUDA_FUSED_MAX_ROWS)[x.is_cuda] else "dequant"
    if x.device.type == "cpu" and kernels.cpu_available():
        return "cpu-int8" if L is not None and L.cpu_kernel == "int8" else f"cpu-{size}"  # int8: any M
    if x.device.type == "cuda" and kernels.cuda_available():
        return f"cuda-{size}"
    return "reference"


def kernel_matmul(x2: Tensor, L: kernels.KernelLayout, path: str) -> Tensor:
    """x2 [M, K] @ W by the compiled kernel `path` (kernel_path) -> [M, N], no bias; x2 already checked."""
    if path.startswith("cpu"):
        xc = (x2 if x2.dtype in kernels.CPU_DTYPES else x2.float()).contiguous()
        if path == "cpu-dequant":
            return xc @ kernels.cpu_dequantize(L, xc.dtype)
        if torch.compiler.is_compiling():  # traced by torch.compile: the kernel as a custom op in the graph
            return kernels.qgemm_op(xc, L.qweight, L.scales, L.zeros, L.row_group, L.perm, L.bits, L.N, L.cpu_kernel)
        return kernels.cpu_qgemm_ptrs(xc, L.ptrs, L.N, L.G, L.bits, torch.get_num_threads(), cpu_kernel=L.cpu_kernel)
    xc = (x2 if x2.dtype in kernels.CUDA_DTYPES else x2.float()).contiguous()
    if path == "cuda-dequant":
        return xc @ kernels.cuda_dequantize(L, xc.dtype)
    if torch.compiler.is_compiling():
        return kernels.qgemm_op(xc, L.qweight, L.scales, L.zeros, L.row_group, L.perm, L.bits, L.N)
    return kernels.cuda_qgemm(xc, L)


class FusedQuantLinear:
    """Linears that read the same input (q/k/v, gate/up) as one kernel call: y = [part_0(x), part_1(x), ...].

    Built at load time (`fuse`) from the parts' checkpoint tensors concatenated along the outputs, so it holds only a
    kernel layout and the concatenated bias; the parts keep their checkpoint tensors (state_dict is unchanged) and
    drop their own layouts. A plain object, not a module: it owns no checkpoint tensor. The output equals the
    parts' outputs concatenated, bit for bit (same chunks, same activation quantization).
    """

    def __init__(self, parts: list[QuantLinear]):
        a = parts[0]
        self.parts, self.in_features = parts, a.in_features
        self.splits = [p.out_features for p in parts]
        cat = [torch.cat([getattr(p, name) for p in parts], dim=1) for name in ("qweight", "qzeros", "scales")]
        self.layout = kernels.make_layout(*cat[:2], cat[2], a.g_idx, a.bits, a.checkpoint_format,
                                          cpu_kernel=_runnable(a.cpu_kernel))
        self.bias = None if a.bias is None else torch.cat([p.bias for p in parts])
        for p in parts:
            p._layout, p._fused = None, True

    @staticmethod
    def compatible(parts: list) -> bool:
        a = parts[0]
        return all(isinstance(p, QuantLinear) and p._layout is not None and p.bits == a.bits
                   and p.group_size == a.group_size and p.in_features == a.in_features
                   and p.checkpoint_format == a.checkpoint_format and p.cpu_kernel == a.cpu_kernel
                   and (p.bias is None) == (a.bias is None) and p.qweight.device == a.qweight.device
                   and p.scales.dtype == a.scales.dtype and torch.equal(p.g_idx, a.g_idx) for p in parts)

    def __call__(self, x: Tensor) -> Tensor:
        L = self.layout
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        path = kernel_path(x2, L)
        if path == "reference" or x.device != L.scales.device:  # no kernel here, or moved: the parts one by one
            return torch.cat([p(x) for p in self.parts], dim=-1)
        y = kernel_matmul(x2, L, path)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])
