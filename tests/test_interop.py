"""Interop both ways with the peer stack (transformers + optimum + GPTQModel in .venv-peer, torch backend, CPU):
checkpoints minigptq writes give the same logits there, checkpoints GPTQModel writes give the same logits here."""
from __future__ import annotations

import itertools
import json
import os
import subprocess

import pytest
import torch

from conftest import PEER_PY, ROOT, STORIES, WIKI_VALID
from minigptq import load_model, load_tokenizer
from minigptq.data import calibration_windows, tokenize_file
from minigptq.qlinear import QuantLinear
from minigptq.quantize import quantize_model
from minigptq.quantizer import QuantConfig

pytestmark = [pytest.mark.peer, pytest.mark.skipif(not PEER_PY.exists(), reason="peer venv .venv-peer not installed "
                                                   "(bash ../shared/tools/install_peer.sh .venv-peer)")]
TOL = 2e-2  # fp16 tolerance, relative to the logits' scale: the peers compute in fp16, minigptq in fp32


def run_peer(jobs, tmp_path):
    f = tmp_path / f"jobs-{len(list(tmp_path.glob('jobs-*')))}.json"
    f.write_text(json.dumps(jobs))
    r = subprocess.run([str(PEER_PY), str(ROOT / "tests" / "peer_check.py"), str(f)], capture_output=True, text=True,
                       timeout=1200, cwd=tmp_path, env=dict(os.environ, GPTQMODEL_CPU_WORKERS="2"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def ours(path, tokens):
    """minigptq's logits with the exact kernels: the checkpoint's arithmetic, as the other tools compute it (the
    int8-activation kernels, the default where the CPU runs them, differ by their own ~0.4% in perplexity)."""
    with torch.inference_mode():
        return load_model(path, dtype="fp32", cpu_kernel="exact")(tokens).float()


def check_close(a, b, what):
    diff, scale = (a - b).abs().max().item(), max(1.0, b.abs().max().item())
    assert diff < TOL * scale, f"{what}: max |logit diff| {diff:.4g} >= {TOL} x {scale:.3g}"
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.95, what


COMBOS = list(itertools.product([4, 3], [True, False], [False, True]))  # bits, sym, act_order


def loaders(sym: bool, fmt: str) -> tuple[str, ...]:
    # GPTQModel refuses asymmetric v1 ("gptq") files written by any tool but itself (old AutoGPTQ ones wrapped
    # zero - 1); minigptq's never wrap, and --format gptq_v2 is the form GPTQModel takes from others.
    return ("transformers", "gptqmodel") if sym or fmt == "gptq_v2" else ("transformers",)


def test_minigptq_checkpoints_load_in_transformers_and_gptqmodel(hf_checkpoints, tmp_path):
    src = hf_checkpoints("llama-gqa-tied")
    calib = tmp_path / "calib.txt"
    calib.write_text(WIKI_VALID.read_text()[:20000])
    tokens = torch.randint(3, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    torch.save(tokens, tmp_path / "tokens.pt")
    jobs, outs = [], {}
    for (bits, sym, act), fmt in itertools.product(COMBOS, ("gptq", "gptq_v2")):
        if fmt == "gptq_v2" and sym:
            continue  # v2 matters only for asymmetric zero points
        name = f"q{bits}-{'sym' if sym else 'asym'}-{'act' if act else 'noact'}-{fmt}"
        out = quantize_model(src, tmp_path / name, qcfg=QuantConfig(bits=bits, group_size=32, sym=sym, act_order=act),
                             dataset=calib, nsamples=4, seqlen=64, fmt=fmt, log=lambda m: None)
        outs[name] = (out, loaders(sym, fmt))
        for loader in loaders(sym, fmt):
            jobs.append({"op": "logits", "loader": loader, "model": str(out), "tokens": str(tmp_path / "tokens.pt"),
                         "out": str(tmp_path / f"{name}-{loader}.pt")})
    log = run_peer(jobs, tmp_path)
    loaded = [line for line in log.splitlines() if "packed_layers=" in line]
    assert len(loaded) == len(jobs) and all("packed_layers=14 " in line for line in loaded), loaded  # the peers really loaded 2 x 7 packed layers
    for name, (out, peers) in outs.items():
        mine = ours(out, tokens)
        for loader in peers:
            check_close(mine, torch.load(tmp_path / f"{name}-{loader}.pt"), f"{name} in {loader}")


@pytest.mark.parametrize("kind", ["opt", "bloom"])
def test_opt_bloom_checkpoints_load_in_transformers(hf_checkpoints, tmp_path, kind):
    src = hf_checkpoints(kind)
    calib = tmp_path / "calib.txt"
    calib.write_text(WIKI_VALID.read_text()[:20000])
    out = quantize_model(src, tmp_path / "q", qcfg=QuantConfig(bits=4, group_size=32), dataset=calib, nsamples=4,
                         seqlen=64, log=lambda m: None)
    tokens = torch.randint(3, 512, (1, 32), generator=torch.Generator().manual_seed(1))
    torch.save(tokens, tmp_path / "tokens.pt")
    run_peer([{"op": "logits", "loader": "transformers", "model": str(out), "tokens": str(tmp_path / "tokens.pt"),
               "out": str(tmp_path / "peer.pt")}], tmp_path)
    check_close(ours(out, tokens), torch.load(tmp_path / "peer.pt"), f"{kind} in transformers")


def test_partially_quantized_stories260k_loads_in_peers(tmp_path):
    """Layers left in fp16 (not packable) are recorded so that the peers leave them as plain linears too."""
    out = quantize_model(STORIES, tmp_path / "q", qcfg=QuantConfig(bits=4, group_size=32), dataset=WIKI_VALID,
                         nsamples=4, seqlen=64, log=lambda m: None)
    tokens = torch.tensor([load_tokenizer(STORIES).encode("Once upon a time there was a")])
    torch.save(tokens, tmp_path / "tokens.pt")
    run_peer([{"op": "logits", "loader": loader, "model": str(out), "tokens": str(tmp_path / "tokens.pt"),
               "out": str(tmp_path / f"{loader}.pt")} for loader in ("transformers", "gptqmodel")], tmp_path)
    for loader in ("transformers", "gptqmodel"):
        check_close(ours(out, tokens), torch.load(tmp_path / f"{loader}.pt"), f"stories260k in {loader}")


def gptqmodel_checkpoint(src, tmp_path, bits: int, sym: bool, desc_act: bool, seed: int):
    """GPTQModel quantizes `src` (8 windows of 64 tokens, group 32) -> (its checkpoint, tokens, its logits on them)."""
    calib = calibration_windows(tokenize_file(WIKI_VALID, load_tokenizer(src)), 8, 64, seed=0)
    torch.save(calib, tmp_path / "calib.pt")
    tokens = torch.randint(3, 512, (2, 40), generator=torch.Generator().manual_seed(seed))
    torch.save(tokens, tmp_path / "tokens.pt")
    out = tmp_path / "peer-q"
    run_peer([{"op": "quantize", "model": str(src), "out": str(out), "calib": str(tmp_path / "calib.pt"),
               "bits": bits, "group_size": 32, "sym": sym, "desc_act": desc_act},
              {"op": "logits", "loader": "gptqmodel", "model": str(out), "tokens": str(tmp_path / "tokens.pt"),
               "out": str(tmp_path / "peer.pt")}], tmp_path)
    return out, tokens, torch.load(tmp_path / "peer.pt")


@pytest.mark.parametrize("bits,sym,desc_act", [(4, True, False), (3, False, True)])
def test_gptqmodel_checkpoints_load_in_minigptq(hf_checkpoints, tmp_path, bits, sym, desc_act):
    out, tokens, peer = gptqmodel_checkpoint(hf_checkpoints("llama-gqa-tied"), tmp_path, bits, sym, desc_act, seed=2)
    model = load_model(out, dtype="fp32")
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    check_close(ours(out, tokens), peer, f"GPTQModel {bits}-bit checkpoint in minigptq")


@pytest.mark.parametrize("bits", [3, 4])
def test_gptqmodel_asymmetric_checkpoint_with_wrapped_zero_points(hf_checkpoints, tmp_path, bits):
    """GPTQModel's asymmetric v1 checkpoint whose zero points include 0 (stored wrapped, as -1): minigptq must give
    GPTQModel's logits. Some weight groups are made all-positive so that their zero point is 0."""
    import shutil
    from safetensors.torch import load_file, save_file
    from minigptq.pack import unpack_cols, zero_points
    src = tmp_path / "src"
    shutil.copytree(hf_checkpoints("llama-gqa-tied"), src)
    sd = load_file(src / "model.safetensors")
    for name in sd:
        if name.endswith(("q_proj.weight", "up_proj.weight", "down_proj.weight")):
            sd[name][:24, :32] = sd[name][:24, :32].abs()  # rows 0-23, first group of 32 inputs: min >= 0 -> zero 0
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    out, tokens, peer = gptqmodel_checkpoint(src, tmp_path, bits, False, False, seed=3)
    qcfg = json.loads((out / "quantize_config.json").read_text())
    assert qcfg.get("checkpoint_format", qcfg.get("format")) == "gptq" and qcfg["sym"] is False, qcfg
    q = load_file(out / "model.safetensors")
    qz = q["model.layers.0.self_attn.q_proj.qzeros"]
    N = q["model.layers.0.self_attn.q_proj.scales"].shape[1]
    zeros = zero_points(qz, bits, N, "gptq")
    assert int((zeros[0, :24] == 0).sum()) >= 12, zeros[0, :24]  # the wrapped fields are really there
    assert not torch.equal(unpack_cols(qz, bits, N) + 1, zeros)  # ... and the naive reading gets them wrong
    check_close(ours(out, tokens), peer, f"GPTQModel asym {bits}-bit wrapped zeros")
