"""Writing GPTQ checkpoints: atomically, resumably, in the standard format (docs/gptq-format.md).

A quantization run keeps its work in a hidden folder beside the output, `.<out>.partial/` (PartialRun):
    state.json               fingerprint of the settings and inputs (calibration tokens, config, the tensors outside
                             the blocks); per finished block: its per-layer log, the sha256 of its file, and a digest
                             of the full-precision weights it was made from
    block_0000.safetensors   the finished blocks' tensors (HF names), one file per block
Only when every block is done is the checkpoint assembled in `.<out>.tmp/` (PartialRun.finish, write_shards) and
renamed to `<out>`, so an interrupted run never leaves a half-written checkpoint, and `--resume` restarts from the
last finished block after checking that nothing it reuses has changed. Every file is fsync()ed before its rename,
and the folder after it (minigptq/durable.py). The final rename never replaces anything but what was accepted at
the start (minigptq/out_folder.py: check_out, install). Reading checkpoints is minigptq/checkpoint_reader.py.
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
from torch import Tensor

from . import Error
from .checkpoint_reader import SafetensorsFile
from .config import read_json
from .durable import flush, fsync_dir, save_tensors, sha256_file, write_json, write_text
from .out_folder import TOKENIZER_FILES, install, only_our_files, out_state, remove_ours

SHARD_BYTES = 4 * 2**30  # the assembled checkpoint is split into shards of at most this size


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


class PartialRun:
    """The resumable, locked work folder of one quantization run (see the module docstring).

    Use it as a context manager: on an error it removes what this run created (the work folder of a fresh run,
    parent folders it made) but keeps finished blocks after an interruption or an I/O error (full disk), so that
    `--resume` continues. The folder is flock()ed while the run lives: a second run at the same --out is refused,
    and removes nothing (only what a run made itself, and only while it holds the lock, is its own to remove).
    """

    def __init__(self, out: Path, resume: bool, overwrite: bool, log=lambda msg: None, seen=...):
        """seen: out_state(out) when check_out accepted it (default: now); the commit refuses if out changed."""
        self.out = Path(out)
        self.dir = self.out.parent / f".{self.out.name}.partial"
        self.log = log
        self.seen = out_state(self.out) if seen is ... else seen
        self.keep = False  # set when the commit is refused: the finished blocks stay for --resume
        self.made_tmp = False  # only this run's own assembly folder is removed on failure
        self.created: list[Path] = []  # what this run made itself is all it may remove (another run may share them)
        for p in reversed(self.out.parents):
            if not p.exists():
                try:
                    p.mkdir()
                    self.created.append(p)
                except FileExistsError:  # another process made it just now: not ours
                    pass
        try:
            self.dir.mkdir()
            self.owned = True  # made by this run (or emptied by it, _clear): may be removed on failure
        except FileExistsError:
            self.owned = False
        self.state: dict = {"blocks": {}}
        self.fd = None
        try:
            self.fd = self._lock()
            if not self.owned and not any(self.dir.iterdir()):
                self.owned = True  # empty: made by a run started at the same moment, which the lock now refuses
            if not self.owned and not resume:
                if not overwrite:
                    raise FileExistsError(f"an interrupted run left {self.dir}; pass --resume to continue it or "
                                          f"--overwrite to start over")
                self._clear()
        except BaseException as e:
            self.__exit__(type(e), e, None)
            raise

    def _lock(self) -> int:
        """flock the work folder; whatever stops us, nothing here is ours to remove (another run is using it)."""
        gone = FileExistsError(f"another minigptq run just finished or gave up writing {self.out} (it removed its "
                               f"work folder {self.dir}); rerun to continue")
        try:
            fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError as e:
            self.owned, self.created = False, []
            if e.errno == errno.ENOENT:
                raise gone from None
            if e.errno in (errno.ELOOP, errno.ENOTDIR):  # never work (or delete) through a link or in a file
                what = "a symbolic link" if self.dir.is_symlink() else "not a folder"
                raise Error(f"the work folder {self.dir} is {what}; minigptq writes only a real folder there: move "
                            f"it away") from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            same = os.lstat(self.dir).st_ino == os.fstat(fd).st_ino
        except OSError as e:
            os.close(fd)
            self.owned, self.created = False, []
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise FileExistsError(f"another minigptq run is writing {self.out} right now (its work folder "
                                      f"{self.dir} is locked); wait for it or choose another --out") from None
            if e.errno == errno.ENOENT:
                raise gone from None
            raise
        if not same:  # the run that held it removed it (and maybe another made a new one): ours is gone
            os.close(fd)
            self.owned, self.created = False, []
            raise gone
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
            if not self.owned or (self.state["blocks"] and (resource or self.keep)):
                if self.state["blocks"]:
                    self.log(f"finished blocks kept in {self.dir}: rerun with --resume to continue")
            else:
                shutil.rmtree(self.dir, ignore_errors=True)
                for p in reversed(self.created):
                    try:
                        p.rmdir()  # only if still empty
                    except OSError:
                        pass
            if self.made_tmp:
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
        if self.state["blocks"][str(i)]["source"] != source:
            raise Error(f"cannot resume: the model's weights of block {i} changed since the interrupted run; "
                        f"pass --overwrite to start over")
        f = SafetensorsFile(self.block_file(i))
        return {k: f.get(k).clone() for k in f.keys()}

    def finish(self, top: dict[str, Tensor], src: Path, config: dict, quant_config: dict,
               dtype: torch.dtype = torch.float16) -> None:
        """Assemble the checkpoint in a temporary folder, then rename it into place and drop the work folder."""
        tmp = self.tmp
        if os.path.lexists(tmp):  # left by a run at this --out that was stopped while assembling (we hold the lock)
            if not only_our_files(tmp, tmp_too=True):
                self.keep = True
                raise Error(f"{tmp}, where the checkpoint is assembled, holds files minigptq did not write (or is not "
                            f"a folder); move it away and rerun with --resume (the finished blocks are kept in "
                            f"{self.dir})")
            remove_ours(tmp)
        tmp.mkdir()
        self.made_tmp = True
        files = [SafetensorsFile(self.block_file(i)) for i in sorted(self.done_blocks())]
        tensors = dict(top)
        for f in files:
            tensors.update({k: f.get(k) for k in f.keys()})
        write_shards(tmp, tensors)
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
                flush(tmp / name)
        write_json(tmp / "config.json", dict(config, quantization_config=quant_config,
                                             torch_dtype=str(dtype).removeprefix("torch.")))
        write_json(tmp / "quantize_config.json", quant_config)
        # tokens: how many calibration tokens the linear's Hessian came from (a MoE expert: those routed to it);
        # note: a rule applied (an expert too few tokens reached: "all tokens: ..."); both empty for kept layers
        write_text(tmp / "quant_log.tsv", "block\tmodule\tmethod\terror\tpercdamp\tseconds\ttokens\tnote\n" + "".join(
            f"{r['block']}\t{r['module']}\t{r['method']}\t{r['error']:.6g}\t{r['percdamp']}\t{r['seconds']:.3f}\t"
            f"{'' if r.get('tokens') is None else r['tokens']}\t{r.get('note', '')}\n"
            for r in self.records()))
        fsync_dir(tmp)
        try:
            install(tmp, self.out, self.seen, self.dir, self.log)
        except Error:  # --out changed while this run worked: the finished blocks stay for --resume
            self.keep = True
            raise
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
