"""Reliability: every bad input gives one clean line and exit code 2 with nothing written; kill + resume gives the
same bytes; the same seed gives the same bytes; fuzzed checkpoint files only ever raise the project's clean errors."""
from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT, STORIES, WIKI_VALID
from minigptq.checkpoint_reader import CheckpointReader as Checkpoint, SafetensorsFile
from minigptq.loader import load_model

PY = [sys.executable, "-m"]


def cli(*args, timeout=300):
    return subprocess.run(PY + list(args), capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def assert_clean_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [line for line in r.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])


def copy_model(tmp_path, name="m") -> Path:
    dst = tmp_path / name
    shutil.copytree(STORIES, dst)
    return dst


def quant(model, out, *extra):
    return cli("minigptq.quantize", "--model", str(model), "--out", str(out), "--bits", "4", "--groupsize", "32",
               "--nsamples", "2", "--seqlen", "32", *extra)


def nothing_written(tmp_path, out):
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}")]


# -- bad input: one line, exit 2, nothing written ------------------------------------------------------------------

def test_missing_model_dir(tmp_path):
    r = quant(tmp_path / "nope", tmp_path / "q")
    assert_clean_error(r, "does not exist")
    nothing_written(tmp_path, tmp_path / "q")


def test_missing_config(tmp_path):
    m = copy_model(tmp_path)
    (m / "config.json").unlink()
    assert_clean_error(quant(m, tmp_path / "q"), "config.json not found")
    assert_clean_error(cli("minigptq.generate", "--model", str(m), "--prompt", "x"), "config.json not found")
    nothing_written(tmp_path, tmp_path / "q")


def test_unknown_model_type(tmp_path):
    m = copy_model(tmp_path)
    cfg = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt_neox")))
    assert_clean_error(quant(m, tmp_path / "q"), "gpt_neox", "supported: bloom, gemma2, gemma3, gemma3_text, llama, mistral")
    nothing_written(tmp_path, tmp_path / "q")


