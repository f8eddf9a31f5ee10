"""Bad files and settings reach a clear error (issue 28, round 3): damaged safetensors headers, indexes that disagree
with their shards, pytorch_model.bin files that hold no state_dict, FIFOs / sockets / devices where a folder or a
file is expected, calibration text that is not UTF-8, one-column solver blocks, and Ctrl-C while a command starts.

Each case asserts the exit code, exactly one `error:` line without a traceback, the words of the message, and that
nothing in the case's folder changed (test_hostile.py's helpers). The start-up signals run real processes.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, STORIES
from test_hostile import EMB, NORM, assert_one_error, calib_file, changed, model_copy, quant_argv, run_cli

GEN = ["--prompt", "Once upon a time", "--max-new-tokens", "3"]


@contextlib.contextmanager
def deadline(seconds: int = 60):
    """Fail instead of hanging: a FIFO opened for reading blocks until a writer comes, which never happens here."""
    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s (blocked on a FIFO?)")
    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def snapshot(root: Path) -> dict[str, tuple]:
    """test_hostile.snapshot, plus FIFOs, sockets and devices recorded by kind, never read (reading a FIFO blocks)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel, mode = str(p.relative_to(root)), p.lstat().st_mode
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", mode & 0o7777)
            elif not stat.S_ISREG(mode):
                out[rel] = ("special", stat.S_IFMT(mode))
            else:
                out[rel] = ("file", mode & 0o7777, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def argv_for(command: str, root: Path, m: Path | str) -> list[str]:
    if command == "quantize":
        return quant_argv(root, Path(m), root / "q")
    if command == "generate":
        return ["--model", str(m), *GEN]
    if command == "eval":
        return ["--model", str(m), "--dataset", str(root / "calib.txt"), "--seqlen", "64", "--max-windows", "2"]
    if command == "chat":
        return ["--model", str(m)]
    return [str(m)]  # inspect


def check(root: Path, command: str, argv: list[str], code: int, needles) -> str:
    """Run the command in root; assert the exit code, one error line with the needles, and (on an error) that
    nothing under root changed. -> stderr."""
    before = snapshot(root)
    with deadline():
        got, err = run_cli(command, argv)
    assert_one_error(got, err, code, needles)
    if code:
        assert not changed(before, snapshot(root)), sorted(changed(before, snapshot(root)))
    return err


@pytest.fixture
def case(tmp_path, monkeypatch):
    """(root, model copy) with the calibration file, run from root."""
    m = model_copy(tmp_path)
    calib_file(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path, m


# -- 1, 2: safetensors headers ---------------------------------------------------------------------------------------

def raw_header(data: bytes) -> tuple[str, bytes]:
    """A safetensors file -> (its JSON header as text, the data section)."""
    n = struct.unpack("<Q", data[:8])[0]
    return data[8:8 + n].decode(), data[8 + n:]


def with_header(text: str, rest: bytes) -> bytes:
    hb = text.encode()
    return struct.pack("<Q", len(hb)) + hb + rest


def edit_entry(m: Path, name: str, **fields) -> None:
    f = m / "model.safetensors"
    text, rest = raw_header(f.read_bytes())
    h = json.loads(text)
    h[name] = dict(h[name], **fields)
    f.write_bytes(with_header(json.dumps(h), rest))


@pytest.mark.parametrize("command", ["quantize", "generate"])
@pytest.mark.parametrize("shape", [[0, 2**70], [0, 2**62, 2**62], [2**64]], ids=["0x2^70", "0x2^62x2^62", "2^64"])
def test_safetensors_shape_beyond_int64(case, command, shape):
    """[0, 2**70] holds no bytes, so the byte count passed, and torch then failed with a kilobyte of C++ frames."""
    root, m = case
    b = json.loads(raw_header((m / "model.safetensors").read_bytes())[0])[NORM]["data_offsets"][0]
    edit_entry(m, NORM, shape=shape, data_offsets=[b, b])
    err = check(root, command, argv_for(command, root, m), 2, [NORM, "2**63", "corrupt"])
    assert "Exception raised from" not in err and len(err.splitlines()[-1]) < 400


@pytest.mark.parametrize("where", ["tensor", "field"])
def test_safetensors_duplicate_names(case, where):
    """json keeps the last of two equal keys without a word; the safetensors library refuses such a file."""
    root, m = case
    f = m / "model.safetensors"
    text, rest = raw_header(f.read_bytes())
    h = json.loads(text)
    text = json.dumps(h)
    if where == "tensor":  # the same tensor named twice, the first entry pointing at another tensor's bytes
        text = "{" + json.dumps({NORM: h[EMB]})[1:-1] + ", " + text[1:]
        key = NORM
    else:  # a field given twice inside one entry (the safetensors library says "duplicate field `dtype`")
        entry = json.dumps(h[NORM])
        text = text.replace(entry, '{"dtype": "F16", ' + entry[1:], 1)
        key = "dtype"
    f.write_bytes(with_header(text, rest))
    if where == "field":
        with pytest.raises(Exception, match="duplicate field"):
            load_file(f)
    check(root, "quantize", argv_for("quantize", root, m), 2, ["model.safetensors", repr(key), "twice"])


@pytest.mark.parametrize("id,fields,needle", [
    ("bool-dimension", dict(shape=[True, 64]), "shape a list of integers"),
    ("digits", None, "not valid JSON"),
    ("nested", None, "not valid JSON"),
])
def test_safetensors_header_values_torch_or_json_cannot_take(case, id, fields, needle):
    """A JSON true as a dimension; a number of 5000 digits (Python's int parser refuses it with a ValueError that
    named no file); arrays nested 100000 deep (a RecursionError: "internal error")."""
    root, m = case
    f = m / "model.safetensors"
    if fields:
        edit_entry(m, NORM, **fields)
    else:
        text, rest = raw_header(f.read_bytes())
        junk = "9" * 5000 if id == "digits" else "[" * 100000 + "]" * 100000
        f.write_bytes(with_header(text[:-1] + f', "x": {junk}}}', rest))
    check(root, "quantize", argv_for("quantize", root, m), 2, ["model.safetensors", needle])


# -- 3: an index that names a shard lacking the tensor ---------------------------------------------------------------

def shard(folder: Path, kind: str = "safetensors", misplace: str | None = None) -> None:
    """Split folder's model.safetensors into two shards with an index; misplace: name this tensor in the shard that
    does not hold it."""
    sd = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(sd)
    parts = {f"model-0000{i}-of-00002.{'safetensors' if kind == 'safetensors' else 'bin'}": names[i - 1::2]
             for i in (1, 2)}
    for fname, part in parts.items():
        if kind == "safetensors":
            save_file({k: sd[k] for k in part}, folder / fname, metadata={"format": "pt"})
        else:
            torch.save({k: sd[k] for k in part}, folder / fname)
    wm = {k: fname for fname, part in parts.items() for k in part}
    if misplace:
        wm[misplace] = next(f for f in parts if f != wm[misplace])
    index = "model.safetensors.index.json" if kind == "safetensors" else "pytorch_model.bin.index.json"
    (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": wm}))


@pytest.fixture(scope="module")
def gptq_ckpt(tmp_path_factory):
    """A 4-bit stories260k checkpoint written by minigptq."""
    root = tmp_path_factory.mktemp("gptq")
    calib_file(root)
    code, err = run_cli("quantize", quant_argv(root, STORIES, root / "q"))
    assert code == 0, err
    return root / "q"


@pytest.mark.parametrize("command", ["quantize", "generate", "eval"])
@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_index_names_a_shard_without_the_tensor(case, command, kind):
    root, m = case
    shard(m, kind, misplace=NORM)
    check(root, command, argv_for(command, root, m), 2, ["weight_map puts tensor", NORM, "does not hold it"])


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
@pytest.mark.parametrize("tensor", [NORM, "model.layers.0.self_attn.q_proj.qweight"])
def test_inspect_index_names_a_shard_without_the_tensor(tmp_path, monkeypatch, gptq_ckpt, kind, tensor):
    q = tmp_path / "q"
    shutil.copytree(gptq_ckpt, q)
    shard(q, kind, misplace=tensor)
    monkeypatch.chdir(tmp_path)
    check(tmp_path, "inspect", [str(q)], 2, ["weight_map puts tensor", tensor, "does not hold it"])


@pytest.mark.parametrize("value", [["model-00001-of-00002.safetensors"], {"file": "x"}], ids=["list", "object"])
def test_index_value_that_is_not_a_file_name(case, value):
    """A list as a weight_map value made set(values) raise TypeError ("internal error")."""
    root, m = case
    shard(m)
    index = m / "model.safetensors.index.json"
    d = json.loads(index.read_text())
    d["weight_map"][NORM] = value
    index.write_text(json.dumps(d))
    check(root, "generate", argv_for("generate", root, m), 2, ["weight_map names the file", "plain file names"])


def test_sharded_checkpoints_still_load(case):
    """The valid sharded layouts (both kinds) load and generate."""
    root, m = case
    for kind in ("safetensors", "bin"):
        m2 = model_copy(root, f"m-{kind}")
        shard(m2, kind)
        check(root, "generate", argv_for("generate", root, m2), 0, [])


# -- 4: a pytorch_model.bin that holds no state_dict -----------------------------------------------------------------

@pytest.mark.parametrize("id,obj,needle", [
    ("list", lambda sd: list(sd.values()), "holds a list"),
    ("tensor", lambda sd: sd[NORM], "holds a Tensor"),
    ("int-keys", lambda sd: {i: v for i, v in enumerate(sd.values())}, "keys that are not strings"),
    ("none", lambda sd: None, "holds a NoneType"),
])
@pytest.mark.parametrize("command", ["quantize", "generate"])
def test_pytorch_bin_without_a_state_dict(case, command, id, obj, needle):
    root, m = case
    sd = load_file(m / "model.safetensors")
    (m / "model.safetensors").unlink()
    torch.save(obj(sd), m / "pytorch_model.bin")
    check(root, command, argv_for(command, root, m), 2, ["pytorch_model.bin", needle, "state_dict"])


# -- 5: FIFOs, sockets, devices and dangling links where a folder or a file is expected ------------------------------

def make_fifo(p: Path) -> None:
    os.mkfifo(p)


def make_socket(p: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.bind(p.name)  # relative (the test runs in p's folder): a full tmp path may pass AF_UNIX's 108-byte limit
    return s


@pytest.mark.parametrize("command", ["quantize", "generate", "eval", "inspect", "chat"])
@pytest.mark.parametrize("kind,needle", [("fifo", "a FIFO (named pipe), not a folder"),
                                         ("socket", "a socket, not a folder"),
                                         ("device", "a character device, not a folder"),
                                         ("dangling-link", "symbolic link"),
                                         ("file", "a regular file, not a folder")])
def test_model_that_is_not_a_folder(case, command, kind, needle):
    """The FIFO was reported as "does not exist"; each kind is named, with what is expected."""
    root, _ = case
    p = root / "x"
    keep = None
    if kind == "fifo":
        make_fifo(p)
    elif kind == "socket":
        keep = make_socket(p)
    elif kind == "device":
        p.symlink_to("/dev/null")
    elif kind == "dangling-link":
        p.symlink_to(root / "nowhere")
    else:
        p.write_text("x")
    try:
        check(root, command, argv_for(command, root, "x"), 2, ["'x'", needle, "expected a folder"])
    finally:
        if keep:
            keep.close()


@pytest.mark.parametrize("id,needle", [
    ("safetensors-fifo", "a FIFO"), ("safetensors-dev-zero", "a character device"),
    ("shard-fifo", "a FIFO"), ("bin-fifo", "a FIFO"), ("bin-dev-zero", "a character device"),
])
@pytest.mark.parametrize("command", ["quantize", "generate"])
def test_weights_file_that_is_not_a_regular_file(case, command, id, needle):
    """Weights as a FIFO blocked the open for ever (or were skipped: "no weights"); /dev/zero was mapped."""
    root, m = case
    if id.startswith("shard"):
        shard(m)
        target = m / "model-00002-of-00002.safetensors"
    elif id.startswith("bin"):
        (m / "model.safetensors").unlink()
        target = m / "pytorch_model.bin"
    else:
        target = m / "model.safetensors"
    target.unlink(missing_ok=True)
    if id.endswith("fifo"):
        make_fifo(target)
    else:
        target.symlink_to("/dev/zero")
    check(root, command, argv_for(command, root, m), 2, [target.name, needle, "expected a regular file"])


# -- 6: calibration and evaluation text that is not UTF-8 ------------------------------------------------------------

LATIN1 = "Once upon a time there was a caf\xe9.\n".encode("latin-1")


@pytest.mark.parametrize("command", ["quantize", "eval"])
@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_dataset_not_utf8(case, command, suffix):
    """Bytes that are not UTF-8 were decoded as U+FFFD without a word: now the line and byte offset are named."""
    root, m = case
    good = (root / "calib.txt").read_text()[:20000]
    if suffix == ".txt":
        data = b"line one\nline two\n" + LATIN1 + good.encode()
        line, offset = 3, 18 + LATIN1.index(b"\xe9")
    else:
        data = json.dumps({"text": "line one"}).encode() + b"\n" + b'{"text": "' + LATIN1[:-1] + b'"}\n' + \
            json.dumps({"text": good}).encode() + b"\n"
        line, offset = 2, data.index(b"\xe9")
    f = root / f"bad{suffix}"
    f.write_bytes(data)
    argv = argv_for(command, root, m)
    argv[argv.index("--dataset") + 1] = str(f)
    check(root, command, argv, 2, [f.name, f"line {line}", f"byte offset {offset}", "UTF-8"])


def test_dataset_too_big_is_refused_before_reading(case, tmp_path_factory):
    """A sparse 2 GiB file would be read into memory and tokenized for ages: refused by its size, with advice."""
    root, m = case
    f = tmp_path_factory.mktemp("huge") / "huge.txt"  # outside root: the snapshot would hash its 2 GiB
    with open(f, "wb") as fh:
        fh.truncate(2**31)  # sparse: no disk space used
    argv = argv_for("quantize", root, m)
    argv[argv.index("--dataset") + 1] = str(f)
    check(root, "quantize", argv, 2, ["huge.txt", "1 GiB limit", "head -c"])


def test_jsonl_with_unicode_line_separators_is_read(case):
    """JSON strings may hold U+2028 / U+0085 unescaped (json.dumps(ensure_ascii=False) writes them so); the file
    was cut at them (str.splitlines) and refused as invalid JSON."""
    root, m = case
    text = (root / "calib.txt").read_text()[:30000]
    rows = [text[:15000] + "\u2028" + "x\x85y", text[15000:]]
    f = root / "sep.jsonl"
    f.write_text("".join(json.dumps({"text": r}, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    argv = argv_for("quantize", root, m)
    argv[argv.index("--dataset") + 1] = str(f)
    check(root, "quantize", argv, 0, [])


def test_jsonl_with_a_byte_order_mark_is_read(case):
    """A .jsonl saved by a Windows editor starts with a UTF-8 BOM: row 1 was refused as "not valid JSON"."""
    root, m = case
    f = root / "bom.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": (root / "calib.txt").read_text()[:20000]}).encode() + b"\n")
    argv = argv_for("quantize", root, m)
    argv[argv.index("--dataset") + 1] = str(f)
    check(root, "quantize", argv, 0, [])


@pytest.mark.parametrize("command", ["quantize", "eval"])
@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_dataset_that_is_not_a_regular_file(case, command, kind):
    """Never read: a FIFO would block, /dev/zero never ends."""
    root, m = case
    f = root / "d.txt"
    if kind == "fifo":
        make_fifo(f)
    else:
        f.symlink_to("/dev/zero")
    argv = argv_for(command, root, m)
    argv[argv.index("--dataset") + 1] = str(f)
    check(root, command, argv, 2, ["d.txt", "not a file", ".txt or .jsonl"])


# -- 7: one-column solver blocks -------------------------------------------------------------------------------------

kernels = pytest.importorskip("minigptq.kernels")
cpu_kernels = pytest.mark.skipif(not kernels.cpu_available(), reason="CPU kernels not built")


@cpu_kernels
@pytest.mark.parametrize("kw", [dict(blocksize=63), dict(blocksize=1), dict(group_size=3),
                                dict(group_size=3, act_order=True), dict(blocksize=7, group_size=5, sym=False)],
                         ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_one_column_blocks_equal_the_torch_loop(monkeypatch, kw):
    """A block of one column (the last of 64 with blocksize 63, or after groups of 3) failed the C++ wrapper's
    stride check: a [1, 1] slice of the column-major Hinv keeps stride (1, K). The C++ loop must give the torch
    loop's result bit for bit, and the float64 solve's output error within 2% (with groups of 3 and a symmetric
    grid many rows sit on rounding ties that the last bit decides: test_solver.naive_layer)."""
    import minigptq.gptq as solver
    from minigptq.quantizer import QuantConfig
    from test_solver import make_layer, out_err
    W, X, H = make_layer(4, N=16, K=64, n=300, dead=(5,))
    cfg = QuantConfig(**{"bits": 4, "group_size": 32, **kw})
    fast = solver.gptq(W, H, cfg)
    monkeypatch.setattr(solver, "PLAIN_LOOP", True)
    plain = solver.gptq(W, H, cfg)
    for name in ("qweight", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(fast, name), getattr(plain, name)), name
    assert fast.loss == plain.loss
    ref = solver.gptq(W.double(), H, cfg)
    assert out_err(W, fast.weight, X) == pytest.approx(out_err(W, ref.weight.float(), X), rel=0.02)


@cpu_kernels
def test_cpu_gptq_block_takes_a_one_column_slice():
    Hinv = torch.linalg.cholesky(torch.eye(8) * 4, upper=True).T.contiguous().T  # column-major, strides (1, 8)
    h = Hinv[7:8, 7:8].contiguous()
    assert h.stride(1) != 1  # what the solver passes for a one-column block
    W1 = torch.tensor([[0.3], [-1.2]])
    codes, err = kernels.cpu_gptq_block(W1.clone(), h, torch.full((1, 2), 0.5), torch.full((1, 2), 8.0), 15)
    q = torch.clamp(torch.round(W1 / 0.5) + 8, 0, 15)  # [N, 1]
    assert torch.equal(codes, q)
    assert torch.equal(err, (W1 - 0.5 * (q - 8)) / h[0, 0])


@cpu_kernels
@pytest.mark.parametrize("extra", [["--blocksize", "63"], ["--groupsize", "3", "--act-order"]])
def test_one_column_block_settings_quantize(case, extra):
    """The CLI path: exit 0, and the checkpoint is one that loads (its packed layers' layouts are built; running them
    is the kernels' tests' business)."""
    from minigptq.loader import load_model
    root, m = case
    argv = quant_argv(root, m, root / "q") + extra
    check(root, "quantize", argv, 0, [])
    check(root, "inspect", [str(root / "q")], 0, [])
    model = load_model(root / "q", cpu_kernel="exact")
    assert type(model.layers[0].attn.o).__name__ == "QuantLinear"


@pytest.mark.parametrize("command,setup,needle", [
    ("quantize", None, "group_size"),
    ("generate", "config", "group_size"),
])
def test_group_size_beyond_int32(case, gptq_ckpt, command, setup, needle):
    """--groupsize 10**20 passed the checks and crashed in packing (OverflowError, "internal error"); a checkpoint
    whose group_size is that big crashed the loader the same way."""
    root, m = case
    if setup is None:
        argv = quant_argv(root, m, root / "q") + ["--groupsize", str(10**20)]
    else:
        q = root / "gq"
        shutil.copytree(gptq_ckpt, q)
        for name in ("config.json", "quantize_config.json"):
            cfg = json.loads((q / name).read_text())
            (cfg.get("quantization_config") or cfg)["group_size"] = 10**20
            (q / name).write_text(json.dumps(cfg))
        argv = ["--model", str(q), *GEN]
    check(root, command, argv, 2, [needle, "2**31"])


def test_tiny_percdamp_retries_a_few_times_not_hundreds():
    """--percdamp 5e-324 with a singular H (fewer tokens than inputs) retried x10 from 5e-324: ~320 Cholesky
    factorizations and log lines per layer. Damping below 1e-6 is lost in float32 rounding: the ladder starts there."""
    from minigptq.gptq import gptq
    from minigptq.quantizer import QuantConfig
    g = torch.Generator().manual_seed(7)
    X = torch.randn(16, 64, generator=g)  # 16 tokens, 64 inputs: H has rank 16
    messages: list[str] = []
    res = gptq(torch.randn(8, 64, generator=g), 2 / 16 * X.T @ X, QuantConfig(percdamp=5e-324), log=messages.append)
    assert 1 <= len(messages) <= 7 and "percdamp=1e-06" in messages[0], messages
    assert torch.isfinite(res.weight).all()


# -- 8: Ctrl-C and SIGTERM while a command starts --------------------------------------------------------------------

@pytest.mark.parametrize("command,sig,code,word", [
    ("generate", signal.SIGINT, 130, "interrupted"),
    ("quantize", signal.SIGINT, 130, "interrupted"),
    ("eval", signal.SIGINT, 130, "interrupted"),
    ("generate", signal.SIGTERM, 143, "terminated"),
])
def test_signal_while_torch_loads(tmp_path, command, sig, code, word):
    """The signal comes while `python -m minigptq.<command>` is importing torch, before cli.run: Python printed a
    KeyboardInterrupt traceback (and exited by SIGINT, -2). `-X importtime` tells when torch's import is under way."""
    calib = calib_file(tmp_path)
    argv = {"generate": ["--prompt", "x"], "quantize": ["--out", str(tmp_path / "q"), "--dataset", str(calib)],
            "eval": ["--dataset", str(calib)]}[command]
    p = subprocess.Popen([sys.executable, "-X", "importtime", "-m", f"minigptq.{command}", "--model", str(STORIES),
                          *argv], cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    seen = []
    for line in p.stderr:  # "import time: self | cumulative | name", printed when each module's import ends
        seen.append(line)
        if line.startswith("import time:") and line.rsplit("|", 1)[-1].strip().startswith("torch."):
            break
    else:
        pytest.fail("torch was never imported: " + "".join(seen)[-2000:])
    p.send_signal(sig)
    rest = p.stderr.read()
    p.wait(timeout=60)
    err = "".join(ln for ln in rest.splitlines(True) if not ln.startswith("import time:"))
    assert p.returncode == code, (p.returncode, err[-2000:])
    assert err.strip() == word, err[-2000:]
