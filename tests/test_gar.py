"""Tests of group-aware act-order (GAR) and GPTAQ (minigptq/gptq.py, minigptq/gptaq.py, their driver plumbing).

The oracle is a float64 brute force written from the objective, not from Algorithm 1: before each column is rounded,
the still-free columns are set to the exact minimizer of

    J(w) = 2/n ||X w - (X + alpha (X~ - X)) w0||^2 + lambda ||w - w0||^2,   lambda = percdamp * mean diag(2/n X^T X)

given the columns already rounded (one linear solve per column), each group's grid is found on its columns when the
first of them comes up, and the columns are taken in the given order. alpha = 0, X~ = X is plain GPTQ (with the
paper's damping); the solver must produce the same integer codes. Sizes are tiny: the file runs in seconds.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import minigptq
from minigptq import gptq as gptq_module
from minigptq.gptaq import AsymHessian
from minigptq.gptq import Hessian, group_aware_order, gptq
from minigptq.quantize import DEFAULT_QCFG, config_from_args, parser, quantize_model
from minigptq.quantizer import QuantConfig, find_params, quantize

from conftest import WIKI_VALID


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def layer(seed: int, N: int = 12, K: int = 72, n: int = 400, dx: float = 0.0):
    """float64 W [N, K], correlated inputs X [n, K] with uneven magnitudes, and X~ = X + dx * noise."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(K, K, generator=g, dtype=torch.float64) / math.sqrt(K) + torch.eye(K, dtype=torch.float64)
    X = (torch.randn(n, K, generator=g, dtype=torch.float64) @ A) * (torch.rand(K, generator=g, dtype=torch.float64)
                                                                       * 3 + 0.1)  # [n, K]
    Xfp = X + dx * torch.randn(n, K, generator=g, dtype=torch.float64) * X.std(0)  # [n, K]
    W = torch.randn(N, K, generator=g, dtype=torch.float64)  # [N, K]
    return W, X, Xfp


def oracle(W0, X, Xfp, cfg: QuantConfig, order: list[int], alpha: float) -> torch.Tensor:
    """Integer codes [N, K] (original column order) of the greedy minimization of J described above."""
    n, K = X.shape
    gs = K if cfg.group_size == -1 else cfg.group_size
    H = 2 / n * X.T @ X  # [K, K]
    Hd = H + cfg.percdamp * torch.diag(H).mean() * torch.eye(K, dtype=X.dtype)  # [K, K]
    # J's gradient is zero where Hd w = B: the target rows are X w0 + alpha (Xfp - X) w0, the prior w0
    B = (Hd @ W0.T + alpha * 2 / n * X.T @ (Xfp - X) @ W0.T).T  # [N, K]
    W = W0.clone()
    codes = torch.zeros_like(W)
    fixed: list[int] = []
    grid = {}
    for j, c in enumerate(order):
        free = order[j:]
        rhs = B[:, free] - (W[:, fixed] @ Hd[fixed][:, free] if fixed else 0)  # [N, |F|]
        W[:, free] = torch.linalg.solve(Hd[free][:, free], rhs.T).T  # the free columns' exact optimum
        g = c // gs
        if g not in grid:  # the group's first column: its grid from the group's current values
            grid[g] = find_params(W[:, g * gs:(g + 1) * gs], cfg.bits, cfg.sym, cfg.mse)
        codes[:, c] = quantize(W[:, c], *grid[g], 2**cfg.bits - 1)
        W[:, c] = grid[g][0] * (codes[:, c] - grid[g][1])  # fixed at its dequantized value
        fixed.append(c)
    return codes


def gar_loop(diag: torch.Tensor, gs: int) -> list[int]:
    """GAR's order with plain loops (as GPTQModel's gar_ref.py describes it): groups by their max, columns sorted."""
    K = len(diag)
    groups = [list(range(s, min(s + gs, K))) for s in range(0, K, gs)]
    full = [g for g in groups if len(g) == gs]
    full.sort(key=lambda g: -max(diag[i].item() for i in g))  # Python's sort is stable too
    tail = [g for g in groups if len(g) < gs]
    return [i for g in full + tail for i in sorted(g, key=lambda i: -diag[i].item())]