@pytest.mark.parametrize("damage", ["truncate", "header", "garbage"])
def test_corrupt_safetensors(tmp_path, damage):
    m = copy_model(tmp_path)
    f = m / "model.safetensors"
    data = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(data[:len(data) // 2])
    elif damage == "header":
        f.write_bytes(data[:8] + b"{not json" + data[17:])
    else:
        f.write_bytes(os.urandom(64))
    r = quant(m, tmp_path / "q")
    assert_clean_error(r, "model.safetensors")
    assert "corrupt" in r.stderr or "truncated" in r.stderr
    nothing_written(tmp_path, tmp_path / "q")


def _rewrite_tensors(path: Path, fn):
    from safetensors.torch import load_file, save_file
    sd = load_file(path)
    save_file(fn(sd), path, metadata={"format": "pt"})


def test_missing_and_misshapen_tensors(tmp_path):
    m = copy_model(tmp_path)
    _rewrite_tensors(m / "model.safetensors", lambda sd: {k: v for k, v in sd.items() if "layers.2.mlp.up" not in k})
    assert_clean_error(quant(m, tmp_path / "q"), "missing", "model.layers.2.mlp.up_proj.weight")
    m2 = copy_model(tmp_path, "m2")
    _rewrite_tensors(m2 / "model.safetensors",
                     lambda sd: dict(sd, **{"model.layers.1.self_attn.q_proj.weight": torch.zeros(64, 32)}))
    assert_clean_error(quant(m2, tmp_path / "q"), "model.layers.1.self_attn.q_proj.weight", "[64, 32]", "[64, 64]")
    m3 = copy_model(tmp_path, "m3")
    _rewrite_tensors(m3 / "model.safetensors", lambda sd: dict(sd, extra_thing=torch.zeros(3)))
    assert_clean_error(quant(m3, tmp_path / "q"), "unexpected", "extra_thing")
    nothing_written(tmp_path, tmp_path / "q")


@pytest.mark.parametrize("flags,needle", [(["--bits", "5"], "bits"), (["--groupsize", "0"], "group_size"),
                                          (["--groupsize", "-2"], "group_size")])
def test_bad_bits_and_groupsize(tmp_path, flags, needle):
    r = cli("minigptq.quantize", "--model", str(STORIES), "--out", str(tmp_path / "q"), *flags)
    assert_clean_error(r, needle)
    assert "2, 3, 4, 8" in r.stderr or "-1" in r.stderr
    nothing_written(tmp_path, tmp_path / "q")


@pytest.mark.parametrize("content,needle", [(None, "does not exist"), ("", "empty"), ("   \n\n", "empty"),
                                            ("once upon a time", "fewer than one window")])
def test_bad_calibration_file(tmp_path, content, needle):
    data = tmp_path / "calib.txt"
    if content is not None:
        data.write_text(content)
    assert_clean_error(quant(STORIES, tmp_path / "q", "--dataset", str(data)), needle)
    nothing_written(tmp_path, tmp_path / "q")


def test_nan_in_weights_names_the_layer(tmp_path):
    m = copy_model(tmp_path)

    def poison(sd):
        w = sd["model.layers.1.self_attn.v_proj.weight"].clone()
        w[3, 5] = float("nan")
        return dict(sd, **{"model.layers.1.self_attn.v_proj.weight": w})
    _rewrite_tensors(m / "model.safetensors", poison)
    r = quant(m, tmp_path / "q", "--dataset", str(WIKI_VALID))
    assert_clean_error(r, "NaN")
    assert "model.layers.1" in r.stderr
    nothing_written(tmp_path, tmp_path / "q")


def test_inf_activations_name_the_block(tmp_path):
    m = copy_model(tmp_path)
    _rewrite_tensors(m / "model.safetensors", lambda sd: dict(sd, **{
        "model.layers.0.post_attention_layernorm.weight": torch.full((64,), 3e38)}))  # overflows to inf in fp32
    r = quant(m, tmp_path / "q", "--dataset", str(WIKI_VALID), "--dtype", "fp32")  # fp16 storage would refuse first
    assert_clean_error(r, "non-finite activations", "block 0", "model.layers.0")
    nothing_written(tmp_path, tmp_path / "q")


def test_existing_out_is_refused(tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_clean_error(quant(STORIES, out), "already exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"


def test_quant_config_disagreeing_with_tensors(tmp_path):
    out = tmp_path / "q"
    assert quant(STORIES, out).returncode == 0
    for name in ("quantize_config.json", "config.json"):
        cfg = json.loads((out / name).read_text())
        if name == "config.json":
            cfg["quantization_config"]["bits"] = 3
        else:
            cfg["bits"] = 3
        (out / name).write_text(json.dumps(cfg))
    r = cli("minigptq.generate", "--model", str(out), "--prompt", "Once")
    assert_clean_error(r, "quantize_config", "bits=3")


def test_prompt_longer_than_context(tmp_path):
    r = cli("minigptq.generate", "--model", str(STORIES), "--prompt", "Once upon a time " * 200)
    assert_clean_error(r, "context is 512")


# -- atomic, resumable, deterministic -----------------------------------------------------------------------------

def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "quant_log.tsv"}  # the log has timings


def test_kill_and_resume_gives_identical_bytes(tmp_path):
    """SIGKILL a quantization run after its second block; --resume finishes it with the same bytes as a clean run."""
    args = ["--model", str(STORIES), "--bits", "3", "--groupsize", "32", "--dataset", str(WIKI_VALID),
            "--nsamples", "8", "--seqlen", "128", "--act-order"]
    clean = tmp_path / "clean"
    r = cli("minigptq.quantize", *args, "--out", str(clean))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "resumed"
    work = tmp_path / ".resumed.partial"
    p = subprocess.Popen(PY + ["minigptq.quantize", *args, "--out", str(out)], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:  # kill as soon as two blocks are recorded as finished
        state = work / "state.json"
        if state.exists() and len(json.loads(state.read_text() or "{}").get("blocks", {})) >= 2:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not out.exists(), "a killed run must not leave a checkpoint"
    assert work.exists()
    again = cli("minigptq.quantize", *args, "--out", str(out))
    assert_clean_error(again, "--resume")
    r = cli("minigptq.quantize", *args, "--out", str(out), "--resume")
    assert r.returncode == 0, r.stderr
    assert "resumed from block_0000" in r.stderr
    assert _files(out) == _files(clean)
    assert not work.exists()


def test_same_seed_same_bytes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        assert quant(STORIES, out, "--dataset", str(WIKI_VALID), "--no-sym").returncode == 0
    assert _files(a) == _files(b)
    c = tmp_path / "c"
    assert quant(STORIES, c, "--dataset", str(WIKI_VALID), "--no-sym", "--seed", "1").returncode == 0
    assert _files(a)["model.safetensors"] != _files(c)["model.safetensors"]


# -- untrusted files -------------------------------------------------------------------------------------------------

def test_pickle_checkpoints_never_run_code(tmp_path):
    m = copy_model(tmp_path)
    (m / "model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))
    torch.save({"x": Evil()}, m / "pytorch_model.bin")
    with pytest.raises(ValueError, match="weights-only"):
        Checkpoint(m)
    assert not (tmp_path / "pwned").exists()


def test_pytorch_bin_weights_load(tmp_path):
    m = copy_model(tmp_path)
    from safetensors.torch import load_file
    torch.save(load_file(m / "model.safetensors"), m / "pytorch_model.bin")
    (m / "model.safetensors").unlink()
    a = load_model(m, dtype="fp32")
    b = load_model(STORIES, dtype="fp32")
    tokens = torch.tensor([[1, 400, 30, 7]])
    with torch.inference_mode():
        assert torch.equal(a(tokens), b(tokens))


def _safetensors_bytes(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


VALID = _safetensors_bytes({"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
                            "b": {"dtype": "I32", "shape": [4], "data_offsets": [24, 40]}}, bytes(range(40)))

CASES = {"n": 0}


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(
    st.binary(max_size=200),  # random bytes
    st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)).map(  # one byte flipped
        lambda t: VALID[:t[0]] + bytes([t[1]]) + VALID[t[0] + 1:]),
    st.integers(0, len(VALID)).map(lambda n: VALID[:n]),  # truncated
    st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "I32", "F16", "X9", 3]),
                           "shape": st.lists(st.integers(-2, 5), max_size=3),
                           "data_offsets": st.lists(st.integers(-5, 60), max_size=3)}).map(
        lambda e: _safetensors_bytes({"t": e}, bytes(40))),
))
def test_fuzz_safetensors_reader(tmp_path_factory, blob):
    CASES["n"] += 1
    path = tmp_path_factory.getbasetemp() / "fuzz.safetensors"
    path.write_bytes(blob)
    try:
        f = SafetensorsFile(path)
        for k in f.keys():
            t = f.get(k)
            assert t.numel() * t.element_size() <= len(blob)
    except ValueError as e:
        assert str(path) in str(e)


