"""The hostile-input matrix: bad config fields, broken tokenizer files, bad weights, damaged GPTQ tensors, bad flags,
dangerous output locations, signals, concurrent runs and tampered resumes.

Every case asserts the exit code, that stderr holds exactly one `error:` line and no traceback, and that nothing in
the case's folder changed except what the run may own (the checkpoint it was asked to write on success, its own
work folder after an interruption). The commands run in-process through the same `cli.run` as the real CLIs (fast);
the signal and concurrency cases run real processes.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
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
from safetensors.torch import load_file, save_file

from conftest import ROOT, STORIES, WIKI_VALID
from minigptq.cli import run as cli_run

CASES: list = []  # (id, kind, setup, argv, code, needles)
EMB, NORM, V = "model.embed_tokens.weight", "model.norm.weight", "model.layers.1.self_attn.v_proj.weight"


# -- running a command and checking what it left -------------------------------------------------------------------

def run_out(module: str, argv: list[str]) -> tuple[int, str, str]:
    """Run `python -m minigptq.<module> argv` in this process -> (exit code, stdout, stderr)."""
    mod = importlib.import_module(f"minigptq.{module}")
    err, out = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            cli_run(mod.main, mod.parser(), argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def run_cli(module: str, argv: list[str]) -> tuple[int, str]:
    """Run `python -m minigptq.<module> argv` in this process -> (exit code, stderr)."""
    code, _, err = run_out(module, argv)
    return code, err


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root -> what it is (file digest and mode, folder, link target)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", p.stat().st_mode & 0o7777)
            else:
                out[rel] = ("file", p.stat().st_mode & 0o7777, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def assert_one_error(code: int, stderr: str, want_code: int, needles=()):
    assert code == want_code, (code, stderr[-3000:])
    if want_code == 0:
        assert "Traceback" not in stderr and "error:" not in stderr, stderr[-3000:]
        return
    lines = [ln for ln in stderr.splitlines() if "error:" in ln]  # ours start with it; argparse's say "prog: error:"
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


# -- building the inputs -------------------------------------------------------------------------------------------

def model_copy(root: Path, name: str = "m") -> Path:
    dst = root / name
    shutil.copytree(STORIES, dst)
    for p in [dst, *dst.iterdir()]:
        p.chmod(0o755 if p.is_dir() else 0o644)  # the shared copy is read-only
    return dst


def edit_config(folder: Path, fn, name="config.json"):
    path = folder / name
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps(fn(cfg)))


def edit_tensors(folder: Path, fn, name="model.safetensors"):
    sd = load_file(folder / name)
    save_file(fn(sd), folder / name, metadata={"format": "pt"})


def calib_file(root: Path) -> Path:
    f = root / "calib.txt"
    if not f.exists():
        f.write_text(WIKI_VALID.read_text()[:60000])
    return f


def quant_argv(root: Path, m: Path, out: Path, *extra) -> list[str]:
    return ["--model", str(m), "--out", str(out), "--bits", "4", "--groupsize", "32", "--nsamples", "2",
            "--seqlen", "32", "--dataset", str(root / "calib.txt"), *extra]


def case(id, command, setup, extra=(), code=2, needles=(), out="q"):
    """Register a case: setup(root, model) mutates the model copy (or the folder) before the command runs."""
    CASES.append(pytest.param(command, setup, list(extra), code, list(needles), out, id=id))


# -- config.json -----------------------------------------------------------------------------------------------------

def set_field(key, value):
    def setup(root, m):
        edit_config(m, lambda c: {**c, key: value})
    return setup


def del_field(key):
    def setup(root, m):
        edit_config(m, lambda c: {k: v for k, v in c.items() if k != key})
    return setup


for key, value, needle in [
    ("model_type", 5, "model_type"), ("model_type", ["llama"], "model_type"), ("model_type", None, "model_type"),
    ("model_type", "gpt2", "gpt2"), ("model_type", "", "supported"),
    ("hidden_size", -64, "hidden_size"), ("hidden_size", 0, "hidden_size"), ("hidden_size", "64", "hidden_size"),
    ("hidden_size", 64.0, "hidden_size"), ("hidden_size", 10**12, "hidden_size"), ("hidden_size", True, "hidden_size"),
    ("hidden_size", 96, "expected [512, 96]"), ("hidden_size", 60, "num_attention_heads"),
    ("num_attention_heads", 0, "num_attention_heads"), ("num_attention_heads", -8, "num_attention_heads"),
    ("num_attention_heads", "8", "num_attention_heads"), ("num_attention_heads", 7, "num_attention_heads"),
    ("num_key_value_heads", 3, "num_kv_heads"), ("num_key_value_heads", 0, "num_key_value_heads"),
    ("num_key_value_heads", 2.5, "num_key_value_heads"),
    ("num_hidden_layers", 0, "num_hidden_layers"), ("num_hidden_layers", -1, "num_hidden_layers"),
    ("num_hidden_layers", 10**9, "num_hidden_layers"), ("num_hidden_layers", 6, "missing"),
    ("num_hidden_layers", 4, "unexpected"),
    ("intermediate_size", 0, "intermediate_size"), ("intermediate_size", "big", "intermediate_size"),
    ("vocab_size", 0, "vocab_size"), ("vocab_size", -512, "vocab_size"), ("vocab_size", 10**12, "vocab_size"),
    ("vocab_size", 1024, "model.embed_tokens.weight"),
    ("max_position_embeddings", 0, "max_position_embeddings"), ("max_position_embeddings", "512", "max_position"),
    ("hidden_act", "swiglu9", "hidden_act"), ("hidden_act", 3, "hidden_act"),
    ("rope_scaling", "linear", "rope_scaling"), ("rope_scaling", {"rope_type": "ntk-by-parts", "factor": 2.0}, "RoPE"),
    ("rope_scaling", [1, 2], "rope_scaling"), ("rope_theta", -1, "rope_theta"), ("rope_theta", "1e4", "rope_theta"),
    ("rope_theta", 0, "rope_theta"), ("rms_norm_eps", "1e-5", "rms_norm_eps"), ("rms_norm_eps", -1e-5, "rms_norm_eps"),
    ("rms_norm_eps", 5.0, "rms_norm_eps"), ("tie_word_embeddings", "yes", "tie_word_embeddings"),
    ("tie_word_embeddings", False, "lm_head.weight"), ("attention_bias", "no", "attention_bias"),
    ("attention_bias", True, "missing"), ("mlp_bias", 1, "mlp_bias"),
    ("bos_token_id", 10**6, "bos_token_id"), ("bos_token_id", "1", "bos_token_id"),
    ("eos_token_id", 600, "eos_token_id"), ("eos_token_id", [2, "x"], "eos_token_id"),
    ("eos_token_id", {"id": 2}, "eos_token_id"), ("pad_token_id", 9999, "pad_token_id"),
    ("head_dim", 7, "head_dim"), ("head_dim", "8", "head_dim"), ("sliding_window", "big", "sliding_window"),
    ("torch_dtype", 5, "torch_dtype"),
]:
    case(f"config-{key}={json.dumps(value)[:20]}", "quantize", set_field(key, value), needles=[needle])

for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size"):
    case(f"config-missing-{key}", "quantize", del_field(key), needles=[key, "missing"])


def raw_config(text: bytes):
    def setup(root, m):
        (m / "config.json").write_bytes(text)
    return setup


for name, text, needle in [("list", b"[]", "JSON object"), ("string", b'"llama"', "JSON object"),
                           ("invalid", b"{model_type: llama", "not valid JSON"), ("empty", b"", "not valid JSON"),
                           ("binary", bytes(range(256)), "config.json"), ("nan-theta", None, "rope_theta")]:
    if text is None:
        case(f"config-{name}", "quantize", lambda root, m: (m / "config.json").write_text(
            (m / "config.json").read_text().replace("10000.0", "NaN")), needles=[needle])
    else:
        case(f"config-{name}", "quantize", raw_config(text), needles=[needle])
case("config-is-a-folder", "quantize", lambda root, m: ((m / "config.json").unlink(), (m / "config.json").mkdir()),
     needles=["config.json"])
case("config-missing", "quantize", lambda root, m: (m / "config.json").unlink(), needles=["config.json not found"])
for key, value in [("hidden_size", "64"), ("eos_token_id", 600), ("model_type", 5)]:
    case(f"config-generate-{key}", "generate", set_field(key, value), needles=[key])
    case(f"config-eval-{key}", "eval", set_field(key, value), needles=[key])

# -- tokenizer files -----------------------------------------------------------------------------------------------


def write_file(name: str, data: bytes | str):
    def setup(root, m):
        p = m / name
        p.write_bytes(data.encode() if isinstance(data, str) else data)
    return setup


for cmd in ("quantize", "generate"):
    case(f"tokenizer-model-garbage-{cmd}", cmd, write_file("tokenizer.model", os.urandom(300)),
         needles=["tokenizer.model", "corrupt"])
    case(f"tokenizer-model-empty-{cmd}", cmd, write_file("tokenizer.model", b""), needles=["tokenizer.model"])
    case(f"tokenizer-json-garbage-{cmd}", cmd, write_file("tokenizer.json", "{not json"), needles=["tokenizer.json"])
    case(f"tokenizer-config-list-{cmd}", cmd, write_file("tokenizer_config.json", "[1, 2]"),
         needles=["tokenizer_config.json", "JSON object"])
    case(f"generation-config-string-{cmd}", cmd, write_file("generation_config.json", '"x"'),
         needles=["generation_config.json"])
case("tokenizer-model-truncated", "quantize",
     lambda root, m: (m / "tokenizer.model").write_bytes((STORIES / "tokenizer.model").read_bytes()[:100]),
     needles=["tokenizer.model"])
case("tokenizer-json-wrong-schema", "quantize", write_file("tokenizer.json", '{"model": 5}'), needles=["tokenizer.json"])
case("tokenizer-config-invalid-json", "quantize", write_file("tokenizer_config.json", "{"),
     needles=["tokenizer_config.json", "not valid JSON"])
case("tokenizer-add-bos-string", "quantize",
     lambda root, m: edit_config(m, lambda c: {**c, "add_bos_token": "yes"}, "tokenizer_config.json"),
     needles=["add_bos_token"])
case("tokenizer-missing", "quantize", lambda root, m: (m / "tokenizer.model").unlink(), needles=["no tokenizer"])
case("tokenizer-is-a-folder", "quantize", lambda root, m: ((m / "tokenizer.model").unlink(),
                                                           (m / "tokenizer.model").mkdir()), needles=["tokenizer.model"])
case("tokenizer-bigger-than-model", "quantize", lambda root, m: (
    edit_config(m, lambda c: {**c, "vocab_size": 256}), edit_tensors(m, lambda sd: {**sd, EMB: sd[EMB][:256]})),
     needles=["vocabulary has 256"])
# side-file values that are odd but harmless are tolerated: the run succeeds
case("generation-config-odd-eos-ok", "quantize", write_file("generation_config.json", '{"eos_token_id": "x"}'),
     code=0)
case("tokenizer-config-bos-number-ok", "quantize",
     lambda root, m: edit_config(m, lambda c: {**c, "bos_token": 5}, "tokenizer_config.json"), code=0)

# -- weights ---------------------------------------------------------------------------------------------------------


def set_tensor(name, fn):
    def setup(root, m):
        edit_tensors(m, lambda sd: {**sd, name: fn(sd[name])})
    return setup


def poke(t, value, where=(0,)):
    t = t.clone()
    t.view(-1)[where[0]] = value
    return t


for id, name, fn, needle in [
    ("nan-embedding", EMB, lambda t: poke(t, float("nan")), EMB),
    ("inf-final-norm", NORM, lambda t: poke(t, float("inf")), NORM),
    ("nan-block-weight", V, lambda t: poke(t, float("nan")), V),
    ("fp16-overflow-norm", NORM, lambda t: poke(t, 1e6), "--dtype"),
    ("fp16-overflow-embedding", EMB, lambda t: poke(t, -7e4), "--dtype"),
    ("int64-weight", V, lambda t: t.to(torch.int64), "int64"),
    ("bool-weight", NORM, lambda t: t > 0, "bool"),
    ("int32-embedding", EMB, lambda t: t.to(torch.int32), "int32"),
    ("wrong-shape", V, lambda t: t[:16], "[16, 64]"),
    ("transposed", "model.layers.0.mlp.up_proj.weight", lambda t: t.T.contiguous(), "up_proj"),
]:
    case(f"weights-{id}", "quantize", set_tensor(name, fn), needles=[needle])
case("weights-extra-tensor", "quantize", lambda root, m: edit_tensors(m, lambda sd: {**sd, "evil": torch.zeros(2)}),
     needles=["unexpected", "evil"])
case("weights-missing-tensor", "quantize",
     lambda root, m: edit_tensors(m, lambda sd: {k: v for k, v in sd.items() if k != NORM}), needles=["missing", NORM])
case("weights-nan-generate", "generate", set_tensor(NORM, lambda t: poke(t, float("nan"))), needles=[NORM, "NaN"])
case("weights-fp16-overflow-generate", "generate", set_tensor(NORM, lambda t: poke(t, 1e6)),
     extra=["--dtype", "fp16"], needles=["overflow", "fp32"])
case("weights-fp16-overflow-kept-in-fp32", "quantize", set_tensor(NORM, lambda t: poke(t, 1e6)),
     extra=["--dtype", "fp32"], code=0)
case("weights-f64-ok", "quantize", lambda root, m: edit_tensors(m, lambda sd: {k: v.double() for k, v in sd.items()}),
     code=0)


def raw_weights(fn):
    def setup(root, m):
        f = m / "model.safetensors"
        f.write_bytes(fn(f.read_bytes()))
    return setup


def header(data: bytes, edit) -> bytes:
    n = struct.unpack("<Q", data[:8])[0]
    h = edit(json.loads(data[8:8 + n]))
    hb = json.dumps(h).encode()
    return struct.pack("<Q", len(hb)) + hb + data[8 + n:]


for id, fn, needle in [
    ("truncated", lambda d: d[:len(d) // 2], "model.safetensors"),
    ("empty", lambda d: b"", "too short"),
    ("garbage", lambda d: os.urandom(4096), "model.safetensors"),
    ("huge-header-length", lambda d: struct.pack("<Q", 2**62) + d[8:], "header length"),
    ("header-not-json", lambda d: d[:8] + b"{" * 8 + d[16:], "not valid JSON"),
    ("header-list", lambda d: struct.pack("<Q", 2) + b"[]", "JSON object"),
    ("overlapping-offsets", lambda d: header(d, lambda h: {k: (dict(v, data_offsets=[0, v["data_offsets"][1]
                                                                                      - v["data_offsets"][0]])
                                                           if k != "__metadata__" else v) for k, v in h.items()}),
     "overlap"),
    ("offsets-past-end", lambda d: header(d, lambda h: {k: (dict(v, data_offsets=[10**9, 10**9 + 1])
                                                            if k == NORM else v) for k, v in h.items()}), NORM),
    ("unknown-dtype", lambda d: header(d, lambda h: {k: (dict(v, dtype="F8_E4M3") if k == NORM else v)
                                                      for k, v in h.items()}), NORM),
    ("negative-shape", lambda d: header(d, lambda h: {k: (dict(v, shape=[-64]) if k == NORM else v)
                                                       for k, v in h.items()}), NORM),
]:
    case(f"safetensors-{id}", "quantize", raw_weights(fn), needles=[needle])
    if id in ("truncated", "garbage"):
        case(f"safetensors-{id}-generate", "generate", raw_weights(fn), needles=[needle])
case("safetensors-is-a-folder", "quantize",
     lambda root, m: ((m / "model.safetensors").unlink(), (m / "model.safetensors").mkdir()), needles=["weights"])
case("model-is-a-file", "quantize", lambda root, m: (shutil.rmtree(m), m.write_text("x")), needles=["not a folder"])
case("weights-none", "quantize", lambda root, m: (m / "model.safetensors").unlink(), needles=["no weights"])


def sharded(weight_map_fn):
    def setup(root, m):
        sd = load_file(m / "model.safetensors")
        (m / "model.safetensors").unlink()
        names = sorted(sd)
        half = len(names) // 2
        for i, part in enumerate((names[:half], names[half:]), 1):
            save_file({k: sd[k] for k in part}, m / f"model-0000{i}-of-00002.safetensors", metadata={"format": "pt"})
        wm = {k: f"model-0000{1 if j < half else 2}-of-00002.safetensors" for j, k in enumerate(names)}
        (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map_fn(wm, root)}))
    return setup


case("index-parent-path", "quantize", sharded(lambda wm, root: {**wm, NORM: "../outside.safetensors"}),
     needles=["../outside.safetensors", "plain file names"])
case("index-absolute-path", "quantize", sharded(lambda wm, root: {**wm, NORM: str(root / "x.safetensors")}),
     needles=["plain file names"])
case("index-subfolder", "quantize", sharded(lambda wm, root: {**wm, NORM: "sub/x.safetensors"}),
     needles=["plain file names"])
case("index-missing-shard", "quantize", sharded(lambda wm, root: {**wm, NORM: "model-00009-of-00009.safetensors"}),
     needles=["does not exist"])
case("index-not-a-map", "quantize", sharded(lambda wm, root: list(wm)), needles=["weight_map"])
case("index-number-name", "quantize", sharded(lambda wm, root: {**wm, NORM: 5}), needles=["plain file names"])
case("index-ok", "quantize", sharded(lambda wm, root: wm), code=0)


def pickle_bin(evil: bool):
    def setup(root, m):
        (m / "model.safetensors").unlink()
        if evil:
            class Evil:
                def __reduce__(self):
                    return (os.system, (f"touch {root / 'pwned'}",))
            torch.save({"x": Evil()}, m / "pytorch_model.bin")
        else:
            (m / "pytorch_model.bin").write_bytes(os.urandom(500))
    return setup


case("pickle-runs-code", "quantize", pickle_bin(True), needles=["weights-only"])
case("pickle-garbage", "quantize", pickle_bin(False), needles=["pytorch_model.bin"])

# -- flags -----------------------------------------------------------------------------------------------------------

noop = lambda root, m: None  # noqa: E731
for extra, needle in [
    (["--bits", "5"], "bits"), (["--bits", "4.5"], "--bits"), (["--bits", "0"], "bits"),
    (["--groupsize", "0"], "group_size"), (["--groupsize", "-7"], "group_size"), (["--percdamp", "0"], "percdamp"),
    (["--percdamp", "nan"], "percdamp"), (["--percdamp", "2"], "percdamp"), (["--blocksize", "0"], "blocksize"),
    (["--nsamples", "0"], "nsamples"), (["--nsamples", "1000000000"], "memory"), (["--seqlen", "1"], "seqlen"),
    (["--seed", "-1"], "seed"), (["--dtype", "fp8"], "--dtype"), (["--format", "gptq_v3"], "--format"),
    (["--method", "awq"], "--method"), (["--device", "tpu"], "--device"), (["--unknown-flag"], "unrecognized"),
    (["--static-groups", "--bits", "7"], "bits"), (["--target", "vllm", "--bits", "3"], "--target vllm"),
    (["--target", "vllm", "--groupsize", "48"], "--groupsize 48"), (["--target", "tgi"], "--target"),
]:
    case(f"flags-quantize-{'_'.join(extra)[:30]}", "quantize", noop, extra=extra, needles=[needle])
if not torch.cuda.is_available():
    case("flags-quantize-cuda-without-gpu", "quantize", noop, extra=["--device", "cuda"], needles=["CUDA"])
    case("flags-generate-cuda-without-gpu", "generate", noop, extra=["--device", "cuda"], needles=["CUDA"])
for id, setup, needle in [
    ("missing", lambda root, m: (root / "calib.txt").unlink(), "does not exist"),
    ("empty", lambda root, m: (root / "calib.txt").write_text(""), "empty"),
    ("too-short", lambda root, m: (root / "calib.txt").write_text("Once upon a time."), "fewer than one window"),
    ("folder", lambda root, m: ((root / "calib.txt").unlink(), (root / "calib.txt").mkdir()), "calib.txt"),
]:
    case(f"flags-dataset-{id}", "quantize", setup, needles=[needle])


case("flags-dataset-jsonl-bad-line", "quantize", lambda root, m: (root / "c.jsonl").write_text('{"text": "a"}\n{oops\n'),
     extra=["--dataset", "{root}/c.jsonl"], needles=["c.jsonl:2"])
case("flags-dataset-jsonl-no-text", "quantize", lambda root, m: (root / "c.jsonl").write_text('{"body": "a"}\n'),
     extra=["--dataset", "{root}/c.jsonl"], needles=["text"])
for extra, needle in [
    (["--max-new-tokens", "0"], "max_new_tokens"), (["--temperature", "nan"], "temperature"),
    (["--temperature", "-1"], "temperature"), (["--temperature", "inf"], "temperature"), (["--top-p", "0"], "top_p"),
    (["--top-p", "1.5"], "top_p"), (["--top-p", "nan"], "top_p"), (["--top-k", "-1"], "top_k"),
    (["--head-dtype", "int4"], "--head-dtype"), (["--prompt", "Once upon a time " * 200], "context is 512"),
    (["--max-new-tokens", "x"], "--max-new-tokens"), (["--dtype", "fp64"], "--dtype"),
]:
    case(f"flags-generate-{'_'.join(extra)[:30]}", "generate", noop, extra=extra, needles=[needle])
for extra, needle in [
    (["--max-windows", "0"], "max-windows"), (["--max-windows", "-3"], "max-windows"), (["--seqlen", "1"], "seqlen"),
    (["--dataset", "{root}/none.txt"], "does not exist"), (["--dataset", "{root}"], "not a file"),
]:
    case(f"flags-eval-{'_'.join(extra)[:30]}", "eval", noop, extra=extra, needles=[needle])
case("flags-eval-text-shorter-than-a-window", "eval", lambda root, m: (root / "s.txt").write_text("Once upon a time"),
     extra=["--dataset", "{root}/s.txt"], needles=["fewer than one window"])


# -- output locations ----------------------------------------------------------------------------------------------

def mk_checkpoint_like(root, m, extra_file=None):
    """A folder that looks like a minigptq checkpoint (its marker), optionally with a user's file in it."""
    q = root / "q"
    q.mkdir()
    (q / "quantize_config.json").write_text(json.dumps({"meta": {"quantizer": ["minigptq:0.1.0"]}}))
    (q / "model.safetensors").write_bytes(b"old")
    if extra_file:
        (q / extra_file).write_text("user data")