@pytest.mark.parametrize("K,gs", [(72, 24), (70, 16), (40, 64)])
def test_group_aware_order_matches_loops(K, gs):
    d = torch.rand(K, generator=torch.Generator().manual_seed(K)).round(decimals=1)  # many ties
    order = group_aware_order(d, gs)
    assert order.tolist() == gar_loop(d, gs)
    assert sorted(order.tolist()) == list(range(K))


@pytest.mark.parametrize("bits,sym,gs", [(3, True, 24), (4, False, 24), (2, True, -1)])
def test_gar_matches_greedy_oracle(bits, sym, gs):
    W, X, _ = layer(bits)
    H = 2 / X.shape[0] * X.T @ X
    cfg = QuantConfig(bits=bits, group_size=gs, sym=sym, act_group_aware=True, blocksize=16)
    res = gptq(W, H, cfg, log=lambda m: None)
    gs_ = X.shape[1] if gs == -1 else gs
    want = oracle(W, X, X, cfg, gar_loop(torch.diag(H), gs_), 0.0)
    assert torch.equal(res.qweight, want.to(torch.int32))
    assert torch.equal(res.g_idx, torch.arange(X.shape[1], dtype=torch.int32) // gs_ if gs > 0
                       else torch.zeros(X.shape[1], dtype=torch.int32))  # the checkpoint's trivial g_idx
    plain = gptq(W, H, QuantConfig(bits=bits, group_size=gs, sym=sym, blocksize=16), log=lambda m: None)
    assert not torch.equal(plain.qweight, res.qweight)  # the order did change something


@pytest.mark.parametrize("gar,alpha", [(False, 1.0), (True, 0.25)])
def test_gptaq_matches_greedy_oracle(gar, alpha):
    W, X, Xfp = layer(7, dx=0.3)
    n = X.shape[0]
    H, D = 2 / n * X.T @ X, 2 / n * (Xfp - X).T @ X  # [K, K] each
    cfg = QuantConfig(bits=3, group_size=24, act_group_aware=gar, gptaq_alpha=alpha, blocksize=16)
    res = gptq(W, H, cfg, log=lambda m: None, dXXT=D)
    order = gar_loop(torch.diag(H), 24) if gar else list(range(X.shape[1]))
    assert torch.equal(res.qweight, oracle(W, X, Xfp, cfg, order, alpha).to(torch.int32))
    # and GPTAQ's target is closer to the full-precision output than GPTQ's, on these inputs
    q_gptq = gptq(W, H, QuantConfig(bits=3, group_size=24, act_group_aware=gar, blocksize=16), log=lambda m: None)
    if alpha == 1.0:
        assert (X @ res.weight.double().T - Xfp @ W.T).norm() < (X @ q_gptq.weight.double().T - Xfp @ W.T).norm()


def test_gar_gptaq_fast_path_is_plain_loop_bit_for_bit(monkeypatch):
    """float32: the C++ block kernel (if built) with GAR's scattered groups gives the torch loop's numbers."""
    W, X, Xfp = (t.float() for t in layer(3, N=40, K=256, n=600, dx=0.2))
    hess = AsymHessian(256, "cpu")
    hess.add_pair(X, Xfp)
    cfg = QuantConfig(bits=4, group_size=64, act_group_aware=True)
    fast = gptq(W, hess.H, cfg, log=lambda m: None, dXXT=hess.D)
    monkeypatch.setattr(gptq_module, "PLAIN_LOOP", True)
    plain = gptq(W, hess.H, cfg, log=lambda m: None, dXXT=hess.D)
    assert torch.equal(fast.qweight, plain.qweight) and torch.equal(fast.scales, plain.scales)
    # alpha = 0: exactly GPTQ (same path, no shift)
    zero = gptq(W, hess.H, QuantConfig(bits=4, group_size=64, act_group_aware=True, gptaq_alpha=0.0),
                log=lambda m: None, dXXT=hess.D)
    assert torch.equal(zero.qweight, gptq(W, hess.H, cfg, log=lambda m: None).qweight)