UNPACK_CASES = {"n": 0}


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(bits=st.sampled_from([2, 3, 4, 8, 5]), K=st.integers(0, 96), N=st.integers(0, 40),
       rows=st.integers(0, 12), cols=st.integers(0, 12), groups=st.integers(0, 4), gmax=st.integers(-2, 6),
       seed=st.integers(0, 2**31 - 1), bias=st.booleans())
def test_fuzz_unpacker_and_quantlinear(bits, K, N, rows, cols, groups, gmax, seed, bias):
    """Random, often inconsistent packed tensors: unpacking and QuantLinear loading either work or raise ValueError."""
    from minigptq.pack import dequantize, unpack_cols, unpack_rows
    from minigptq.qlinear import QuantLinear
    UNPACK_CASES["n"] += 1
    g = torch.Generator().manual_seed(seed)
    qweight = torch.randint(-2**31, 2**31 - 1, (rows, N), generator=g, dtype=torch.int32)
    qzeros = torch.randint(-2**31, 2**31 - 1, (groups, cols), generator=g, dtype=torch.int32)
    scales = torch.rand(groups, N, generator=g).half()
    g_idx = torch.randint(min(gmax, 0), max(gmax, 1), (K,), generator=g, dtype=torch.int32)
    try:
        q = unpack_rows(qweight, bits, K)
        assert q.shape == (K, N) and (q.numel() == 0 or (0 <= int(q.min()) and int(q.max()) < 2**bits))
        z = unpack_cols(qzeros, bits, N)
        assert z.shape == (groups, N)
        w = dequantize(qweight, qzeros, scales, g_idx, bits, "gptq")
        assert w.shape == (K, N)
    except ValueError as e:
        assert str(e)
    try:
        ql = QuantLinear(K, N, bits, 32, bias, dtype=torch.float16)
        state = {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx}
        if bias:
            state["bias"] = torch.zeros(N, dtype=torch.float16)
        for name, value in state.items():
            setattr(ql, name, value)
        ql.post_load()
        y = ql(torch.randn(2, K, generator=g))
        assert y.shape == (2, N) and torch.isfinite(y).all()
    except ValueError as e:
        assert str(e)


def test_fuzz_report():
    """Runs after the fuzz tests (file order): report how many cases ran."""
    print(f"\nfuzzed the safetensors reader with {CASES['n']} inputs and the unpacker/QuantLinear with "
          f"{UNPACK_CASES['n']}")
    assert CASES["n"] >= 300 and UNPACK_CASES["n"] >= 300
