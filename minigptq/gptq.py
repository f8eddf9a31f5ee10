"""The GPTQ solver (Frantar et al. 2022, arXiv:2210.17323, Algorithm 1) and the Hessian it needs.

For one linear layer with weight W [N, K] and calibration inputs X, GPTQ looks for quantized Q minimizing
||WX - QX||^2. Its Hessian is H = 2 X X^T [K, K]. It quantizes the columns of W one at a time, and after each
one spreads the rounding error over the columns not yet quantized (the OBS update), using rows of the upper
Cholesky factor of H^-1. Lazy batching applies that update to far-away columns only once per block of B columns.

`gptq(W, H, cfg)` is a pure function: it knows nothing of modules and changes neither W nor H.
The grid (scale / zero per row and group) comes from minigptq.quantizer. The checkpoint layout of the result
is in docs/gptq-format.md.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from . import Error, kernels
from minigptq.quantizer import QuantConfig, QuantResult, dequantize, find_params, quantize

__all__ = ["Hessian", "QuantResult", "group_aware_order", "gptq"]

PLAIN_LOOP = False  # True: always the torch loop below (the C++ one's oracle in the tests)


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    """Full fp32 matmuls: TF32's 10-bit mantissa visibly hurts H and the lazy updates (reference sets this too)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


class Hessian:
    """Running H = 2/n * sum over tokens of x x^T [K, K] in fp32; n = tokens seen.

    The 2/n scale does not change the solution; it keeps H's magnitude independent of the amount of data.
    H is symmetric, so for wide inputs only its upper triangle is accumulated, in bands of `band` rows (a little
    over half the multiply-adds: on SmolLM2's MLP inputs the Hessians cost as much as the block's forward pass);
    reading .H mirrors it into the lower triangle.
    """

    band = 256

    def __init__(self, in_features: int, device: torch.device | str) -> None:
        self._H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)  # [K, K]
        self._mirrored = True
        self.n = 0

    @property
    def H(self) -> Tensor:
        """The full symmetric [K, K] matrix (the lower triangle filled from the upper one, in place)."""
        if not self._mirrored:
            K, b = self._H.shape[0], self.band
            for i0 in range(0, K, b):
                i1 = min(K, i0 + b)
                lower = self._H[i1:, i0:i1]  # below the diagonal band: the transpose of what lies right of it
                lower.copy_(self._H[i0:i1, i1:].T)
                diag = self._H[i0:i1, i0:i1]
                diag.copy_(diag.triu() + diag.triu(1).T)
            self._mirrored = True
        return self._H

    @torch.no_grad()
    def add(self, x: Tensor) -> None:
        """Accumulate activations x [..., K] (any leading dims, any float dtype)."""
        K = self._H.shape[0]
        if x.shape[-1] != K:
            raise Error(f"activations have {x.shape[-1]} features in the last dim, expected in_features={K}")
        x = x.detach().reshape(-1, K).to(device=self._H.device, dtype=torch.float32)  # [b, K], b = tokens
        b = x.shape[0]
        if b == 0:
            return
        self._H *= self.n / (self.n + b)  # rescale the old mean to the new count
        self.n += b
        x = math.sqrt(2 / self.n) * x  # [b, K]
        with _no_tf32():
            if K <= 2 * self.band:
                self._H.addmm_(x.T, x)  # H += x^T x  [K, K]
            else:
                for i0 in range(0, K, self.band):  # H[band, band:] += x[:, band]^T x[:, band:]  (upper triangle)
                    i1 = min(K, i0 + self.band)
                    self._H[i0:i1, i0:].addmm_(x[:, i0:i1].T, x[:, i0:])
                self._mirrored = False


