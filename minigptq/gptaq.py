"""GPTAQ's statistics: asymmetric calibration (Li et al. 2025, "GPTQv2: Efficient Finetuning-Free
Quantization with Asymmetric Calibration", ICML 2025; GPTQModel's `gptaq`).

Plain GPTQ fits each quantized layer to its own inputs X (the activations of the partly quantized model):
min ||W X - Q X||^2. GPTAQ fits it to what the *full-precision* model computes there, W X~ with X~ the
full-precision model's inputs of the same layer: min ||Q X - W X~||^2, so each layer also undoes some of the error
the layers before it made. With H = 2/n X X^T (as in GPTQ, damped by lambda = percdamp * mean diag) and
D = 2/n (X~ - X) X^T (tokens as columns; accumulated here as sum (x~ - x)^T x over token rows x),

    ||Q X - W X~||^2 + lambda ||Q - W||^2 = (Q - W*) (H + lambda I) (Q - W*)^T + const,   W* = W + W D (H + lambda I)^-1

(expand both sides: W X~ X^T = W H + W D). So GPTAQ is exactly Algorithm 1 started from the least-squares target W*
instead of W, with the same damped H: that is how minigptq/gptq.py does it (one [N, K] x [K, K] product per linear,
D H^-1 computed once per group of linears sharing an input, from the same Cholesky factor). The GPTAQ paper and
GPTQModel reach a similar target through a strictly upper triangular correction P applied during the column loop;
both apply only a fraction alpha of it (GPTQModel's default 0.25, also ours: QuantConfig.gptaq_alpha), since the
full shift over-fits the calibration windows.

Extra memory (see docs/algorithm.md): per Hessian one more K x K fp32 matrix D (and D H^-1 while solving); in the
driver (minigptq/driver.py) a second set of block inputs, the full-precision model's (n windows x seqlen x hidden in
act_dtype), and a full-precision copy of the block being quantized.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import Error
from .gptq import Hessian, _no_tf32


class AsymHessian(Hessian):
    """H = 2/n sum x^T x (Hessian) plus D = 2/n sum (x_fp - x)^T x [K, K], both over the same n token rows."""

    def __init__(self, in_features: int, device: torch.device | str) -> None:
        super().__init__(in_features, device)
        self.D = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)  # [K, K]

    @torch.no_grad()
    def add_pair(self, x: Tensor, x_fp: Tensor) -> None:
        """Accumulate a layer's input x [..., K] in the quantized model and x_fp [..., K] in the full-precision one."""
        K = self.D.shape[0]
        if x.shape != x_fp.shape or x.shape[-1] != K:
            raise Error(f"GPTAQ needs the two models' inputs of one shape [..., {K}]; got {tuple(x.shape)} and "
                        f"{tuple(x_fp.shape)}")
        x = x.detach().reshape(-1, K).to(device=self.D.device, dtype=torch.float32)  # [b, K]
        dx = x_fp.detach().reshape(-1, K).to(device=self.D.device, dtype=torch.float32) - x  # [b, K]
        b = x.shape[0]
        if b == 0:
            return
        self.D *= self.n / (self.n + b)  # rescale the old mean to the new count (as Hessian.add does for H)
        self.add(x)  # H, and self.n += b
        s = 2 / self.n
        with _no_tf32():
            self.D.addmm_(dx.T, x, alpha=s)  # D += 2/n dx^T x  [K, K]
