"""Tests of the GPTQ solver and the quantization grid (minigptq/gptq.py, minigptq/quantizer.py).

The central test compares the blocked solver against a naive column-by-column transcription of the paper's
equations (Frantar et al. 2022, arXiv:2210.17323), written here without lazy batching. Sizes are small so the
whole file runs in seconds on two CPU cores.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minigptq.gptq import Hessian, QuantResult, gptq
from minigptq.quantizer import (
    VALID_BITS,
    QuantConfig,
    dequantize,
    find_params,
    proxy_loss,
    quantize,
    rtn,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These matrices are tiny: threads only add overhead (and spin when the two cores are shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def make_layer(seed: int, N: int = 32, K: int = 200, n: int = 600, dead: tuple[int, ...] = (5, 77)):
    """Random W [N, K] and correlated activations X [n, K] (X = Z A, so H is far from diagonal), H from X."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(K, K, generator=g) / math.sqrt(K) + torch.eye(K)  # [K, K] mixes inputs
    scale = torch.rand(K, generator=g) * 2 + 0.1  # [K] uneven input magnitudes, so act-order matters
    X = (torch.randn(n, K, generator=g) @ A) * scale  # [n, K]
    X[:, list(dead)] = 0  # dead inputs: diag(H) == 0
    W = torch.randn(N, K, generator=g)  # [N, K]
    hess = Hessian(K, "cpu")
    hess.add(X)
    return W, X, hess.H


def out_err(W: torch.Tensor, Q: torch.Tensor, X: torch.Tensor) -> float:
    """||W X - Q X||_F with X stored as [n, K] rows."""
    return float((X @ (W - Q).T).norm())


def dequant(res: QuantResult) -> torch.Tensor:
    """Rebuild the weight from (qweight, scales, zeros, g_idx) with plain fp32 arithmetic."""
    g = res.g_idx.long()
    s = res.scales[g].T  # [N, K]
    z = res.zeros[g].T.float()  # [N, K]
    return s * (res.qweight.float() - z)


