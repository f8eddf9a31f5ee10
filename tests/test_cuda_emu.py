"""The CUDA kernels' logic (cuda/gpu/qgemm.cu) on any machine: host emulation against the torch reference.

qgemm.cu is compiled for the host with g++ against tests/emu_cuda.h (every thread a fiber, barriers checked,
threads and blocks scheduled in a random order, tensor-core fragments emulated lane by lane) and called through
the same module interface as on a GPU, with CPU tensors. Covers bit widths 2/3/4/8, groups not aligned to the
kernel's tiles and a partial last group, act-order, one group, odd N, M = 1, 3, 16 (and 18: two row blocks),
fp16/bf16 (tensor-core kernel) and fp32 (plain kernel), K split across blocks or not, bitwise-identical repeats,
and the dequantize kernel. Speed is not tested here; tools/cuda_static.py reads the SASS.
"""
import importlib.util
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
# 32 rows, tiny act-order groups (20 -> 32), one group (512 rows, 4 k-blocks), groups of 128 over 3 k-blocks with an
# odd number of 16-column tiles, act-order with groups of 128, groups of 2 k-blocks (K slices start mid-group).
CASES = [(320, 64, 48, False), (256, 96, 32, False), (160, 32, 20, True), (512, 48, -1, False),
         (384, 80, 128, False), (512, 96, 128, True), (1024, 32, 256, False)]


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
    launch = re.compile(r"([\w:]+(?:<[^<>;]*>)?)<<<([^,]+),\s*([^,]+),\s*[^,]+,\s*[^>]+>>>\((.*?)\);", re.S)
    src, n = launch.subn(lambda m: f"emu_launch({m[2]}, {m[3]}, [&] {{ {m[1]}({m[4]}); }});", src)
    assert n >= 5, f"expected the kernel launches of cuda_qgemm.cu, rewrote {n}"
    (out / "cuda_qgemm_emu.cpp").write_text(src)
    so = out / ("_cuda_kernels" + sysconfig.get_config_var("EXT_SUFFIX"))
    cmd = ["g++", "-std=c++20", "-O1", "-shared", "-fPIC", f"-I{root}", f"-I{Path(__file__).resolve().parent}", f"-I{pybind11.get_include()}",
           f"-I{sysconfig.get_paths()['include']}", str(out / "cuda_qgemm_emu.cpp"), str(root / "bindings.cpp"),
           "-o", str(so)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    spec = importlib.util.spec_from_file_location("emu._cuda_kernels", so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def emu_qgemm(emu, x, L, sms):
    """One emulated call, as kernels.cuda_qgemm makes it; checks that nothing past `out` is written and that the
    counters are left at zero."""
    M, code = x.shape[0], CODES[x.dtype]
    floats, counters = emu.qgemm_workspace(L.args, M, code, sms)
    ws, ctr = torch.full((max(floats, 1),), float("nan")), torch.zeros(max(counters, 1), dtype=torch.int32)
    buf = torch.full((M * L.N + 64,), 7.0).to(x.dtype)
    emu.qgemm(L.args, x.data_ptr(), code, M, buf.data_ptr(), ws.data_ptr(), ws.numel(), ctr.data_ptr(), ctr.numel(),
              sms, 0)
    assert bool((buf[M * L.N:] == 7).all()), "wrote past the output"
    assert not bool(ctr.any()), "counters not reset"
    return buf[:M * L.N].view(M, L.N), floats > 0


def layers(bits, seed):
    for i, case in enumerate(cases(bits)):
        qw, qz, s, g_idx = random_layer(*case, bits, seed=(seed + i) % 2**31)
        W = dequantize(qw, qz, s.float(), g_idx, bits, "gptq_v2")
        yield case, kernels.make_layout(qw, qz, s, g_idx, bits, "gptq_v2", cuda=True), W


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_cuda_layout_reads_back(bits):
    for case, L, W in layers(bits, seed=bits):
        assert torch.equal(kernels.cuda_layout_weight(L), W), case


@pytest.mark.slow
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_emulated_qgemm_matches_reference(emu, bits):
    seed = torch.seed() % 2**31  # fresh layers and activations every run; printed on failure
    split_seen = set()
    for case, L, W in layers(bits, seed):
        for M, dtype, sms in ((1, torch.float16, 132), (3, torch.bfloat16, 0), (16, torch.float16, 0),
                              (16, torch.bfloat16, 132), (1, torch.bfloat16, 132), (18, torch.float16, 4),
                              (5, torch.float32, 132)):
            x = torch.randn(M, case[0]).to(dtype)
            y, split = emu_qgemm(emu, x, L, sms)
            split_seen.add(split)
            err = rel_err(y, x.double() @ W.double())
            assert err < TOL[dtype], f"{case=} {M=} {dtype=} {sms=} seed={seed}: rel err {err:.2e}"
    assert split_seen == {True, False}  # both the one-slice and the K-split reduction ran


@pytest.mark.slow
def test_emulated_qgemm_is_deterministic(emu):
    """Blocks and threads run in a new random order every call: the K-split sum must not depend on it."""
    qw, qz, s, g_idx = random_layer(1024, 64, 128, True, 4, seed=5)
    L = kernels.make_layout(qw, qz, s, g_idx, 4, "gptq_v2", cuda=True)
    for dtype, M in ((torch.float16, 1), (torch.bfloat16, 16), (torch.float32, 2)):
        x = torch.randn(M, 1024).to(dtype) * 50
        ys = [emu_qgemm(emu, x, L, 132) for _ in range(4)]
        assert ys[0][1], "expected a K split"
        assert all(torch.equal(ys[0][0], y) for y, _ in ys[1:]), dtype


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
    bad = (*L.args[:8], 48, *L.args[9:])  # group_rows 48
    with pytest.raises(ValueError, match="group_rows=48"):
        emu.qgemm_workspace(bad, 1, 1, 132)
    x = torch.randn(1, 256).half()
    with pytest.raises(ValueError, match="workspace too small"):
        emu.qgemm(L.args, x.data_ptr(), 1, 1, x.data_ptr(), 0, 0, 0, 0, 132, 0)