for id, setup, extra, out, needle in [
    ("is-model", noop, ["--overwrite"], "m", "is the model folder"),
    ("parent-of-model", lambda root, m: None, ["--overwrite"], "{root}", "contains the model folder"),
    ("dot", noop, [], ".", "--out"),
    ("dotdot", noop, ["--overwrite"], "..", "--out"),
    ("empty-string", noop, [], "", "--out"),
    ("existing-file", lambda root, m: (root / "q").write_text("mine"), ["--overwrite"], "q", "not a folder"),
    ("dangling-symlink", lambda root, m: (root / "q").symlink_to(root / "nowhere"), [], "q", "symbolic link"),
    ("symlink-to-folder", lambda root, m: ((root / "d").mkdir(), (root / "q").symlink_to(root / "d")), ["--overwrite"],
     "q", "symbolic link"),
    ("foreign-folder-overwrite", lambda root, m: ((root / "q").mkdir(), (root / "q" / "notes.txt").write_text("x")),
     ["--overwrite"], "q", "not a checkpoint minigptq wrote"),
    ("foreign-folder", lambda root, m: (root / "q").mkdir(), [], "q", "already exists"),
    ("hf-model-as-out", lambda root, m: shutil.copytree(m, root / "q"), ["--overwrite"], "q",
     "not a checkpoint minigptq wrote"),
    ("ours-with-user-file", lambda root, m: mk_checkpoint_like(root, m, "notes.txt"), ["--overwrite"], "q",
     "notes.txt"),
    ("ours-with-subfolder", lambda root, m: (mk_checkpoint_like(root, m), (root / "q" / "sub").mkdir()),
     ["--overwrite"], "q", "sub"),
    ("ours-without-overwrite", lambda root, m: mk_checkpoint_like(root, m), [], "q", "--overwrite"),
    ("parent-is-a-file", lambda root, m: (root / "f").write_text("x"), [], "f/q", "f"),
    ("leftover-partial", lambda root, m: ((root / ".q.partial").mkdir(),
                                          (root / ".q.partial" / "state.json").write_text("{}")), [], "q", "--resume"),
]:
    case(f"out-{id}", "quantize", setup, extra=extra, needles=[needle], out=out)
