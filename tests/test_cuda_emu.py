"""The CUDA kernels' logic (cuda/gpu/qgemm.cu) on any machine: host emulation against the torch reference.

qgemm.cu is compiled for the host with g++ against tests/emu_cuda.h (every thread a fiber, barriers checked,
threads and blocks scheduled in a random order, tensor-core fragments emulated lane by lane, cp.async data landing
only at its wait_group) and called through the same module interface as on a GPU, with CPU tensors. Covers bit
widths 2/3/4/8, groups not aligned to the kernel's tiles and a partial last group, act-order (the gather pass) and
the identity layout (x streamed as it is, or gathered when unaligned), one group, odd N, several column blocks with
stripes that cross them, M = 1 .. 64 (every MT variant), fp16/bf16 and fp32 (split into bf16 parts), K split
across blocks or not, bitwise-identical repeats, a kernel that reads a stage before waiting for it (must fail),
and the dequantize kernel. Speed is not tested here; tools/cuda_static.py models it from the SASS.
"""
import importlib.util
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

from minigptq import kernels
from minigptq.pack import dequantize
from test_kernels import TOL, random_layer, rel_err

CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# (K, N, group_size, act_order): partial last group (320 = 6*48 + 32) with groups padded 48 -> 64 rows, groups of
# 32 rows (identity perm), tiny act-order groups (20 -> 32), one group (512 rows, 4 k-blocks), groups of 128 over 3
# k-blocks with an odd number of 16-column tiles, act-order with groups of 128, groups of 2 k-blocks (segments start
# mid-group), three column blocks (the last one partial) with groups of 128 (identity perm).
CASES = [(320, 64, 48, False), (256, 96, 32, False), (160, 32, 20, True), (512, 48, -1, False),
         (384, 80, 128, False), (512, 96, 128, True), (1024, 32, 256, False), (384, 288, 128, False)]
# (M, dtype, sms): sms < 0 asks for exactly -sms blocks. Every MT variant (R = M, or 3 M for fp32: 1-8, 9-16,
# 17-32, 33-64 rows), one block, stripes of every length.
CALLS = [(1, torch.float16, 132), (3, torch.bfloat16, -1), (16, torch.float16, -3), (12, torch.bfloat16, -2),
         (17, torch.bfloat16, 132), (40, torch.float16, -2), (64, torch.bfloat16, -7), (1, torch.float32, -5),
         (5, torch.float32, 132), (21, torch.float32, -3)]


