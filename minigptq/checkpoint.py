"""Writing GPTQ checkpoints: atomically, resumably, in the standard format (shared/docs/gptq-format.md).

A quantization run keeps its work in a hidden folder beside the output, `.<out>.partial/`:
    state.json               fingerprint of the settings and inputs (calibration tokens, config, the tensors outside
                             the blocks); per finished block: its per-layer log, the sha256 of its file, and a digest
                             of the full-precision weights it was made from
    block_0000.safetensors   the finished blocks' tensors (HF names), one file per block
Only when every block is done is the checkpoint assembled in `.<out>.tmp/` and renamed to `<out>`, so an
interrupted run never leaves a half-written checkpoint, and `--resume` restarts from the last finished block after
checking that nothing it reuses has changed. Every file is fsync()ed before its rename, and the folder after it.
The final rename never replaces anything but what was accepted at the start (nothing, or with --overwrite the same
minigptq checkpoint, moved to `.<out>.old` first): whatever appeared at `<out>` meanwhile is left alone and the run
stops with its blocks kept. A run stopped between the two renames of an --overwrite is recovered by the next one.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
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


# -- renames that never replace what is there ----------------------------------------------------------------------

def _load_renameat2():
    try:
        f = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28; absent on macOS and older C libraries
    except (OSError, AttributeError):
        return None
    f.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    f.restype = ctypes.c_int
    return f


_RENAMEAT2 = _load_renameat2()
_AT_FDCWD, _RENAME_NOREPLACE = -100, 1


def rename_new(src: Path, dst: Path) -> None:
    """Rename src to dst only if nothing is at dst; FileExistsError otherwise. Never replaces a user's folder.

    Linux's renameat2(RENAME_NOREPLACE) makes the check and the rename one step, so no folder that appears in between
    can be replaced; elsewhere (or on a file system without it) the check comes just before rename(2), which itself
    refuses a non-empty folder and anything but a folder, so at most an empty folder could be replaced there.
    """
    if _RENAMEAT2 is not None:
        if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):  # EINVAL: this file system has no RENAME_NOREPLACE
            raise OSError(err, os.strerror(err), str(src), None, str(dst))  # EEXIST gives FileExistsError
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(src), None, str(dst))
    os.rename(src, dst)


def out_state(path: Path) -> tuple | None:
    """What is at `path`: None if nothing, else its type and identity and, for a folder, each entry's name, inode,
    size and mtime. Taken when --out is accepted and again at the commit, which refuses if they differ."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    entries = ()
    if stat.S_ISDIR(st.st_mode):
        entries = tuple(sorted((e.name, s.st_mode, s.st_ino, s.st_size, s.st_mtime_ns)
                               for e in os.scandir(path) for s in [e.stat(follow_symlinks=False)]))
    return stat.S_IFMT(st.st_mode), st.st_dev, st.st_ino, entries


def _describe(state: tuple | None) -> str:
    if state is None:
        return "nothing"
    if state[0] != stat.S_IFDIR:
        return "a symbolic link" if state[0] == stat.S_IFLNK else "a file"
    names = [e[0] for e in state[3]]
    return f"a folder holding {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}" if names else "an empty folder"


# -- where a run may write ------------------------------------------------------------------------------------------

CHECKPOINT_FILES = TOKENIZER_FILES + ("config.json", "quantize_config.json", "quant_log.tsv",
                                      "model.safetensors", "model.safetensors.index.json")