case("out-ours-overwrite-ok", "quantize", lambda root, m: mk_checkpoint_like(root, m), extra=["--overwrite"], code=0)
case("out-new-parents-ok", "quantize", noop, code=0, out="a/b/q")
case("out-inside-model-ok", "quantize", noop, code=0, out="m/q")


# -- damaged GPTQ checkpoints ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gptq_ckpt(tmp_path_factory):
    """A 4-bit stories260k checkpoint written by minigptq (with act-order so g_idx matters)."""
    root = tmp_path_factory.mktemp("gptq")
    out = root / "q"
    calib_file(root)
    code, err = run_cli("quantize", quant_argv(root, STORIES, out, "--act-order", "--groupsize", "16"))
    assert code == 0, err
    return out


GPTQ_CASES: list = []
Q = "model.layers.0.self_attn.q_proj"


def gcase(id, setup, code=2, needles=(), command="generate"):
    GPTQ_CASES.append(pytest.param(command, setup, code, list(needles), id=id))


def qcfg_both(key, value):
    def setup(q):
        for name in ("quantize_config.json",):
            edit_config(q, lambda c: {**c, key: value}, name)
        edit_config(q, lambda c: {**c, "quantization_config": {**c["quantization_config"], key: value}})
    return setup


for key, value, needle in [("bits", 4.0, "bits"), ("bits", "4", "bits"), ("bits", 5, "bits"), ("bits", True, "bits"),
                           ("bits", 3, "bits=3"), ("group_size", 0, "group_size"), ("group_size", 33, "group_size"),
                           ("group_size", "128", "group_size"), ("sym", "yes", "sym"), ("desc_act", 1, "desc_act"),
                           ("checkpoint_format", "gptq_v3", "checkpoint_format"),
                           ("quant_method", "awq", "awq")]:
    gcase(f"gptq-config-{key}={json.dumps(value)}", qcfg_both(key, value), needles=[needle])
    if key == "bits" and value == 4.0:
        gcase(f"gptq-config-eval-{key}", qcfg_both(key, value), needles=[needle], command="eval")
