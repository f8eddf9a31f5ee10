"""The uniform quantization grid GPTQ rounds onto, and round-to-nearest (RTN), the baseline it beats.

GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", arXiv:2210.17323) uses a standard asymmetric/symmetric min-max grid per output row (and per
group of `group_size` input columns). What this file holds:

- `QuantConfig`: every setting of the solver, validated on construction.
- `find_params`: one grid (scale, zero) per row from the row's min/max, optionally shrunk by an MSE search.
- `quantize` / `dequantize`: w -> integer code q -> scale * (q - zero).
- `QuantResult`: what both solvers return (defined here so `rtn` and `gptq` share it; `minigptq.gptq`
  re-exports it).
- `rtn`: quantize every weight to its nearest grid point, with the same grid and groups as GPTQ but no
  error feedback (the paper's RTN baseline).
- `proxy_loss`: the layer objective ||WX - QX||^2 written with the Hessian, so RTN and GPTQ report the
  same number.

Notation follows docs/gptq-format.md: N = out_features (rows of W), K = in_features, gs = group size,
G = ceil(K / gs) groups (G = 1 when gs = -1), maxq = 2^bits - 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import Error

VALID_BITS = (2, 3, 4, 8)

# MSE range search (reference implementation's defaults): try ranges shrunk to 100%, 99%, ..., 21% of the
# min/max range and keep, per row, the one with the smallest sum |w - Q(w)|^2.4.
MSE_GRID = 100
MSE_MAXSHRINK = 0.8
MSE_NORM = 2.4


@dataclass(frozen=True)
class QuantConfig:
    """Settings of one quantization run (names as in quantize_config.json where one exists)."""

    bits: int = 4  # bits per weight, one of VALID_BITS; codes lie in [0, 2^bits - 1]
    group_size: int = 128  # input columns per (scale, zero); -1 = one group per row; last group may be partial
    sym: bool = True  # symmetric grid with fixed zero = 2^(bits-1); False = asymmetric, zero from the row's min
    act_order: bool = False  # "desc_act": process columns by decreasing Hessian diagonal
    static_groups: bool = False  # compute every group's grid up front on the unpermuted W (g_idx = k // gs)
    percdamp: float = 0.01  # H[i, i] += percdamp * mean(diag H), in (0, 1]; raised x10 if Cholesky fails
    blocksize: int = 128  # B, columns per lazy batch update (paper, Step 2); does not change the result
    mse: bool = False  # shrink each grid by an MSE search (grid 100, maxshrink 0.8, norm 2.4)
    # GAR (GPTQModel's act_group_aware): act-order that keeps groups contiguous, so g_idx stays k // gs
    act_group_aware: bool = False
    gptaq_alpha: float = 0.25  # GPTAQ only: fraction of the asymmetric target shift applied (GPTQModel's default)

    def __post_init__(self) -> None:
        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not is_int(self.bits) or self.bits not in VALID_BITS:
            raise Error(f"bits={self.bits!r} is not supported; valid values are {VALID_BITS}")
        # < 2**31: group sizes are int32 in the packed layers' index math and in the loaders of the checkpoint
        if not is_int(self.group_size) or not (self.group_size == -1 or 0 < self.group_size < 2**31):
            raise Error(
                f"group_size={self.group_size!r} is invalid; use -1 (one group per output row over all "
                f"inputs) or a positive number of input columns per group below 2**31, e.g. 128"
            )
        for name in ("sym", "act_order", "static_groups", "mse", "act_group_aware"):
            if not isinstance(getattr(self, name), bool):
                raise Error(f"{name}={getattr(self, name)!r} must be a bool (True or False)")
        p = self.percdamp
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:  # also rejects NaN
            raise Error(f"percdamp={self.percdamp!r} must be a number in (0, 1], e.g. 0.01")
        if not is_int(self.blocksize) or self.blocksize < 1:
            raise Error(f"blocksize={self.blocksize!r} must be an integer >= 1, e.g. 128")
        if self.act_order and self.act_group_aware:
            raise Error("act_order=True and act_group_aware=True exclude each other: choose act-order (g_idx "
                        "permuted) or group-aware act-order (GAR, g_idx trivial)")
        a = self.gptaq_alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= 1:  # also rejects NaN
            raise Error(f"gptaq_alpha={a!r} must be a number in [0, 1], e.g. 0.25")

    def num_groups(self, in_features: int) -> int:
        """G = ceil(K / group_size), or 1 when group_size == -1."""
        if in_features < 1:
            raise Error(f"in_features={in_features} must be >= 1")
        return 1 if self.group_size == -1 else math.ceil(in_features / self.group_size)


# --------------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------------


def _grid(xmin: Tensor, xmax: Tensor, maxq: int, sym: bool) -> tuple[Tensor, Tensor]:
    """Scale and zero point that map [xmin, xmax] (per row, xmin <= 0 <= xmax, xmin < xmax) onto codes 0..maxq."""
    scale = (xmax - xmin) / maxq  # [R]
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)  # [R] = 2^(bits-1), the middle code
    else:
        # Zero is clamped to >= 1, not >= 0: the widely read "v1" checkpoint format stores zero - 1 in a
        # bits-wide unsigned field, so zero = 0 would be written as -1, wrap to maxq and corrupt the
        # neighbouring packed value. round(-xmin/scale) is 0 only for rows with (almost) no negative
        # values; for them the grid moves one step down and the very top of the range is clamped.
        zero = torch.round(-xmin / scale).clamp(1, maxq)  # [R]
    return scale, zero


def find_params(w: Tensor, bits: int, sym: bool, mse: bool = False) -> tuple[Tensor, Tensor]:
    """Per-row grid for w [R, C] -> (scale [R], zero [R]), in w's dtype.

    zero is integer-valued (stored as float so that the grid arithmetic stays in one dtype). The range always
    contains 0, so zero weights (and pruned / dead inputs) are represented exactly.
    """
    if w.dim() != 2:
        raise Error(f"find_params expects a 2-D tensor [rows, cols], got shape {tuple(w.shape)}")
    maxq = 2**bits - 1
    xmin = w.min(dim=1).values.clamp(max=0)  # [R]
    xmax = w.max(dim=1).values.clamp(min=0)  # [R]
    if sym:
        xmax = torch.maximum(-xmin, xmax)  # [R]
        xmin = -xmax  # [R]
    empty = (xmin == 0) & (xmax == 0)  # [R] all-zero rows: any grid is exact; [-1, 1] avoids scale = 0
    xmin = torch.where(empty, -1.0, xmin)  # [R]
    xmax = torch.where(empty, 1.0, xmax)  # [R]
    scale, zero = _grid(xmin, xmax, maxq, sym)  # [R], [R]
    if not mse:
        return scale, zero

    # Range search: p = 1 (the min/max grid itself) is tried first, so the result is never worse in this norm.
    best = torch.full_like(scale, math.inf)  # [R]
    for i in range(int(MSE_MAXSHRINK * MSE_GRID)):
        p = 1 - i / MSE_GRID
        s1, z1 = _grid(p * xmin, p * xmax, maxq, sym)  # [R], [R]
        q = quantize(w, s1[:, None], z1[:, None], maxq)  # [R, C]
        err = (dequantize(q, s1[:, None], z1[:, None]) - w).abs().pow(MSE_NORM).sum(dim=1)  # [R]
        better = err < best  # [R]
        best = torch.where(better, err, best)
        scale = torch.where(better, s1, scale)
        zero = torch.where(better, z1, zero)
    return scale, zero


def quantize(w: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """Integer codes q = clamp(round(w / scale) + zero, 0, maxq), returned as float (integer-valued) in w's dtype.

    scale and zero must broadcast against w: use scale[:, None] for per-row parameters of a [R, C] w.
    round() is round-half-to-even, as in torch and the reference implementation.
    """
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize(q: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """The grid value scale * (q - zero) of each code (broadcasting as in `quantize`)."""
    return scale * (q - zero)


# --------------------------------------------------------------------------------------------------
# Results and the RTN baseline
# --------------------------------------------------------------------------------------------------


@dataclass
class QuantResult:
    """One quantized linear layer. Columns are in the ORIGINAL input order (act-order already undone).

    Invariant (tested): weight == scales[g_idx].T * (qweight - zeros[g_idx].T), computed in float32.
    """

    qweight: Tensor  # int32 [N, K] integer codes in [0, 2^bits - 1]
    scales: Tensor  # float32 [G, N]
    zeros: Tensor  # int32 [G, N] raw zero points ("v2" meaning: W ~ scale * (q - zero)); asym zeros are >= 1
    g_idx: Tensor  # int32 [K] group of each input column (k // gs, or through the act-order permutation)
    loss: float  # 1/2 sum_n (W-Q)_n H' (W-Q)_n^T, see proxy_loss (GPTQ: the paper's sum of (w-q)^2/d^2/2)
    percdamp: float  # damping used in H' (GPTQ: after any Cholesky retries; RTN without H: 0.0)

    @property
    def weight(self) -> Tensor:
        """float32 [N, K] the dequantized weight, computed when asked (the driver never needs it)."""
        return dequantize_groups(self.qweight, self.scales, self.zeros, self.g_idx)


def dequantize_groups(qweight: Tensor, scales: Tensor, zeros: Tensor, g_idx: Tensor) -> Tensor:
    """Full float32 weight [N, K] from codes [N, K], scales [G, N], zeros [G, N] and g_idx [K]."""
    g = g_idx.long()  # [K]
    return dequantize(qweight.float(), scales.float()[g].T, zeros.float()[g].T)  # [N, K]


def proxy_loss(W: Tensor, Q: Tensor, H: Tensor, percdamp: float) -> float:
    """1/2 sum over rows of (W - Q) H' (W - Q)^T: the paper's objective ||WX - QX||^2 in the units of H.

    With H = 2/n X X^T (see gptq.Hessian) this is ||WX - QX||_F^2 / n plus the damping term. H' is H prepared
    exactly as gptq() prepares it (dead inputs get H[i, i] = 1, then H[i, i] += percdamp * mean(diag H)), and
    the error on dead inputs is ignored (those inputs are always zero, and gptq() sets their weights to 0).
    For GPTQ this equals the sum of the per-column losses (w - q)^2 / d^2 / 2 (see gptq.py), so the two
    solvers' numbers compare one to one.
    """
    D = (W.float() - Q.float()).clone()  # [N, K]
    H = H.to(device=D.device, dtype=torch.float32, copy=True)  # [K, K]
    dead = torch.diag(H) == 0  # [K]
    H[dead, dead] = 1
    H.diagonal().add_(percdamp * torch.diag(H).mean())
    D[:, dead] = 0
    return 0.5 * float(((D @ H) * D).sum())


@torch.no_grad()
def rtn(W: Tensor, cfg: QuantConfig, H: Tensor | None = None) -> QuantResult:
    """Round-to-nearest: each weight to its nearest grid point, same grid and groups as gptq(), no error feedback.

    Groups are contiguous (g_idx = k // gs); act_order and static_groups have no effect without a Hessian.
    H [K, K] is optional and only used to report `loss` on the same scale as gptq() (see proxy_loss);
    without it loss = 1/2 ||W - Q||_F^2 (H' = identity).
    """
    if W.dim() != 2:
        raise Error(f"W must be 2-D [out_features, in_features], got shape {tuple(W.shape)}")
    W = W.detach().to(torch.float32)  # [N, K]
    N, K = W.shape
    if not torch.isfinite(W).all():
        raise Error("W contains NaN or Inf; cannot quantize")
    maxq = 2**cfg.bits - 1
    gs = K if cfg.group_size == -1 else cfg.group_size
    G = cfg.num_groups(K)
    g_idx = torch.arange(K, device=W.device, dtype=torch.int32) // gs  # [K]
    scales = torch.empty(G, N, device=W.device)  # [G, N]
    zeros = torch.empty(G, N, device=W.device)  # [G, N]
    for g in range(G):
        scales[g], zeros[g] = find_params(W[:, g * gs : (g + 1) * gs], cfg.bits, cfg.sym, cfg.mse)
    s, z = scales[g_idx.long()].T, zeros[g_idx.long()].T  # [N, K], [N, K]
    qweight = quantize(W, s, z, maxq).to(torch.int32)  # [N, K]
    zeros = zeros.to(torch.int32)
    weight = dequantize_groups(qweight, scales, zeros, g_idx)  # [N, K]
    if H is None:
        loss, percdamp = 0.5 * float((W - weight).square().sum()), 0.0
    else:
        if H.shape != (K, K):
            raise Error(f"H has shape {tuple(H.shape)}, expected [{K}, {K}] for W of shape {tuple(W.shape)}")
        loss, percdamp = proxy_loss(W, weight, H, cfg.percdamp), cfg.percdamp
    return QuantResult(qweight, scales, zeros, g_idx, loss, percdamp)