def group_aware_order(diag: Tensor, gs: int) -> Tensor:
    """GAR's processing order [K] from the Hessian diagonal diag [K] (GPTQModel's act_group_aware, after Gafni et
    al. 2025, arXiv:2505.14638): act-order restricted to moves that keep each group of gs columns contiguous.

    Paper's Algorithm 1 with act-order processes columns by decreasing H[i, i]; each group's grid is then found on
    columns scattered over the matrix, so the checkpoint needs a permuted g_idx (desc_act), which vLLM's fast path
    refuses. GAR orders *whole groups* by their largest H[i, i] (descending, stable) and, inside each group, the
    columns by decreasing H[i, i]. Group j of the processing order is then exactly the columns of one original group,
    so its grid covers the same weights as without reordering and g_idx stays k // gs. A last partial group (K not a
    multiple of gs) stays last, its columns sorted the same way. gs >= K: one group, i.e. plain act-order.
    """
    K = diag.numel()
    full = K // gs * gs
    local = torch.sort(diag[:full].view(-1, gs), dim=1, descending=True, stable=True)  # [G, gs] within each group
    order = torch.sort(local.values[:, 0], descending=True, stable=True).indices  # [G] groups by their max
    base = torch.arange(0, full, gs, device=diag.device)[:, None]  # [G, 1] first column of each group
    tail = full + torch.sort(diag[full:], descending=True, stable=True).indices  # [K - full]
    return torch.cat([(local.indices + base)[order].reshape(-1), tail])  # [K]


def _asymmetric_shift(D: Tensor, perm: Tensor, Hinv: Tensor) -> Tensor:
    """GPTAQ's D H^-1 [K, K] in processing order, from D [K, K] (original order) and Hinv = U [K, K], the upper
    Cholesky factor of the damped H^-1 in processing order (H^-1 = U^T U). See minigptq/gptaq.py for why."""
    D = D.to(device=Hinv.device, dtype=Hinv.dtype)[perm][:, perm]  # [K, K] processing order
    return (D @ Hinv.T) @ Hinv  # [K, K] D H^-1


def _upper_cholesky_of_inverse(H: Tensor, percdamp: float, log: Callable[[str], None]) -> tuple[Tensor, float]:
    """Dampen H and return (upper Cholesky factor of H^-1, percdamp used). Retries with 10x damping (at least 1e-6) up to 1.0.

    H is damped in place (its diagonal is restored before a retry) and must not be used afterwards. Memory: at most
    two K x K matrices besides H at any time (the factor and the inverse), each freed as soon as the next exists.
    """
    diag = torch.diag(H).clone()  # [K]
    mean_diag = diag.mean()
    while True:
        H.diagonal().copy_(diag + percdamp * mean_diag)  # H[i, i] += percdamp * mean(diag H)   (paper, Step 3)
        L, info = torch.linalg.cholesky_ex(H)  # H = L L^T
        if info.item() == 0:
            # H^-1 from L, then its upper factor U (H^-1 = U^T U): row i of U, divided by U[i, i], is the OBS
            # update for column i given all later columns -- Algorithm 1's Hinv.
            Hinv = torch.cholesky_inverse(L)  # [K, K]
            del L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)  # [K, K]
            del Hinv
            if info.item() == 0 and torch.isfinite(U).all():
                return U, percdamp
        if percdamp >= 1.0:
            raise Error(
                "Hessian not positive definite even at percdamp=1.0; the calibration activations may contain "
                "NaN/Inf, or H was not built as a sum of x x^T"
            )
        # At least 1e-6: below ~1e-7 of the mean diagonal the damping is lost in float32 rounding, so retries there
        # would only repeat the failure (from --percdamp 5e-324: 300 Cholesky factorizations per layer). Seven
        # retries at most.
        new = min(max(percdamp * 10, 1e-6), 1.0)
        log(f"gptq: Cholesky failed with percdamp={percdamp:g}; retrying with percdamp={new:g}")
        percdamp = new


