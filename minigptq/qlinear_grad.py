"""Autograd through a frozen packed linear (QuantLinear) for LoRA fine-tuning over GPTQ weights (QLoRA-style).

    forward   y = x W^T + b         by the layer's own kernels, as at inference (no graph is kept of it)
    backward  grad_x = grad_y W     W dequantized again, for this one layer only, while its backward runs

Nothing is saved for backward but the layer itself: grad_x needs only grad_y and the packed weights, so the graph
holds no fp32 copy of the weight (QuantLinear's differentiable reference path would keep each layer's whole
dequantized W until backward: a full-precision copy of the model). The weights get no gradient (frozen).
Where the layer has a compiled kernel (its layout), W^T [K, N] comes from that kernel's dequantize in one call, as
the forward pass at more than FUSED_MAX_ROWS rows does too: one layer's fp32 weight alive at a time (46 MiB for a
5632 x 2048 MLP projection), freed when its backward returns. Without one, torch dequantizes TILE rows of K at a
time from the packed buffers (the oracle: pack.dequantize's math on a slice of qweight rows,
W^T[k, n] = scales[g, n] * (q[k, n] - zero[g, n])), about 20x slower on the CPU.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import kernels
from .pack import unpack_rows, zero_points
from .qlinear import QuantLinear, kernel_path

TILE = 256  # rows of K dequantized at once: 256 * N * 4 bytes (2.3 MiB for N = 2304); a multiple of 32 (3-bit unit)


def dequantized_tile(layer: QuantLinear, zeros: Tensor, k0: int, k1: int) -> Tensor:
    """W^T rows k0..k1 [k1 - k0, N] in float32 from the packed buffers; k0, k1 multiples of 32 (or k1 = K)."""
    bits = layer.bits
    q = unpack_rows(layer.qweight[k0 * bits // 32:k1 * bits // 32], bits, k1 - k0)  # (k1 - k0, N) codes
    g = layer.g_idx[k0:k1].long()  # (k1 - k0,)
    return layer.scales.float()[g] * (q - zeros[g]).float()  # (k1 - k0, N)


def compiled_dequantized(layer: QuantLinear, like: Tensor) -> Tensor | None:
    """W^T [K, N] in float32 by the layer's compiled dequantize kernel, or None where qlinear.kernel_path finds no
    kernel for a tensor like `like` (same device) and this layer's layout."""
    L = layer._layout
    if L is None or kernel_path(like, L) == "reference":
        return None
    return kernels.cpu_dequantize(L, torch.float32) if like.is_cpu else kernels.cuda_dequantize(L, torch.float32)


class _PackedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, layer: QuantLinear) -> Tensor:
        ctx.layer = layer
        with torch.no_grad():
            return layer(x.detach())  # the inference kernels (x no longer requires grad)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        layer = ctx.layer
        K, N = layer.in_features, layer.out_features
        g2 = grad_y.reshape(-1, N).float()  # (M, N)
        Wt = compiled_dequantized(layer, g2)  # (K, N) or None
        if Wt is not None:
            return (g2 @ Wt.T).to(grad_y.dtype).view(*grad_y.shape[:-1], K), None
        zeros = zero_points(layer.qzeros, layer.bits, N, layer.checkpoint_format)  # (G, N)
        grad_x = torch.empty(g2.shape[0], K, dtype=torch.float32, device=g2.device)  # (M, K)
        for k0 in range(0, K, TILE):
            k1 = min(k0 + TILE, K)
            grad_x[:, k0:k1] = g2 @ dequantized_tile(layer, zeros, k0, k1).T  # (M, N) @ (N, k1 - k0)
        return grad_x.to(grad_y.dtype).view(*grad_y.shape[:-1], K), None


def packed_linear(x: Tensor, layer: QuantLinear) -> Tensor:
    """layer(x) with a gradient for x computed from the packed weights tile by tile (module docstring)."""
    return _PackedLinear.apply(x, layer)