def written_by_minigptq(folder: Path) -> bool:
    """True if `folder` is a checkpoint minigptq wrote: its quantize_config.json names minigptq as the quantizer."""
    try:
        from .config import read_json  # a regular file of bounded size only: a FIFO there would block the read
        q = read_json(folder / "quantize_config.json")
        return any(str(x).startswith("minigptq:") for x in q["meta"]["quantizer"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _is_our_file(name: str) -> bool:
    return name in CHECKPOINT_FILES or (name.startswith("model-") and name.endswith(".safetensors"))


def _only_our_files(folder: Path, tmp_too: bool = False) -> bool:
    """True if `folder` is a real folder (no link) holding only regular files with the names minigptq writes
    (tmp_too: also their half-written `.tmp` versions)."""
    try:
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            return False
        entries = list(os.scandir(folder))
    except OSError:
        return False
    return all(e.is_file(follow_symlinks=False) and _is_our_file(e.name.removesuffix(".tmp") if tmp_too else e.name)
               for e in entries)


def _remove_ours(folder: Path, log=lambda msg: None) -> None:
    """Delete a folder of minigptq's files (_only_our_files), its marker quantize_config.json last so that a
    deletion cut short still says whose folder it is; a name that appeared meanwhile keeps the folder."""
    names = sorted(os.listdir(folder), key=lambda n: n == "quantize_config.json")
    for name in names:
        if _is_our_file(name.removesuffix(".tmp")):
            (folder / name).unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        log(f"note: {folder} was left in place: it now holds files minigptq did not write")


def _complete(folder: Path) -> bool:
    return written_by_minigptq(folder) and (folder / "config.json").is_file() and any(
        (folder / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json"))


def recover_swap(out: Path, log=lambda msg: None) -> None:
    """Finish what a run killed inside the two renames of an --overwrite left behind (PartialRun.finish): the
    previous checkpoint in `.<out>.old`. Restored to `out` if nothing is there, or removed if `out` is a complete
    minigptq checkpoint. A `.old` that is not a minigptq checkpoint is never touched."""
    old = out.parent / f".{out.name}.old"
    if not (written_by_minigptq(old) and _only_our_files(old)):
        return
    try:
        fd = os.open(out.parent / f".{out.name}.partial", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        fd = None  # no work folder: no run at this --out is committing
    if fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a run at this --out holds it while it commits
        except OSError:
            os.close(fd)
            return  # that run may be between its renames right now: it finishes them itself
    try:
        if not os.path.lexists(out):
            rename_new(old, out)
            fsync_dir(out.parent)
            log(f"note: restored the previous checkpoint {out} from {old.name} (a run was stopped while replacing "
                f"it)")
        elif _complete(out):
            _remove_ours(old, log)
            log(f"note: removed {old.name}, the previous checkpoint left by a run stopped after replacing {out}")
    finally:
        if fd is not None:
            os.close(fd)


def check_out(out: str | Path, model: str | Path, overwrite: bool, log=lambda msg: None) -> Path:
    """Validate an output folder before any work: -> the absolute path to write. Raises ValueError/FileExistsError.

    Refused: the model folder itself or a folder that contains it, the current folder or one containing it, a
    symlink, a file, a folder that exists (without --overwrite), and with --overwrite anything but a checkpoint
    minigptq wrote that holds only the files minigptq writes. The nearest existing parent must be writable.
    First the previous checkpoint of an --overwrite stopped between its two renames is recovered (recover_swap).
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
    recover_swap(o, log)
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
        old = o.parent / f".{o.name}.old"
        if os.path.lexists(old):  # what recover_swap must leave: not minigptq's, or beside an incomplete --out
            raise Error(f"--overwrite first moves {given} aside to {old}, but something is there already (minigptq "
                        f"removes only its own previous checkpoint, beside a complete --out); move {old} away")
    parent = next(p for p in o.parents if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write --out {given}: {parent} is not a writable folder "
                              f"(read-only file system or no permission)")
    try:
        name_max = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    if len(os.fsencode(f".{o.name}.partial")) > name_max:  # found now, not after the calibration
        raise Error(f"--out name {o.name[:20]}... is {len(os.fsencode(o.name))} bytes long; the work folder beside it "
                    f"(.<name>.partial) must fit this file system's {name_max} bytes per name, so at most "
                    f"{name_max - len('..partial')} bytes")
    return o


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
        if os.path.lexists(tmp):  # left by a run at this --out that was stopped while assembling (we hold the lock)
            if not _only_our_files(tmp, tmp_too=True):
                self.keep = True
                raise Error(f"{tmp}, where the checkpoint is assembled, holds files minigptq did not write (or is not "
                            f"a folder); move it away and rerun with --resume (the finished blocks are kept in "
                            f"{self.dir})")
            _remove_ours(tmp)
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
                _flush(tmp / name)
        write_json(tmp / "config.json", dict(config, quantization_config=quant_config,
                                             torch_dtype=str(dtype).removeprefix("torch.")))
        write_json(tmp / "quantize_config.json", quant_config)
        write_text(tmp / "quant_log.tsv", "block\tmodule\tmethod\terror\tpercdamp\tseconds\n" + "".join(
            f"{r['block']}\t{r['module']}\t{r['method']}\t{r['error']:.6g}\t{r['percdamp']}\t{r['seconds']:.3f}\n"
            for r in self.records()))
        fsync_dir(tmp)
        self._install(tmp)
        shutil.rmtree(self.dir)
        self.created = []

    def _install(self, tmp: Path) -> None:
        """Rename the assembled folder to --out, which must still be what check_out accepted: nothing, or (with
        --overwrite) the same minigptq checkpoint, moved aside to `.<out>.old` first so the swap is two renames.
        Anything else at --out (made by a person or program while this run worked) is never replaced."""
        now = out_state(self.out)
        if now is not None and now != self.seen:
            self._refuse()
        if now is None:  # new, or the previous checkpoint was removed meanwhile: nothing there to lose
            try:
                rename_new(tmp, self.out)
            except FileExistsError:  # appeared since the check just above
                self._refuse()
            fsync_dir(self.out.parent)
            return
        old = self.out.parent / f".{self.out.name}.old"
        try:
            rename_new(self.out, old)
        except FileExistsError:
            self.keep = True
            raise Error(f"cannot move the previous {self.out} aside: {old} appeared while this run worked; move it "
                        f"away and rerun with --resume --overwrite (the finished blocks are kept in {self.dir})") \
                from None
        if out_state(old)[3] != self.seen[3]:  # changed in the instant before the rename: put it back untouched
            rename_new(old, self.out)
            self._refuse()
        try:
            rename_new(tmp, self.out)
        except FileExistsError:
            self.keep = True
            raise Error(f"--out {self.out} appeared again while this run replaced it; it was left as it is: the "
                        f"previous checkpoint is in {old}: move {self.out} away and rerun with --resume --overwrite "
                        f"(which restores {old.name} first)") from None
        fsync_dir(self.out.parent)
        _remove_ours(old, self.log)

    def _refuse(self) -> None:
        self.keep = True
        now = out_state(self.out)
        if self.seen is None:
            what = f"appeared while this run worked ({_describe(now)})"
        elif now is not None and now[:3] == self.seen[:3]:  # the same folder: name what differs
            names = sorted({e[0] for e in set(now[3]) ^ set(self.seen[3])})
            what = (f"changed while this run worked ({', '.join(names[:5])}{' ...' if len(names) > 5 else ''} "
                    f"added, removed or edited since --overwrite accepted it)")
        else:
            what = f"was replaced while this run worked (now {_describe(now)}, not the checkpoint --overwrite accepted)"
        raise Error(f"--out {self.out} {what}: it was left as it is and no checkpoint was written; the finished "
                    f"blocks are kept in {self.dir}: move {self.out} away and rerun with --resume to write it")


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