gcase("gptq-configs-disagree", lambda q: edit_config(q, lambda c: {**c, "bits": 8}, "quantize_config.json"),
      needles=["disagree", "bits"])
gcase("gptq-quantize-config-list", lambda q: (q / "quantize_config.json").write_text("[]"),
      needles=["quantize_config.json"])
gcase("gptq-quantization-config-string", lambda q: edit_config(q, lambda c: {**c, "quantization_config": "gptq"}),
      needles=["quantization config"])
gcase("gptq-requantize", lambda q: None, needles=["already a GPTQ checkpoint"], command="quantize")
for id, fn, needle in [
    ("missing-scales", lambda sd: {k: v for k, v in sd.items() if k != f"{Q}.scales"}, f"{Q}.scales"),
    ("missing-qzeros", lambda sd: {k: v for k, v in sd.items() if k != f"{Q}.qzeros"}, f"{Q}.qzeros"),
    ("missing-g_idx", lambda sd: {k: v for k, v in sd.items() if k != f"{Q}.g_idx"}, f"{Q}.g_idx"),
    ("nan-scales", lambda sd: {**sd, f"{Q}.scales": poke(sd[f"{Q}.scales"], float("nan"))}, f"{Q}.scales"),
    ("inf-scales", lambda sd: {**sd, f"{Q}.scales": poke(sd[f"{Q}.scales"], float("inf"))}, f"{Q}.scales"),
    ("int-scales", lambda sd: {**sd, f"{Q}.scales": sd[f"{Q}.scales"].to(torch.int32)}, f"{Q}.scales"),
    ("float-qweight", lambda sd: {**sd, f"{Q}.qweight": sd[f"{Q}.qweight"].float()}, f"{Q}.qweight"),
    ("int64-qweight", lambda sd: {**sd, f"{Q}.qweight": sd[f"{Q}.qweight"].long()}, f"{Q}.qweight"),
    ("short-qweight", lambda sd: {**sd, f"{Q}.qweight": sd[f"{Q}.qweight"][:4]}, f"{Q}.qweight"),
    ("wide-qzeros", lambda sd: {**sd, f"{Q}.qzeros": torch.cat([sd[f"{Q}.qzeros"]] * 2, 1)}, f"{Q}.qzeros"),
    ("g_idx-out-of-range", lambda sd: {**sd, f"{Q}.g_idx": poke(sd[f"{Q}.g_idx"], 99)}, "g_idx"),
    ("g_idx-negative", lambda sd: {**sd, f"{Q}.g_idx": poke(sd[f"{Q}.g_idx"], -1)}, "g_idx"),
    ("g_idx-float", lambda sd: {**sd, f"{Q}.g_idx": sd[f"{Q}.g_idx"].float()}, "g_idx"),
    ("g_idx-bool", lambda sd: {**sd, f"{Q}.g_idx": sd[f"{Q}.g_idx"] > 0}, "g_idx"),
    ("weight-and-qweight", lambda sd: {**sd, f"{Q}.weight": torch.zeros(64, 64)}, f"{Q}.weight"),
    ("nan-norm", lambda sd: {**sd, NORM: poke(sd[NORM], float("nan"))}, NORM),
]:
    gcase(f"gptq-tensors-{id}", lambda q, fn=fn: edit_tensors(q, fn), needles=[needle])