def naive_gptq(W: torch.Tensor, H: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """The same equations one column at a time in float64: no lazy batching, no blocks. Returns Q [N, K]."""
    W = W.double().clone()
    H = H.double().clone()
    N, K = W.shape
    maxq = 2**cfg.bits - 1
    gs = K if cfg.group_size == -1 else cfg.group_size
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    G = math.ceil(K / gs)
    params = [None] * G
    upfront = cfg.static_groups or cfg.group_size == -1
    if upfront:
        params = [find_params(W[:, g * gs : (g + 1) * gs], cfg.bits, cfg.sym, cfg.mse) for g in range(G)]
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if cfg.act_order else torch.arange(K)
    W, H = W[:, perm], H[perm][:, perm]
    H += cfg.percdamp * torch.diag(H).mean() * torch.eye(K, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for i in range(K):
        if upfront:
            scale, zero = params[int(perm[i]) // gs]
        elif i % gs == 0:
            scale, zero = find_params(W[:, i : i + gs], cfg.bits, cfg.sym, cfg.mse)
        Q[:, i] = dequantize(quantize(W[:, i], scale, zero, maxq), scale, zero)
        err = (W[:, i] - Q[:, i]) / Hinv[i, i]
        W[:, i + 1 :] -= err[:, None] * Hinv[i, i + 1 :][None, :]
    return Q[:, torch.argsort(perm)]


# --------------------------------------------------------------------------------------------------
# 1. GPTQ beats RTN on the layer-output error
# --------------------------------------------------------------------------------------------------

CONFIGS_VS_RTN = [
    dict(group_size=-1, sym=True),
    dict(group_size=32, sym=True),
    dict(group_size=32, sym=False, act_order=True),
    dict(group_size=-1, sym=False, act_order=True),
    dict(group_size=32, sym=True, act_order=True, static_groups=True),
]


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("kw", CONFIGS_VS_RTN, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_gptq_beats_rtn(bits: int, kw: dict) -> None:
    W, X, H = make_layer(seed=10 + bits, N=32, K=128, n=512)
    cfg = QuantConfig(bits=bits, **kw)
    res = gptq(W, H, cfg)
    base = rtn(W, cfg, H)
    e_gptq, e_rtn = out_err(W, res.weight, X), out_err(W, base.weight, X)
    assert e_gptq < 0.9 * e_rtn, f"GPTQ {e_gptq:.3f} vs RTN {e_rtn:.3f}"
    assert res.loss < base.loss


def test_loss_is_the_hessian_objective() -> None:
    """Sum of (w-q)^2/d^2/2 over the solve == 1/2 tr((W-Q) H' (W-Q)^T), the number rtn() reports."""
    W, X, H = make_layer(seed=3)
    cfg = QuantConfig(bits=3, group_size=64, act_order=True)
    res = gptq(W, H, cfg)
    assert res.loss == pytest.approx(proxy_loss(W, res.weight, H, res.percdamp), rel=1e-4)
    # Without damping H' is 2/n X^T X, so the objective is ||WX - QX||^2 / n: check the units on RTN.
    base = rtn(W, cfg, H)
    undamped = proxy_loss(W, base.weight, H, 1e-12)
    assert undamped == pytest.approx(out_err(W, base.weight, X) ** 2 / X.shape[0], rel=1e-4)


# --------------------------------------------------------------------------------------------------
# 2. Blocked solver == naive column-by-column solver
# --------------------------------------------------------------------------------------------------

CONFIGS_VS_NAIVE = [
    dict(bits=4, group_size=64, sym=True),  # K = 200: groups 64, 64, 64, 8 (partial last group)
    dict(bits=3, group_size=64, sym=False, act_order=True),
    dict(bits=4, group_size=64, sym=False, act_order=True, static_groups=True),
    dict(bits=3, group_size=-1, sym=True, act_order=True),
    dict(bits=2, group_size=48, sym=False, mse=True),
]


@pytest.fixture(scope="module")
def naive_layer():
    W, X, H = make_layer(seed=1, N=24, K=200)
    cache = {}

    def layer(kw: dict) -> torch.Tensor:
        # A symmetric grid puts a row's negative absmax exactly halfway between two levels (-maxq/2 steps), so
        # with grids found during the solve the last bit of W, which depends on the summation order, picks the
        # level. Both choices are equally good, but they differ; rows whose absmax is positive (clamped to the
        # top level instead) have no such tie.
        return W.abs() + 0.5 if kw["sym"] and not kw.get("static_groups") and kw["group_size"] != -1 else W

    def reference(kw: dict) -> torch.Tensor:
        key = tuple(sorted(kw.items()))
        if key not in cache:
            cache[key] = naive_gptq(layer(kw), H, QuantConfig(**kw)).float()
        return cache[key]

    return layer, H, reference


@pytest.mark.parametrize("blocksize", [1, 7, 32, 128])
@pytest.mark.parametrize("kw", CONFIGS_VS_NAIVE, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_blocked_equals_naive(naive_layer, blocksize: int, kw: dict) -> None:
    layer, H, reference = naive_layer
    # float64 input -> float64 solve: a rounding decision cannot flip between the two summation orders.
    res = gptq(layer(kw).double(), H, QuantConfig(blocksize=blocksize, **kw))
    Q = reference(kw)
    torch.testing.assert_close(res.weight, Q, rtol=1e-5, atol=1e-6)
    assert float((res.weight - Q).norm() / Q.norm()) < 1e-5


def test_float32_solve_matches_float64() -> None:
    """The production fp32 path: same codes as the fp64 solve except for rare rounding ties."""
    W, X, H = make_layer(seed=2, N=24, K=200)
    cfg = QuantConfig(bits=4, group_size=64, act_order=True)
    r32, r64 = gptq(W, H, cfg), gptq(W.double(), H, cfg)
    assert (r32.qweight == r64.qweight).float().mean() > 0.97
    assert out_err(W, r32.weight, X) == pytest.approx(out_err(W, r64.weight, X), rel=0.02)


# --------------------------------------------------------------------------------------------------
# 3. The returned tensors are consistent
# --------------------------------------------------------------------------------------------------

CONFIGS_FORMAT = [
    dict(bits=4, group_size=64, sym=True),
    dict(bits=3, group_size=64, sym=False, act_order=True),
    dict(bits=2, group_size=64, sym=False, act_order=True, static_groups=True),
    dict(bits=8, group_size=-1, sym=False),
    dict(bits=4, group_size=300, sym=True),  # one group larger than K
]


@pytest.mark.parametrize("kw", CONFIGS_FORMAT, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_result_format(kw: dict) -> None:
    W, X, H = make_layer(seed=4, N=24, K=200)
    W0, H0 = W.clone(), H.clone()
    cfg = QuantConfig(**kw)
    N, K, G, maxq = 24, 200, cfg.num_groups(200), 2**cfg.bits - 1
    for res in (gptq(W.bfloat16(), H, cfg), rtn(W, cfg)):
        assert torch.equal(W, W0) and torch.equal(H, H0), "inputs must not be modified"
        assert res.qweight.dtype == torch.int32 and res.qweight.shape == (N, K)
        assert res.scales.dtype == torch.float32 and res.scales.shape == (G, N)
        assert res.zeros.dtype == torch.int32 and res.zeros.shape == (G, N)
        assert res.g_idx.dtype == torch.int32 and res.g_idx.shape == (K,)
        assert res.weight.dtype == torch.float32 and res.weight.shape == (N, K)
        assert 0 <= int(res.qweight.min()) and int(res.qweight.max()) <= maxq
        assert 0 <= int(res.g_idx.min()) and int(res.g_idx.max()) < G
        assert torch.equal(dequant(res), res.weight), "codes + grids must reproduce weight exactly"
        assert bool((res.scales > 0).all()) and math.isfinite(res.loss)
        if cfg.sym:
            assert bool((res.zeros == 2 ** (cfg.bits - 1)).all())
        else:
            assert 1 <= int(res.zeros.min()) and int(res.zeros.max()) <= maxq  # v1 format stores zero - 1 >= 0
        gs = K if cfg.group_size == -1 else cfg.group_size
        counts = torch.bincount(res.g_idx.long(), minlength=G)  # columns per group
        assert counts.tolist() == [min(gs, K - g * gs) for g in range(G)]
    # dead inputs get weight exactly 0 from the solver
    res = gptq(W, H, cfg)
    assert bool((res.weight[:, [5, 77]] == 0).all())


def test_g_idx_follows_act_order_permutation() -> None:
    W, X, H = make_layer(seed=5, N=16, K=200)
    diag = torch.diag(H).clone()
    diag[diag == 0] = 1  # dead inputs are given H[i, i] = 1 before the permutation
    perm = torch.argsort(diag, descending=True, stable=True)
    gs = 64
    res = gptq(W, H, QuantConfig(bits=4, group_size=gs, act_order=True))
    assert res.g_idx[perm].tolist() == [p // gs for p in range(200)]  # groups are consecutive in processing order
    assert res.g_idx.tolist() != [k // gs for k in range(200)]  # ... and not in the original order
    static = gptq(W, H, QuantConfig(bits=4, group_size=gs, act_order=True, static_groups=True))
    assert static.g_idx.tolist() == [k // gs for k in range(200)]


# --------------------------------------------------------------------------------------------------
# 4. User mistakes raise ValueError with the offending value
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, pattern",
    [
        (dict(bits=5), r"bits=5 .*\(2, 3, 4, 8\)"),
        (dict(bits=True), r"bits=True"),
        (dict(group_size=0), r"group_size=0 .*-1"),
        (dict(group_size=-2), r"group_size=-2 .*positive"),
        (dict(percdamp=0.0), r"percdamp=0.0 .*\(0, 1\]"),
        (dict(percdamp=1.5), r"percdamp=1.5"),
        (dict(percdamp=float("nan")), r"percdamp=nan"),
        (dict(blocksize=0), r"blocksize=0 .*>= 1"),
        (dict(sym="yes"), r"sym='yes' must be a bool"),
    ],
)
def test_bad_config(kw: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        QuantConfig(**kw)


def test_non_finite_and_bad_shapes_raise() -> None:
    W, X, H = make_layer(seed=6, N=8, K=32, n=64, dead=())
    cfg = QuantConfig(bits=4, group_size=16)
    Wbad = W.clone()
    Wbad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="W contains NaN or Inf"):
        gptq(Wbad, H, cfg)
    with pytest.raises(ValueError, match="W contains NaN or Inf"):
        rtn(Wbad, cfg)
    Hbad = H.clone()
    Hbad[0, 1] = float("inf")
    with pytest.raises(ValueError, match="H contains NaN or Inf"):
        gptq(W, Hbad, cfg)
    with pytest.raises(ValueError, match=r"H \(31, 31\)"):
        gptq(W, H[:31, :31], cfg)
    with pytest.raises(ValueError, match="expected in_features=32"):
        Hessian(32, "cpu").add(torch.zeros(4, 31))


# --------------------------------------------------------------------------------------------------
# 5. Cholesky failure: retry with more damping, or explain
# --------------------------------------------------------------------------------------------------


def test_cholesky_retry_raises_damping() -> None:
    g = torch.Generator().manual_seed(7)
    K = 32
    Z = torch.randn(K, K // 2, generator=g)
    S = Z @ Z.T  # [K, K] PSD, rank K/2: singular
    H = S - 0.05 * torch.diag(S).mean() * torch.eye(K)  # indefinite: needs percdamp > 0.05
    W = torch.randn(8, K, generator=g)
    messages: list[str] = []
    res = gptq(W, H, QuantConfig(bits=4, group_size=-1, percdamp=0.01), log=messages.append)
    assert len(messages) == 1 and "percdamp=0.01" in messages[0] and "percdamp=0.1" in messages[0]
    assert res.percdamp == pytest.approx(0.1)
    assert torch.isfinite(res.weight).all() and torch.equal(dequant(res), res.weight)


def test_cholesky_hopeless_raises() -> None:
    W = torch.randn(4, 8, generator=torch.Generator().manual_seed(8))
    messages: list[str] = []
    with pytest.raises(ValueError, match=r"not positive definite even at percdamp=1.0.*NaN/Inf"):
        gptq(W, -torch.eye(8), QuantConfig(percdamp=0.01), log=messages.append)
    assert len(messages) == 2  # 0.01 -> 0.1 -> 1.0


# --------------------------------------------------------------------------------------------------
# 6. Determinism
# --------------------------------------------------------------------------------------------------


def test_deterministic() -> None:
    W, X, H = make_layer(seed=9, N=16, K=200)
    X = torch.cat([X, X[:, :10]], dim=1)  # duplicated inputs: equal diag(H), ties for the act-order sort
    hess = Hessian(210, "cpu")
    hess.add(X)
    W = torch.cat([W, W[:, :10]], dim=1)
    cfg = QuantConfig(bits=3, group_size=32, sym=False, act_order=True, blocksize=50)
    a, b = gptq(W, hess.H, cfg), gptq(W, hess.H, cfg)
    for name in ("qweight", "scales", "zeros", "g_idx", "weight"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.loss == b.loss and a.percdamp == b.percdamp


# --------------------------------------------------------------------------------------------------
# 7. MSE range search
# --------------------------------------------------------------------------------------------------


def test_mse_search_helps_with_outliers() -> None:
    rtn_plain, rtn_mse, gptq_plain, gptq_mse = [], [], [], []
    for seed in range(3):
        W, X, H = make_layer(seed=20 + seed, N=32, K=128, n=512, dead=())
        g = torch.Generator().manual_seed(100 + seed)
        rows, cols = torch.randint(0, 32, (40,), generator=g), torch.randint(0, 128, (40,), generator=g)
        W[rows, cols] *= 8  # a few outliers that stretch the min/max range of their rows
        for mse, r_out, g_out in ((False, rtn_plain, gptq_plain), (True, rtn_mse, gptq_mse)):
            cfg = QuantConfig(bits=3, group_size=-1, mse=mse)
            r_out.append(float((rtn(W, cfg).weight - W).square().sum()))
            g_out.append(out_err(W, gptq(W, H, cfg).weight, X))
    assert sum(rtn_mse) <= sum(rtn_plain), (rtn_mse, rtn_plain)
    assert sum(gptq_mse) <= sum(gptq_plain), (gptq_mse, gptq_plain)


# --------------------------------------------------------------------------------------------------
# The grid and the Hessian on their own
# --------------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from(VALID_BITS),
    sym=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
    shift=st.floats(-2.0, 2.0),
)
def test_grid_covers_the_row(bits: int, sym: bool, seed: int, shift: float) -> None:
    w = torch.randn(6, 40, generator=torch.Generator().manual_seed(seed)) + shift  # [R, C], some rows one-signed
    w[0] = 0  # an all-zero row
    maxq = 2**bits - 1
    scale, zero = find_params(w, bits, sym)
    assert bool((scale > 0).all()) and torch.equal(zero, torch.round(zero))
    assert scale[0] == pytest.approx(2 / maxq)  # all-zero rows get the range [-1, 1]
    s, z = scale[:, None], zero[:, None]  # [R, 1]
    err = (dequantize(quantize(w, s, z, maxq), s, z) - w).abs()  # [R, C]
    # Half a step, except asym rows whose zero was clamped up to 1: the top of their range loses one step.
    bound = s * (0.5 if sym else 1.0) + 1e-6 * w.abs().max()  # + float rounding
    assert bool((err <= bound).all())
    assert bool((dequantize(quantize(torch.zeros(6, 1), s, z, maxq), s, z) == 0).all())  # 0 is on every grid
    if sym:
        assert bool((zero == 2 ** (bits - 1)).all())
    else:
        assert 1 <= float(zero.min()) and float(zero.max()) <= maxq


def test_hessian_running_mean() -> None:
    g = torch.Generator().manual_seed(11)
    xs = [  # any leading dims, any float dtype
        torch.randn(3, 5, 16, generator=g),
        torch.randn(7, 16, generator=g).bfloat16(),
        torch.randn(1, 16, generator=g),
    ]
    hess = Hessian(16, "cpu")
    for x in xs:
        hess.add(x)
    hess.add(torch.zeros(0, 16))  # empty batches are ignored
    X = torch.cat([x.reshape(-1, 16).double() for x in xs])  # [23, 16]
    assert hess.n == 23 and hess.H.dtype == torch.float32
    torch.testing.assert_close(hess.H.double(), 2 / 23 * X.T @ X, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- the C++ inner loop (kernels.cpu_gptq_block)
@pytest.mark.skipif(not __import__("minigptq.kernels").kernels.cpu_available(), reason="CPU kernels not built")
@pytest.mark.parametrize("N, K, kw", [
    (32, 200, dict(bits=4, group_size=64)),
    (77, 300, dict(bits=3, group_size=128, act_order=True)),
    (40, 256, dict(bits=4, group_size=32, act_order=True, static_groups=True)),
    (16, 130, dict(bits=2, group_size=-1, sym=False, blocksize=48)),
    (9, 96, dict(bits=8, group_size=32, sym=False)),
])
def test_cpp_inner_loop_equals_the_torch_loop_bit_for_bit(monkeypatch, N, K, kw):
    """fp32 on the CPU runs lines 4-7 of Algorithm 1 in C++; it must give the torch loop's codes, grids and loss
    exactly (float64, used by the reference comparisons above, always runs the torch loop)."""
    import minigptq.gptq as solver
    W, _, H = make_layer(3, N=N, K=K)
    cfg = QuantConfig(**kw)
    fast = gptq(W, H, cfg)
    monkeypatch.setattr(solver, "PLAIN_LOOP", True)
    plain = gptq(W, H, cfg)
    for name in ("qweight", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(fast, name), getattr(plain, name)), name
    assert fast.loss == plain.loss


def test_cpp_inner_loop_checks_its_inputs():
    from minigptq import Error, kernels
    W1, S = torch.zeros(8, 4), torch.ones(4, 8)
    with pytest.raises(Error, match="float32 CPU tensors"):
        kernels.cpu_gptq_block(W1, torch.eye(4, dtype=torch.float64), S, S, 15)
    with pytest.raises(Error, match="float32 CPU tensors"):
        kernels.cpu_gptq_block(W1, torch.eye(4), S.T, S, 15)


def test_hessian_of_wide_inputs_accumulates_the_upper_triangle_and_mirrors_it():
    """K > 2 * band: only the upper triangle is accumulated (in bands), .H mirrors it; exactly symmetric and equal
    to 2/n X^T X, including after further adds and a second read."""
    g = torch.Generator().manual_seed(0)
    K = 2 * Hessian.band + 37
    X = torch.randn(700, K, generator=g, dtype=torch.float64)
    hess = Hessian(K, "cpu")
    hess.add(X[:300])
    first = hess.H.clone()
    torch.testing.assert_close(first.double(), 2 / 300 * X[:300].T @ X[:300], rtol=1e-5, atol=1e-5)
    hess.add(X[300:])
    assert torch.equal(hess.H, hess.H.T) and hess.n == 700
    torch.testing.assert_close(hess.H.double(), 2 / 700 * X.T @ X, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(bits=4, group_size=64), dict(bits=3, group_size=32, act_order=True),
                                dict(bits=4, group_size=64, act_order=True, static_groups=True)])
def test_linears_sharing_a_hessian_share_its_preparation(kw):
    """The driver solves q/k/v (gate/up) with one `shared` preparation of their H, consumed by the first solve:
    every linear gets exactly what a separate solve on an untouched H gives."""
    cfg = QuantConfig(**kw)
    _, _, H = make_layer(5, N=8)
    Ws = [make_layer(s, N=n)[0] for s, n in ((6, 24), (7, 40), (8, 16))]
    alone = [gptq(W, H, cfg) for W in Ws]
    shared, Hwork = {}, H.clone()
    together = [gptq(W, Hwork, cfg, consume_h=True, shared=shared) for W in Ws]
    assert not torch.equal(Hwork, H)  # it really was the workspace
    for a, b in zip(alone, together):
        for name in ("qweight", "scales", "zeros", "g_idx"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert a.loss == b.loss and a.percdamp == b.percdamp