def cases(bits):
    unit = 32 if bits == 3 else 32 // bits
    return [c for c in CASES if c[0] % unit == 0 and c[1] % unit == 0]


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """minigptq._cuda_kernels built from cuda/gpu/qgemm.cu + bindings.cpp against emu_cuda.h."""
    if shutil.which("g++") is None:
        pytest.skip("g++ not found")
    pybind11 = pytest.importorskip("pybind11")
    root, out = Path(__file__).resolve().parents[1] / "cuda" / "gpu", tmp_path_factory.mktemp("emu")
    src = (root / "qgemm.cu").read_text()
    cuda_headers = "#include <cuda_bf16.h>\n#include <cuda_fp16.h>\n#include <cuda_runtime.h>\n"
    assert cuda_headers in src
    src = src.replace(cuda_headers, '#include "emu_cuda.h"\n')
    launch = re.compile(r"([\w:]+(?:<[^<>;]*>)?)<<<([^,]+),\s*([^,]+),\s*([^,]+),\s*[^>]+>>>\((.*?)\);", re.S)
    src, n = launch.subn(lambda m: f"emu_launch({m[2]}, {m[3]}, {m[4]}, [&] {{ {m[1]}({m[5]}); }});", src)
    assert n == 3, f"expected the 3 kernel launches of qgemm.cu (gather, fused, dequant), rewrote {n}"
    (out / "qgemm_emu.cpp").write_text(src)
    so = out / ("_cuda_kernels" + sysconfig.get_config_var("EXT_SUFFIX"))
    cmd = ["g++", "-std=c++20", "-O1", "-shared", "-fPIC", f"-I{root}", f"-I{Path(__file__).resolve().parent}",
           f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}", str(out / "qgemm_emu.cpp"),
           str(root / "bindings.cpp"), "-o", str(so)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    spec = importlib.util.spec_from_file_location("emu._cuda_kernels", so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def emu_qgemm(emu, x, L, sms):
    """One emulated call, as kernels.cuda_qgemm makes it; checks that nothing past `out` is written and that the
    counters are left at zero. -> (y, K split?, x gathered?)"""
    M, code = x.shape[0], CODES[x.dtype]
    floats, counters, xg_bytes = emu.qgemm_workspace(L.args, M, code, sms, x.data_ptr())
    ws, ctr = torch.full((max(floats, 1),), float("nan")), torch.zeros(max(counters, 1), dtype=torch.int32)
    xg = torch.full((max(xg_bytes, 16) // 2,), float("nan")).half()  # 16-byte aligned (fresh allocation)
    buf = torch.full((M * L.N + 64,), 7.0).to(x.dtype)
    emu.qgemm(L.args, x.data_ptr(), code, M, buf.data_ptr(), ws.data_ptr(), ws.numel(), ctr.data_ptr(), ctr.numel(),
              xg.data_ptr(), xg_bytes, sms, 0)
    assert bool((buf[M * L.N:] == 7).all()), "wrote past the output"
    assert not bool(ctr.any()), "counters not reset"
    return buf[:M * L.N].view(M, L.N), floats > 0, xg_bytes > 0


def layers(bits, seed):
    for i, case in enumerate(cases(bits)):
        qw, qz, s, g_idx = random_layer(*case, bits, seed=(seed + i) % 2**31)
        W = dequantize(qw, qz, s.float(), g_idx, bits, "gptq_v2")
        yield case, kernels.make_layout(qw, qz, s, g_idx, bits, "gptq_v2", cuda=True), W


def unaligned(x):
    """x's values at an address that is not 16-byte aligned (forces the gather pass)."""
    buf = torch.empty(x.numel() + 1, dtype=x.dtype)
    y = buf[1:].view_as(x)
    y.copy_(x)
    return y


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_cuda_layout_reads_back(bits):
    for case, L, W in layers(bits, seed=bits):
        assert torch.equal(kernels.cuda_layout_weight(L), W), case
        assert L.perm_identity == (not case[3] and case[2] in (32, 128, 256, -1)), case  # no padded groups


@pytest.mark.slow
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_emulated_qgemm_matches_reference(emu, bits):
    seed = torch.seed() % 2**31  # fresh layers and activations every run; printed on failure
    seen = set()
    for c, (case, L, W) in enumerate(layers(bits, seed)):
        for i, (M, dtype, sms) in enumerate(CALLS):
            if (c + i) % 2 and M > 16:
                continue  # the large-M variants on half of the layers: emulated 256-thread blocks are slow
            x = torch.randn(M, case[0]).to(dtype)
            if (c + i) % 3 == 0 and dtype != torch.float32:
                x = unaligned(x)
            y, split, gathered = emu_qgemm(emu, x, L, sms)
            seen |= {("split", split), ("gathered", gathered)}
            err = rel_err(y, x.double() @ W.double())
            assert err < TOL[dtype], f"{case=} {M=} {dtype=} {sms=} seed={seed}: rel err {err:.2e}"
    assert seen == {("split", True), ("split", False), ("gathered", True), ("gathered", False)}


@pytest.mark.slow
def test_emulated_qgemm_is_deterministic(emu):
    """Blocks and threads run in a new random order every call: the K-split sum must not depend on it."""
    qw, qz, s, g_idx = random_layer(1024, 288, 128, True, 4, seed=5)
    L = kernels.make_layout(qw, qz, s, g_idx, 4, "gptq_v2", cuda=True)
    for dtype, M, sms in ((torch.float16, 1, 132), (torch.bfloat16, 16, -5), (torch.float32, 2, -7)):
        x = torch.randn(M, 1024).to(dtype) * 50
        ys = [emu_qgemm(emu, x, L, sms) for _ in range(3)]
        assert ys[0][1], "expected a K split"
        assert all(torch.equal(ys[0][0], y) for y, _, _ in ys[1:]), dtype


def test_emulated_early_read_fails(emu, monkeypatch):
    """A kernel that reads a pipeline stage one cp.async group too early must fail in the emulation (and the same
    call with the right wait passes)."""
    qw, qz, s, g_idx = random_layer(512, 64, 128, False, 4, seed=1)
    L = kernels.make_layout(qw, qz, s, g_idx, 4, "gptq_v2", cuda=True)
    x = torch.randn(1, 512).half()
    emu_qgemm(emu, x, L, -1)
    monkeypatch.setenv("MINIGPTQ_EMU_WAIT_SLACK", "1")
    with pytest.raises(RuntimeError, match="before its cp.async group was waited for"):
        emu_qgemm(emu, x, L, -1)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_emulated_dequantize_is_exact(emu, bits):
    for case, L, W in layers(bits, seed=bits):
        for dtype, code in CODES.items():
            out = torch.empty(L.K, L.N, dtype=dtype)
            emu.dequantize(L.args, out.data_ptr(), code, 0)
            assert torch.equal(out, W.to(dtype)), (case, dtype)


def test_emulated_errors(emu):
    qw, qz, s, g_idx = random_layer(256, 32, 64, False, 4, seed=0)
    L = kernels.make_layout(qw, qz, s, g_idx, 4, "gptq_v2", cuda=True)
    x = torch.randn(1, 256).half()
    bad = (*L.args[:8], 48, *L.args[9:])  # group_rows 48
    with pytest.raises(ValueError, match="group_rows=48"):
        emu.qgemm_workspace(bad, 1, 1, 132, x.data_ptr())
    with pytest.raises(ValueError, match="workspace too small"):
        emu.qgemm(L.args, x.data_ptr(), 1, 1, x.data_ptr(), 0, 0, 0, 0, 0, 0, 132, 0)
    with pytest.raises(ValueError, match="M=65 rows of 16-bit x are too many"):
        emu.qgemm_workspace(L.args, 65, 1, 132, x.data_ptr())
    with pytest.raises(ValueError, match="M=22 rows of fp32 x are too many"):
        emu.qgemm_workspace(L.args, 22, 0, 132, x.data_ptr())