gcase("gptq-tensors-nan-scales-eval", lambda q: edit_tensors(
    q, lambda sd: {**sd, f"{Q}.scales": poke(sd[f"{Q}.scales"], float("nan"))}), needles=["scales"], command="eval")


# -- the tests -------------------------------------------------------------------------------------------------------

def _argv(command, root, m, out, extra):
    fmt = lambda a: a.replace("{root}", str(root))  # noqa: E731
    extra = [fmt(a) for a in extra]
    if command == "quantize":
        if "--dataset" in extra:  # the case brings its own calibration file
            base = quant_argv(root, m, root / out if out not in ("", ".", "..") else Path(out))
            j = base.index("--dataset")
            return base[:j] + base[j + 2:] + extra
        target = fmt(out) if out.startswith("{root}") else (out if out in ("", ".", "..") else str(root / out))
        return quant_argv(root, m, target) + extra
    if command == "generate":
        return ["--model", str(m), "--prompt", "Once upon a time", "--max-new-tokens", "3", *extra]
    return ["--model", str(m), "--dataset", str(root / "calib.txt"), "--seqlen", "64", "--max-windows", "2", *extra]


@pytest.mark.parametrize("command,setup,extra,code,needles,out", CASES)
def test_hostile_input(tmp_path, monkeypatch, command, setup, extra, code, needles, out):
    root = tmp_path
    m = model_copy(root)
    calib_file(root)
    setup(root, m)
    monkeypatch.chdir(root)
    before = snapshot(root)
    got, err = run_cli(command, _argv(command, root, m, out, extra))
    assert_one_error(got, err, code, needles)
    diff = changed(before, snapshot(root))
    if code == 0 and command == "quantize":
        from minigptq.durable import FILE_MODE
        modes = {p.name: p.stat().st_mode & 0o777 for p in (root / out).iterdir()}
        assert set(modes.values()) == {FILE_MODE}, modes  # readable like any new file (safetensors writes 0600)
        target = (root / out).resolve().relative_to(root.resolve())
        allowed = {str(target), *(str(p) for p in target.parents)}
        diff = {d for d in diff if not any(d == a or d.startswith(a + "/") for a in allowed if a != ".")}
    assert not diff, f"the run changed files it did not create: {sorted(diff)[:10]}"
    assert not (root / "pwned").exists()


