"""Autograd through a frozen packed linear (QuantLinear) for LoRA fine-tuning over GPTQ weights (QLoRA-style).

    forward   y = x W^T + b         by the layer's own kernels, as at inference (no graph is kept of it)
    backward  grad_x = grad_y W     W [N, K] dequantized TILE rows of K at a time from the packed buffers

Nothing is saved for backward but the layer itself: grad_x needs only grad_y and the packed weights, so the graph
holds no fp32 copy of the weight (QuantLinear's differentiable reference path would keep each layer's whole
dequantized W until backward: a full-precision copy of the model). The weights get no gradient (frozen).
The tile's math is pack.dequantize's, on a slice of qweight rows: W^T[k, n] = scales[g, n] * (q[k, n] - zero[g, n]).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .pack import unpack_rows, zero_points
from .qlinear import QuantLinear

TILE = 256  # rows of K dequantized at once: 256 * N * 4 bytes (2.3 MiB for N = 2304); a multiple of 32 (3-bit unit)


def dequantized_tile(layer: QuantLinear, zeros: Tensor, k0: int, k1: int) -> Tensor:
    """W^T rows k0..k1 [k1 - k0, N] in float32 from the packed buffers; k0, k1 multiples of 32 (or k1 = K)."""
    bits = layer.bits
    q = unpack_rows(layer.qweight[k0 * bits // 32:k1 * bits // 32], bits, k1 - k0)  # (k1 - k0, N) codes
    g = layer.g_idx[k0:k1].long()  # (k1 - k0,)
    return layer.scales.float()[g] * (q - zeros[g]).float()  # (k1 - k0, N)


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
        zeros = zero_points(layer.qzeros, layer.bits, N, layer.checkpoint_format)  # (G, N)
        grad_x = torch.empty(g2.shape[0], K, dtype=torch.float32, device=g2.device)  # (M, K)
        for k0 in range(0, K, TILE):
            k1 = min(k0 + TILE, K)
            grad_x[:, k0:k1] = g2 @ dequantized_tile(layer, zeros, k0, k1).T  # (M, N) @ (N, k1 - k0)
        return grad_x.to(grad_y.dtype).view(*grad_y.shape[:-1], K), None


def packed_linear(x: Tensor, layer: QuantLinear) -> Tensor:
    """layer(x) with a gradient for x computed from the packed weights tile by tile (module docstring)."""
    return _PackedLinear.apply(x, layer)
