"""Writing GPTQ checkpoints: atomically, resumably, in the standard format (shared/docs/gptq-format.md).

A quantization run keeps its work in a hidden folder beside the output, `.<out>.partial/`:
    state.json               fingerprint of the settings and inputs (calibration tokens, config, the tensors outside
                             the blocks); per finished block: its per-layer log, the sha256 of its file, and a digest
                             of the full-precision weights it was made from
    block_0000.safetensors   the finished blocks' tensors (HF names), one file per block
Only when every block is done is the checkpoint assembled in `.<out>.tmp/` and renamed to `<out>`, so an
interrupted run never leaves a half-written checkpoint, and `--resume` restarts from the last finished block after
checking that nothing it reuses has changed. Every file is fsync()ed before its rename, and the folder after it.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor

from . import Error

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja")
SHARD_BYTES = 4 * 2**30  # the assembled checkpoint is split into shards of at most this size


# -- durable files: temporary name, fsync, rename, fsync the folder ------------------------------------------------

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file: safetensors' own writer makes 0600 files


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _flush(path: Path) -> None:
    """Make a new file readable like any other and force its bytes to disk."""
    os.chmod(path, FILE_MODE)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _commit(tmp: Path, path: Path) -> None:
    """Flush tmp, rename it to path, flush the folder entry."""
    _flush(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json(path: Path, obj) -> None:
    """Write JSON atomically and durably (temporary file, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    _commit(tmp, path)


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    _commit(tmp, path)


def save_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    """safetensors file written atomically and durably; tensors made contiguous CPU copies first."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    except SafetensorError as e:  # its writer reports a full disk or an I/O error as its own type
        tmp.unlink(missing_ok=True)
        raise OSError(f"cannot write {tmp}: {e}") from None
    _commit(tmp, path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def tensor_digest(tensors) -> str:
    """sha256 over (name, dtype, shape, bytes) of (name, tensor) pairs: fingerprints the inputs of a run."""
    h = hashlib.sha256()
    for name, t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


# -- where a run may write ------------------------------------------------------------------------------------------

CHECKPOINT_FILES = TOKENIZER_FILES + ("config.json", "quantize_config.json", "quant_log.tsv",
                                      "model.safetensors", "model.safetensors.index.json")


def written_by_minigptq(folder: Path) -> bool:
    """True if `folder` is a checkpoint minigptq wrote: its quantize_config.json names minigptq as the quantizer."""
    try:
        q = json.loads((folder / "quantize_config.json").read_text(encoding="utf-8"))
        return any(str(x).startswith("minigptq:") for x in q["meta"]["quantizer"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _is_our_file(name: str) -> bool:
    return name in CHECKPOINT_FILES or (name.startswith("model-") and name.endswith(".safetensors"))


def check_out(out: str | Path, model: str | Path, overwrite: bool) -> Path:
    """Validate an output folder before any work: -> the absolute path to write. Raises ValueError/FileExistsError.

    Refused: the model folder itself or a folder that contains it, the current folder or one containing it, a
    symlink, a file, a folder that exists (without --overwrite), and with --overwrite anything but a checkpoint
    minigptq wrote that holds only the files minigptq writes. The nearest existing parent must be writable.
    """
    given = Path(out)
    if str(out) == "" or given.name in ("", ".", ".."):
        raise Error(f"--out {str(out)!r} must name a new folder, e.g. {Path(model).name}-gptq")
    if given.is_symlink():
        raise Error(f"--out {given} is a symbolic link (to {os.readlink(given)!r}); give a real folder path")
    o = Path(os.path.abspath(given)).parent.resolve() / given.name  # resolve the parent, never the name itself
    m, cwd = Path(model).resolve(), Path.cwd().resolve()
    if o == m or o in m.parents:
        raise Error(f"--out {given} {'is' if o == m else 'contains'} the model folder {model}; "
                         f"choose a folder outside it (the source model is never replaced)")
    if o == cwd or o in cwd.parents:
        raise Error(f"--out {given} is the current folder or contains it; choose a new folder")
    if o.exists():
        if not o.is_dir():
            raise Error(f"--out {given} exists and is not a folder; choose a new folder name")
        if not overwrite:
            raise FileExistsError(f"output {given} already exists; pass --overwrite to replace it")
        if not written_by_minigptq(o):
            raise Error(f"--out {given} exists and is not a checkpoint minigptq wrote (no minigptq "
                             f"quantize_config.json); --overwrite only replaces minigptq's own checkpoints: remove "
                             f"it yourself or choose another --out")
        foreign = sorted(p.name for p in o.iterdir() if not _is_our_file(p.name) or not p.is_file())
        if foreign:
            raise Error(f"--out {given} holds files minigptq did not write ({', '.join(foreign[:5])}"
                             f"{' ...' if len(foreign) > 5 else ''}); --overwrite would delete them: move them "
                             f"away or choose another --out")
    parent = next(p for p in o.parents if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write --out {given}: {parent} is not a writable folder "
                              f"(read-only file system or no permission)")
    return o


class PartialRun:
    """The resumable, locked work folder of one quantization run (see the module docstring).

    Use it as a context manager: on an error it removes what this run created (the work folder of a fresh run,
    parent folders it made) but keeps finished blocks after an interruption or an I/O error (full disk), so that
    `--resume` continues. The folder is flock()ed while the run lives: a second run at the same --out is refused.
    """

    def __init__(self, out: Path, resume: bool, overwrite: bool, log=lambda msg: None):
        self.out = Path(out)
        self.dir = self.out.parent / f".{self.out.name}.partial"
        self.log = log
        self.created: list[Path] = [p for p in reversed(self.out.parents) if not p.exists()]
        for p in self.created:
            p.mkdir()
        self.owned = not self.dir.exists()  # may be removed on failure: made (or emptied) by this run
        self.dir.mkdir(exist_ok=True)
        self.state: dict = {"blocks": {}}
        self.fd = None
        try:
            self.fd = self._lock()
            if not self.owned and not resume:
                if not overwrite:
                    raise FileExistsError(f"an interrupted run left {self.dir}; pass --resume to continue it or "
                                          f"--overwrite to start over")
                self._clear()
        except BaseException as e:
            self.__exit__(type(e), e, None)
            raise

    def _lock(self) -> int:
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise FileExistsError(f"another minigptq run is writing {self.out} right now (its work folder "
                                      f"{self.dir} is locked); wait for it or choose another --out") from None
            raise
        if os.stat(self.dir).st_ino != os.fstat(fd).st_ino:  # the run we waited for removed it: ours is gone
            os.close(fd)
            raise FileExistsError(f"another minigptq run just finished writing {self.out}; rerun to continue")
        return fd

    def _clear(self) -> None:
        for p in self.dir.iterdir():
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        self.owned = True

    def start(self, settings: dict) -> None:
        """Begin, or continue (--resume) a run with these settings; their fingerprint must match the saved one."""
        fp = fingerprint(settings)
        old = None
        if (self.dir / "state.json").exists():
            from .config import read_json
            try:
                old = read_json(self.dir / "state.json")
            except ValueError:
                self.log(f"note: {self.dir / 'state.json'} is damaged; starting over")
        if old is None or not old.get("blocks"):  # nothing finished yet: nothing to keep
            self._clear()
            self.state = {"fingerprint": fp, "settings": settings, "blocks": {}}
        elif old.get("fingerprint") != fp:
            changed = [k for k in sorted(set(settings) | set(old.get("settings", {})))
                       if settings.get(k) != old.get("settings", {}).get(k)]
            raise Error(f"cannot resume {self.dir}: it was started with other settings or inputs (changed: "
                             f"{', '.join(changed) or 'unknown'}); rerun with those, or pass --overwrite to start over")
        else:
            self.state = old
            for i in sorted(self.done_blocks()):  # a finished block is reused only if its file is intact
                info, f = self.state["blocks"][str(i)], self.block_file(i)
                if not f.is_file() or sha256_file(f) != info["sha256"]:
                    self.log(f"note: {f.name} is missing or damaged (checksum mismatch); block {i} is quantized again")
                    del self.state["blocks"][str(i)]
        write_json(self.dir / "state.json", self.state)

    def __enter__(self) -> "PartialRun":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if exc is not None and self.dir.exists():
            # Kept: a work folder this run found (an earlier run's blocks), and finished blocks after an interruption
            # or a resource problem (full disk, out of memory). Removed: what a fresh run made, after a bad input or
            # a bug, so that the corrected rerun starts clean.
            resource = isinstance(exc, (KeyboardInterrupt, OSError, MemoryError, torch.OutOfMemoryError))
            if not self.owned or (self.state["blocks"] and resource):
                if self.state["blocks"]:
                    self.log(f"finished blocks kept in {self.dir}: rerun with --resume to continue")
            else:
                shutil.rmtree(self.dir, ignore_errors=True)
                for p in reversed(self.created):
                    try:
                        p.rmdir()  # only if still empty
                    except OSError:
                        pass
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    @property
    def tmp(self) -> Path:
        return self.out.parent / f".{self.out.name}.tmp"

    def done_blocks(self) -> set[int]:
        return {int(i) for i in self.state["blocks"]}

    def block_file(self, i: int) -> Path:
        return self.dir / f"block_{i:04d}.safetensors"

    def records(self) -> list[dict]:
        """The per-layer log of every finished block, in block order."""
        return [r for i in sorted(self.done_blocks()) for r in self.state["blocks"][str(i)]["log"]]

    def save_block(self, i: int, tensors: dict[str, Tensor], log: list[dict], source: str) -> None:
        """Store block i's tensors; `source` is the digest of its full-precision inputs (checked on resume)."""
        f = self.block_file(i)
        save_tensors(f, tensors)  # the tensors first: a block counts as done once state.json says so
        self.state["blocks"][str(i)] = dict(log=log, sha256=sha256_file(f), source=source)
        write_json(self.dir / "state.json", self.state)

    def load_block(self, i: int, source: str) -> dict[str, Tensor]:
        """Block i's saved tensors, after checking that its full-precision weights are those it was made from."""
        from .loader import SafetensorsFile
        if self.state["blocks"][str(i)]["source"] != source:
            raise Error(f"cannot resume: the model's weights of block {i} changed since the interrupted run; "
                             f"pass --overwrite to start over")
        f = SafetensorsFile(self.block_file(i))
        return {k: f.get(k).clone() for k in f.keys()}

    def finish(self, top: dict[str, Tensor], src: Path, config: dict, quant_config: dict,
               dtype: torch.dtype = torch.float16) -> None:
        """Assemble the checkpoint in a temporary folder, then rename it into place and drop the work folder."""
        from .loader import SafetensorsFile
        tmp = self.tmp
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        files = [SafetensorsFile(self.block_file(i)) for i in sorted(self.done_blocks())]
        tensors = dict(top)
        for f in files:
            tensors.update({k: f.get(k) for k in f.keys()})
        write_shards(tmp, tensors)
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
                _flush(tmp / name)
        write_json(tmp / "config.json", dict(config, quantization_config=quant_config,
                                             torch_dtype=str(dtype).removeprefix("torch.")))
        write_json(tmp / "quantize_config.json", quant_config)
        write_text(tmp / "quant_log.tsv", "block\tmodule\tmethod\terror\tpercdamp\tseconds\n" + "".join(
            f"{r['block']}\t{r['module']}\t{r['method']}\t{r['error']:.6g}\t{r['percdamp']}\t{r['seconds']:.3f}\n"
            for r in self.records()))
        fsync_dir(tmp)
        if self.out.exists():  # --overwrite (checked by check_out): move the old one aside, so the swap is two renames
            old = self.out.parent / f".{self.out.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.out, old)
            os.replace(tmp, self.out)
            fsync_dir(self.out.parent)
            shutil.rmtree(old)
        else:
            os.replace(tmp, self.out)
            fsync_dir(self.out.parent)
        shutil.rmtree(self.dir)
        self.created = []


def write_shards(folder: Path, tensors: dict[str, Tensor]) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json past SHARD_BYTES."""
    shards, size = [{}], 0
    for name in sorted(tensors):
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_tensors(folder / "model.safetensors", shards[0])
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_tensors(folder / fname, shard)
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