@pytest.mark.parametrize("command,setup,code,needles", GPTQ_CASES)
def test_hostile_gptq_checkpoint(tmp_path, monkeypatch, gptq_ckpt, command, setup, code, needles):
    q = tmp_path / "q"
    shutil.copytree(gptq_ckpt, q)
    calib_file(tmp_path)
    setup(q)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    argv = _argv(command, tmp_path, q, "q2", [])
    got, err = run_cli(command, argv)
    assert_one_error(got, err, code, needles)
    assert not changed(before, snapshot(tmp_path))


def test_the_matrix_is_large():
    assert len(CASES) + len(GPTQ_CASES) + len(ENV_CASES) >= 150, len(CASES) + len(GPTQ_CASES)


# -- the machine: read-only and full file systems (need mount; root on Linux) ---------------------------------------

ENV_CASES = ["read-only", "full-before-first-block", "full-at-assembly"]


@pytest.fixture
def tmpfs(tmp_path):
    """A small tmpfs mounted at tmp_path/fs, or skip where mounting is not allowed."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    mounted = []

    def mount(size_kb: int, ro: bool = False):
        opts = f"size={size_kb}k" + (",ro" if ro else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)], capture_output=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()[:100]})")
        mounted.append(mnt)
        return mnt
    yield mount
    for p in mounted:
        subprocess.run(["umount", str(p)], capture_output=True)


@pytest.mark.parametrize("kind", ENV_CASES)
def test_hostile_filesystem(tmp_path, monkeypatch, tmpfs, kind):
    m = model_copy(tmp_path)
    calib_file(tmp_path)
    monkeypatch.chdir(tmp_path)
    if kind == "read-only":
        fs = tmpfs(64, ro=True)
        needle = "read-only"
    elif kind == "full-before-first-block":
        fs = tmpfs(64)  # one 4-bit block of stories260k is ~100 KB
        needle = "No space left"
    else:
        fs = tmpfs(640)  # every block fits in the work folder (~390 KB), the assembled copy (~470 KB) does not
        needle = "No space left"
    before = snapshot(tmp_path)
    got, err = run_cli("quantize", quant_argv(tmp_path, m, fs / "q"))
    assert_one_error(got, err, 2, [needle])
    after = snapshot(tmp_path)
    diff = changed(before, after)
    if kind == "full-at-assembly":  # finished blocks are kept for --resume, nothing else
        assert diff and all(d.startswith("fs/.q.partial") for d in diff), sorted(diff)
        assert "--resume" in err
        subprocess.run(["mount", "-o", "remount,size=4000k", str(fs)], check=True)
        got, err = run_cli("quantize", quant_argv(tmp_path, m, fs / "q", "--resume"))
        assert got == 0, err
        assert (fs / "q" / "model.safetensors").is_file() and not (fs / ".q.partial").exists()
    else:
        assert not diff, sorted(diff)


# -- failures in the middle of the work ----------------------------------------------------------------------------

@pytest.mark.parametrize("exc,code,needle,keeps", [
    (RuntimeError("boom"), 1, "internal error, a bug in minigptq: RuntimeError: boom", False),
    (ValueError("bad input found late"), 2, "bad input found late", False),
    (MemoryError(), 2, "out of memory", True),
    (OSError(28, "No space left on device"), 2, "No space left", True),
])
def test_failure_after_some_blocks(tmp_path, monkeypatch, exc, code, needle, keeps):
    """A failure at block 3: a bug or a bad input removes the fresh work folder; a resource problem keeps the finished
    blocks for --resume. Either way nothing else changes and the message is one line."""
    import minigptq.driver as driver
    m = model_copy(tmp_path)
    calib_file(tmp_path)
    real = driver.gptq
    calls = {"n": 0}

    def failing(W, H, cfg, log=print, **kw):
        calls["n"] += 1
        if calls["n"] > 3 * 4:  # 4 solved linears per block (the MLP is kept); fail in block 3
            raise exc
        return real(W, H, cfg, log=log, **kw)
    monkeypatch.setattr(driver, "gptq", failing)
    before = snapshot(tmp_path)
    got, err = run_cli("quantize", quant_argv(tmp_path, m, tmp_path / "q"))
    assert_one_error(got, err, code, [needle])
    diff = changed(before, snapshot(tmp_path))
    if keeps:
        assert diff and all(d.startswith(".q.partial") for d in diff) and "--resume" in err, sorted(diff)
        monkeypatch.setattr(driver, "gptq", real)
        got, err = run_cli("quantize", quant_argv(tmp_path, m, tmp_path / "q", "--resume"))
        assert got == 0 and "resumed from block_0002" in err, err[-2000:]
    else:
        assert not diff, sorted(diff)


# -- signals, concurrent runs, tampered resumes (real processes) ---------------------------------------------------

SLOW = ["--nsamples", "96", "--seqlen", "512"]  # about 3 s per block of stories260k on 2 cores


def start(root: Path, m: Path, *extra) -> subprocess.Popen:
    argv = quant_argv(root, m, root / "q", *SLOW, *extra)
    return subprocess.Popen([sys.executable, "-m", "minigptq.quantize", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_blocks(root: Path, n: int, p: subprocess.Popen, timeout: float = 240) -> None:
    """Wait until the run's state.json exists and records at least n finished blocks."""
    state = root / ".q.partial" / "state.json"
    deadline = time.time() + timeout
    while time.time() < deadline and p.poll() is None:
        try:
            if state.exists() and len(json.loads(state.read_text()).get("blocks", {})) >= n:
                return
        except (ValueError, OSError):
            pass  # being replaced right now
        time.sleep(0.02)
    p.kill()
    raise AssertionError(f"the run did not reach {n} finished blocks: {p.communicate()[1][-2000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("sig,code,word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_signal_keeps_finished_blocks_then_resume(tmp_path, sig, code, word):
    m = model_copy(tmp_path)
    calib_file(tmp_path)
    before = snapshot(tmp_path)
    p = start(tmp_path, m)
    wait_for_blocks(tmp_path, 1, p)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == code and word in err and "Traceback" not in err, err[-2000:]
    assert "--resume" in err
    diff = changed(before, snapshot(tmp_path))
    assert diff and all(d.startswith(".q.partial") for d in diff), sorted(diff)  # only its own work folder
    got, err = run_cli("quantize", quant_argv(tmp_path, m, tmp_path / "q", *SLOW, "--resume"))
    assert got == 0 and "resumed from block_0000" in err, err[-2000:]
    assert not (tmp_path / ".q.partial").exists()


@pytest.mark.slow
def test_signal_before_the_first_block_leaves_nothing(tmp_path):
    m = model_copy(tmp_path)
    calib_file(tmp_path)
    before = snapshot(tmp_path)
    p = start(tmp_path, m)
    wait_for_blocks(tmp_path, 0, p)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in err, err[-2000:]
    if "resumed" not in err and "kept" not in err:  # the signal came before block 0 was saved
        assert not changed(before, snapshot(tmp_path))


@pytest.mark.slow
def test_concurrent_runs_at_one_out(tmp_path):
    """A second run at the same --out is refused (with or without --overwrite/--resume) and the first one finishes."""
    m = model_copy(tmp_path)
    calib_file(tmp_path)
    p = start(tmp_path, m)
    wait_for_blocks(tmp_path, 0, p)
    for extra in ([], ["--overwrite"], ["--resume"]):
        got, err = run_cli("quantize", quant_argv(tmp_path, m, tmp_path / "q", *SLOW, *extra))
        assert_one_error(got, err, 2, ["another minigptq run is writing"])
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
    assert (tmp_path / "q" / "model.safetensors").is_file() and not (tmp_path / ".q.partial").exists()


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A folder with a model, a calibration file and the work folder of a run SIGKILLed after 2 blocks, plus the
    checkpoint a clean run of the same settings writes."""
    root = tmp_path_factory.mktemp("interrupted")
    m = model_copy(root)
    calib_file(root)
    clean = root / "clean"
    got, err = run_cli("quantize", quant_argv(root, m, clean, *SLOW))
    assert got == 0, err
    p = start(root, m)
    wait_for_blocks(root, 2, p)
    p.kill()
    p.wait()
    return root


def resume_in_copy(tmp_path, interrupted, tamper):
    root = tmp_path / "r"
    shutil.copytree(interrupted, root, symlinks=True)
    tamper(root)
    before = snapshot(root)
    got, err = run_cli("quantize", quant_argv(root, root / "m", root / "q", *SLOW, "--resume"))
    return root, before, got, err


def _checkpoint_files(folder: Path) -> dict:
    """The checkpoint's files, except the log's timings and the calibration file's path (each copy has its own)."""
    out = {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix != ".json" and p.name != "quant_log.tsv"}
    for name in ("config.json", "quantize_config.json"):
        cfg = json.loads((folder / name).read_text())
        q = cfg.get("quantization_config", cfg)
        q["meta"]["calibration"] = q["meta"]["calibration"].split(",", 1)[1]
        out[name] = cfg
    return out


@pytest.mark.slow
@pytest.mark.parametrize("id,tamper,needle", [
    ("calibration-text", lambda r: (r / "calib.txt").write_text((r / "calib.txt").read_text()[::-1]),
     "calibration_sha256"),
    ("config", lambda r: edit_config(r / "m", lambda c: {**c, "rms_norm_eps": 1e-6}), "model_sha256"),
    ("embedding", lambda r: edit_tensors(r / "m", lambda sd: {**sd, EMB: sd[EMB] * 1.01}), "model_sha256"),
    ("finished-block-weights", lambda r: edit_tensors(r / "m", lambda sd: {**sd, V: sd[V] * 1.01}), "block 1"),
    ("settings", None, "percdamp"),
])
def test_resume_refuses_changed_inputs(tmp_path, interrupted, id, tamper, needle):
    if tamper is None:  # the same folder resumed with other settings
        root = tmp_path / "r"
        shutil.copytree(interrupted, root, symlinks=True)
        before = snapshot(root)
        got, err = run_cli("quantize", quant_argv(root, root / "m", root / "q", *SLOW, "--resume", "--percdamp", "0.1"))
    else:
        root, before, got, err = resume_in_copy(tmp_path, interrupted, tamper)
    assert_one_error(got, err, 2, ["cannot resume", needle])
    assert not changed(before, snapshot(root))  # the interrupted run's blocks stay for a correct rerun


@pytest.mark.slow
@pytest.mark.parametrize("id,tamper,note", [
    ("flipped-bit", lambda r: _flip(r / ".q.partial" / "block_0001.safetensors"), "block_0001.safetensors is missing "
                                                                                     "or damaged"),
    ("deleted-block", lambda r: (r / ".q.partial" / "block_0000.safetensors").unlink(), "block_0000.safetensors"),
    ("damaged-state", lambda r: (r / ".q.partial" / "state.json").write_text("{garbage"), "is damaged; starting over"),
    ("moved-folder", lambda r: None, "resumed from block_0000"),  # every case runs in a copy at another path
])
def test_resume_redoes_damaged_blocks(tmp_path, interrupted, id, tamper, note):
    """A damaged block file is quantized again (never reused); the result is byte-identical to a clean run."""
    root, _, got, err = resume_in_copy(tmp_path, interrupted, tamper)
    assert got == 0, err[-2000:]
    assert note in err
    assert _checkpoint_files(root / "q") == _checkpoint_files(interrupted / "clean")


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01  # a bit in the last tensor's data
    path.write_bytes(bytes(data))