@torch.no_grad()
@_no_tf32()
def gptq(W: Tensor, H: Tensor, cfg: QuantConfig, log: Callable[[str], None] = print,
         consume_h: bool = False, shared: dict | None = None, dXXT: Tensor | None = None) -> QuantResult:
    """Quantize W [N, K] given its Hessian H [K, K]. Returns codes, grids and the dequantized W.

    Pure: W and H are copied, never modified -- except that with consume_h=True H is the solver's workspace (the
    caller's last use of it, as in the reference, which frees H after the Cholesky step): then the solver holds
    at most three K x K matrices (H, H^-1 and its factor) instead of four. Computed on W's device in float32
    (float64 if W is float64, which the tests use to compare against a plain reference without rounding noise);
    results are float32 / int32. `log` receives a message when the damping had to be raised.
    shared: a dict for the linears of one true-sequential group, which share H (q/k/v, gate/up): the first call
    stores what depends on H and cfg alone (dead inputs, column order, Hinv, damping) and the others reuse it
    (the same numbers, one Cholesky per group; H may then be consumed by the first call).
    dXXT: GPTAQ's D = 2/n sum (x_fp - x)^T x [K, K] (minigptq/gptaq.py): the target becomes the full-precision
    model's output, by starting Algorithm 1 from W* = W + alpha W D H^-1 instead of W. None: plain GPTQ.

    Algorithm 1 of the paper (line numbers ours; the comments below point at them):
      1  Q <- 0 [N, K];  E <- 0 [N, B]
      2  Hinv <- Cholesky(H^-1)^T                      (upper factor, of the damped H)
      3  for i = 0, B, 2B, ...:
      4      for j = i, ..., i + B - 1:
      5          Q[:, j] <- quant(W[:, j])
      6          E[:, j - i] <- (W[:, j] - Q[:, j]) / Hinv[j, j]
      7          W[:, j:i+B] <- W[:, j:i+B] - E[:, j - i] Hinv[j, j:i+B]
      8      W[:, i+B:] <- W[:, i+B:] - E Hinv[i:i+B, i+B:]
    """
    if W.dim() != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise Error(f"need W [N, K] and H [K, K]; got W {tuple(W.shape)} and H {tuple(H.shape)}")
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    W = W.detach().to(dtype=dtype, copy=True)  # [N, K] updated in place below
    if not torch.isfinite(W).all():
        raise Error("W contains NaN or Inf; cannot quantize")
    reuse = bool(shared)
    if not reuse and not torch.isfinite(H).all():
        raise Error("H contains NaN or Inf; the calibration activations may contain NaN/Inf")
    N, K = W.shape
    maxq = 2**cfg.bits - 1
    gs = K if cfg.group_size == -1 else cfg.group_size
    G = cfg.num_groups(K)

    # Dead inputs (always zero in the calibration data): their weights cannot matter, so set them to 0 (and below
    # give H a unit diagonal there, which keeps it invertible).
    dead = shared["dead"] if reuse else torch.diag(H) == 0  # [K]
    W[:, dead] = 0

    # Grids computed up front: static_groups (every group on the unpermuted W), and group_size = -1 (one grid
    # per row over all of W, as in the reference). Otherwise each group's grid is found when the solver reaches it.
    scales = torch.zeros(G, N, dtype=dtype, device=W.device)  # [G, N]
    zeros = torch.zeros(G, N, dtype=dtype, device=W.device)  # [G, N]
    upfront = cfg.static_groups or cfg.group_size == -1
    if upfront:
        for g in range(G):
            scales[g], zeros[g] = find_params(W[:, g * gs : (g + 1) * gs], cfg.bits, cfg.sym, cfg.mse)

    if reuse:  # this group's H was prepared by its first linear
        perm, Hinv, percdamp, shift = shared["perm"], shared["Hinv"], shared["percdamp"], shared["shift"]
    else:
        # Act-order: quantize columns with large H[i, i] (large inputs) first, while many columns remain to absorb
        # their error. Stable sort -> deterministic order among ties. Identity permutation otherwise.
        # GAR (an addition to the paper): the same idea within contiguous groups, see group_aware_order.
        in_place = consume_h and H.device == W.device and H.dtype == dtype  # H is our workspace as it is
        if cfg.act_order or cfg.act_group_aware:
            diag = torch.diag(H).clone()  # [K]
            diag[dead] = 1  # dead inputs count with H[i, i] = 1, as in the reference
            perm = (torch.sort(diag, descending=True, stable=True).indices if cfg.act_order
                    else group_aware_order(diag, gs))  # [K]
            if in_place:
                H.copy_(H[perm]).copy_(H[:, perm])  # in processing order, in place (one K x K temporary at a time)
            else:
                H = H.to(device=W.device, dtype=dtype)[perm][:, perm]  # [K, K] our copy, in processing order
        else:
            perm = torch.arange(K, device=W.device)  # [K]
            if not in_place:
                H = H.detach().to(device=W.device, dtype=dtype, copy=True)  # [K, K] our copy
        H.diagonal()[dead[perm]] = 1
        Hinv, percdamp = _upper_cholesky_of_inverse(H, cfg.percdamp, log)  # [K, K] upper triangular (line 2)
        del H  # damped in place: not needed any more
        shift = None if dXXT is None else _asymmetric_shift(dXXT, perm, Hinv)  # [K, K] D H^-1, processing order
        if shared is not None:
            shared.update(dead=dead, perm=perm, Hinv=Hinv, percdamp=percdamp, shift=shift)
    invperm = torch.argsort(perm)  # [K]
    if cfg.act_order or cfg.act_group_aware:
        W = W[:, perm]  # [N, K] in processing order
    if shift is not None:  # GPTAQ: aim at the full-precision model's output (minigptq/gptaq.py)
        W += cfg.gptaq_alpha * (W @ shift)  # [N, K] W* = W + alpha W D H^-1
    # group_of[j]: group of the j-th processed column. Dynamic groups are consecutive in processing order;
    # static groups, and GAR's groups (whole groups moved, so still consecutive), keep the original column's group.
    group_of = (perm // gs).tolist() if upfront or cfg.act_group_aware else [j // gs for j in range(K)]

    codes = torch.zeros_like(W)  # [N, K] integer codes (as floats), processing order
    fast = PLAIN_LOOP is False and dtype == torch.float32 and W.is_cpu and kernels.cpu_available()
    loss = torch.zeros((), dtype=dtype, device=W.device)

    # Block boundaries (line 3: i = 0, B, 2B, ...), plus every dynamic group start: after a
    # block's lazy update all later columns are up to date, so a group's grid is then found from the fully
    # error-compensated W[:, c:c+gs]. (The reference instead reads stale columns for groups starting mid-block,
    # which makes its result depend on B.)
    starts = set(range(0, K, cfg.blocksize)) | (set() if upfront else set(range(0, K, gs)))
    bounds = sorted(starts) + [K]
    for i1, i2 in zip(bounds[:-1], bounds[1:]):
        if not upfront and i1 % gs == 0:  # a group starts (with GAR: group_of[i1], not necessarily i1 // gs)
            scales[group_of[i1]], zeros[group_of[i1]] = find_params(W[:, i1 : i1 + gs], cfg.bits, cfg.sym, cfg.mse)
        W1 = W[:, i1:i2].clone()  # [N, b] the block, updated column by column
        Err1 = torch.zeros_like(W1)  # [N, b] E: scaled quantization errors of the block (line 1)
        Hinv1 = Hinv[i1:i2, i1:i2]  # [b, b]
        if fast:  # lines 4-7 in C++ (kernels.cpu_gptq_block): the same operations, bit for bit, rows in parallel
            g = torch.tensor(group_of[i1:i2], device=W.device)  # [b]
            codes[:, i1:i2], Err1 = kernels.cpu_gptq_block(W1, Hinv1.contiguous(), scales[g].contiguous(),
                                                           zeros[g].contiguous(), maxq)
        else:
            for i in range(i2 - i1):  # line 4 (j = i1 + i)
                w = W1[:, i]  # [N] current column, already error-compensated
                d = Hinv1[i, i]
                g = group_of[i1 + i]
                q = quantize(w, scales[g], zeros[g], maxq)  # [N] codes (line 5)
                codes[:, i1 + i] = q
                err = (w - dequantize(q, scales[g], zeros[g])) / d  # [N] (line 6)
                W1[:, i + 1 :] -= err[:, None] * Hinv1[None, i, i + 1 :]  # update the rest of the block (line 7)
                Err1[:, i] = err
        # Lazy batch update of all later columns at once (line 8): W[:, i2:] -= E Hinv[block, i2:].
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # [N, K - i2]
        # The paper's objective: sum (w - q)^2 / d^2 / 2 = 1/2 ||E||^2. Summed over the layer it equals
        # 1/2 tr((W-Q) H (W-Q)^T) for the damped H exactly, since W - Q = E Hinv and Hinv H Hinv^T = I.
        loss += Err1.square().sum() / 2

    # Back to the original column order; .weight is rebuilt from what is returned, so the two agree bit for bit.
    device, W, Hinv = W.device, None, None  # memory: only the codes and the grids are needed from here on
    qweight = codes[:, invperm].to(torch.int32)  # [N, K]
    del codes
    g_idx = torch.tensor(group_of, dtype=torch.int32, device=device)[invperm]  # [K]
    scales = scales.to(torch.float32)  # [G, N]
    zeros = zeros.to(torch.int32)  # [G, N]
    return QuantResult(qweight, scales, zeros, g_idx, float(loss), percdamp)  # .weight: dequantized on demand
