"""Files that are either whole or absent, and renames that never replace anything: what the writers build on.

- write_json, write_text, save_tensors (safetensors): written under a temporary name, fsync()ed, renamed into place,
  and the folder fsync()ed, so that a crash or a full disk never leaves half a file under the real name.
- rename_new: a rename that refuses to replace what is at the destination (Linux's renameat2 RENAME_NOREPLACE),
  so that a folder a user made meanwhile is never lost (minigptq/out_folder.py commits a checkpoint with it).
- sha256_file: a file's checksum (a finished block's file is reused by --resume only if it still matches).
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor


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


def flush(path: Path) -> None:
    """Make a new file readable like any other and force its bytes to disk."""
    os.chmod(path, FILE_MODE)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _commit(tmp: Path, path: Path) -> None:
    """Flush tmp, rename it to path, flush the folder entry."""
    flush(tmp)
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