def test_asym_hessian_accumulates_both_terms():
    _, X, Xfp = layer(5, K=40, n=300, dx=0.5)
    X, Xfp = X.float(), Xfp.float()
    h = AsymHessian(40, "cpu")
    h.add_pair(X[:100].view(4, 25, 40), Xfp[:100].view(4, 25, 40))  # any leading dims
    h.add_pair(X[100:], Xfp[100:])
    ref = Hessian(40, "cpu")
    ref.add(X)
    torch.testing.assert_close(h.H, ref.H, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.D, 2 / 300 * (Xfp - X).T @ X, rtol=1e-4, atol=1e-4)
    with pytest.raises(minigptq.Error, match=r"one shape \[\.\.\., 40\]"):
        h.add_pair(X[:5], Xfp[:4])


def test_bad_settings_raise():
    with pytest.raises(minigptq.Error, match="exclude each other"):
        QuantConfig(act_order=True, act_group_aware=True)
    for a in (1.5, -0.1, float("nan"), True):
        with pytest.raises(minigptq.Error, match="gptaq_alpha"):
            QuantConfig(gptaq_alpha=a)
    with pytest.raises(minigptq.Error, match="'gptq', 'gptaq' or 'rtn'"):
        quantize_model("/nonexistent", None, method="gptaqq", log=lambda m: None)


def test_defaults_are_gar_and_paper_restores_the_paper():
    """The command line and quantize_model default to GAR at damp 0.05 (measured better, README); --paper, --act-order
    and --no-act-group-aware turn it off; QuantConfig() itself stays the paper's Algorithm 1."""
    def cfg(*flags):
        return config_from_args(parser().parse_args(["--model", "m", *flags]))
    assert cfg().act_group_aware and cfg().percdamp == 0.05 and not cfg().act_order
    assert cfg() == DEFAULT_QCFG and not QuantConfig().act_group_aware and QuantConfig().percdamp == 0.01
    assert cfg("--paper") == QuantConfig() and cfg("--paper", "--percdamp", "0.1").percdamp == 0.1
    assert not cfg("--no-act-group-aware").act_group_aware and cfg("--percdamp", "0.01").percdamp == 0.01
    assert cfg("--act-order").act_order and not cfg("--act-order").act_group_aware
    assert cfg("--bits", "3", "--act-group-aware").act_group_aware
    for bad in (["--paper", "--act-group-aware"], ["--paper", "--act-order"]):
        with pytest.raises(minigptq.Error, match="--paper"):
            cfg(*bad)
    with pytest.raises(minigptq.Error, match="exclude each other"):
        cfg("--act-order", "--act-group-aware")


def test_gptaq_gar_end_to_end(hf_checkpoints, tmp_path):
    """Tiny Llama: GAR keeps g_idx trivial (no desc_act); GPTAQ equals GPTQ where the two models' inputs agree (the
    first block's q/k/v, fed the same embeddings) and differs after (its targets come from the full-precision path)."""
    src = hf_checkpoints("llama-gqa-tied")
    calib = tmp_path / "calib.txt"
    calib.write_text(WIKI_VALID.read_text()[:16000])
    outs = {}
    for method in ("gptq", "gptaq"):
        outs[method] = quantize_model(src, tmp_path / method, method=method, dataset=calib, nsamples=4, seqlen=64,
                                      qcfg=QuantConfig(bits=3, group_size=32, act_group_aware=True, gptaq_alpha=1.0),
                                      log=lambda m: None)
    a, b = (load_file(outs[m] / "model.safetensors") for m in ("gptq", "gptaq"))
    qcfg = json.loads((outs["gptaq"] / "quantize_config.json").read_text())
    assert qcfg["desc_act"] is False and qcfg["meta"]["method"] == "gptaq"
    for name in ("q_proj", "k_proj", "v_proj"):
        assert torch.equal(a[f"model.layers.0.self_attn.{name}.qweight"], b[f"model.layers.0.self_attn.{name}.qweight"])
    assert not torch.equal(a["model.layers.0.self_attn.o_proj.qweight"], b["model.layers.0.self_attn.o_proj.qweight"])
    assert not torch.equal(a["model.layers.1.mlp.down_proj.qweight"], b["model.layers.1.mlp.down_proj.qweight"])
    for t in (a, b):
        assert torch.equal(t["model.layers.1.mlp.down_proj.g_idx"], torch.arange(128, dtype=torch.int32) // 32)
