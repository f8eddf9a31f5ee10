"""Where a quantization run may write, and how its finished checkpoint takes the place of --out.

- check_out, before any work: --out must be a new folder, or with --overwrite a checkpoint minigptq wrote holding
  only the files minigptq writes (never the model folder, the current folder, a link, a file, a user's folder).
- out_state: what is at --out (type, identity, each entry), taken when --out is accepted; install, at the end,
  renames the assembled folder to --out only if --out is still exactly that (nothing, or the same checkpoint, which
  is moved aside to `.<out>.old` first: two renames that never replace anything, durable.rename_new).
- recover_swap: a run stopped between those two renames left the previous checkpoint in `.<out>.old`: the next run
  puts it back (nothing at --out) or removes it (--out is complete).
The work folder whose blocks are assembled is minigptq/checkpoint_writer.py's PartialRun.
"""
from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

from . import Error
from .config import read_json
from .durable import fsync_dir, rename_new

# The files of a checkpoint minigptq writes: the model's tokenizer and generation files, copied, and its own.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja")
CHECKPOINT_FILES = TOKENIZER_FILES + ("config.json", "quantize_config.json", "quant_log.tsv",
                                      "model.safetensors", "model.safetensors.index.json")


def written_by_minigptq(folder: Path) -> bool:
    """True if `folder` is a checkpoint minigptq wrote: its quantize_config.json names minigptq as the quantizer."""
    try:  # read_json: a regular file of bounded size only, a FIFO there would block the read
        q = read_json(folder / "quantize_config.json")
        return any(str(x).startswith("minigptq:") for x in q["meta"]["quantizer"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _is_our_file(name: str) -> bool:
    return name in CHECKPOINT_FILES or (name.startswith("model-") and name.endswith(".safetensors"))


def only_our_files(folder: Path, tmp_too: bool = False) -> bool:
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


def remove_ours(folder: Path, log=lambda msg: None) -> None:
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
    """Finish what a run killed inside the two renames of an --overwrite left behind (install): the
    previous checkpoint in `.<out>.old`. Restored to `out` if nothing is there, or removed if `out` is a complete
    minigptq checkpoint. A `.old` that is not a minigptq checkpoint is never touched."""
    old = out.parent / f".{out.name}.old"
    if not (written_by_minigptq(old) and only_our_files(old)):
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
            remove_ours(old, log)
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


# -- the commit: the assembled checkpoint takes the place of --out -------------------------------------------------

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


def install(tmp: Path, out: Path, seen: tuple | None, work: Path, log=lambda msg: None) -> None:
    """Rename the assembled folder tmp to --out, which must still be what check_out accepted (seen: out_state(out)
    then): nothing, or (with --overwrite) the same minigptq checkpoint, moved aside to `.<out>.old` first so the swap
    is two renames. Anything else at --out (made by a person or program while the run worked) is never replaced: an
    Error says so, and that the finished blocks are kept in the work folder `work` for --resume."""
    now = out_state(out)
    if now is not None and now != seen:
        _refuse(out, seen, work)
    if now is None:  # new, or the previous checkpoint was removed meanwhile: nothing there to lose
        try:
            rename_new(tmp, out)
        except FileExistsError:  # appeared since the check just above
            _refuse(out, seen, work)
        fsync_dir(out.parent)
        return
    old = out.parent / f".{out.name}.old"
    try:
        rename_new(out, old)
    except FileExistsError:
        raise Error(f"cannot move the previous {out} aside: {old} appeared while this run worked; move it "
                    f"away and rerun with --resume --overwrite (the finished blocks are kept in {work})") \
            from None
    if out_state(old)[3] != seen[3]:  # changed in the instant before the rename: put it back untouched
        rename_new(old, out)
        _refuse(out, seen, work)
    try:
        rename_new(tmp, out)
    except FileExistsError:
        raise Error(f"--out {out} appeared again while this run replaced it; it was left as it is: the "
                    f"previous checkpoint is in {old}: move {out} away and rerun with --resume --overwrite "
                    f"(which restores {old.name} first)") from None
    fsync_dir(out.parent)
    remove_ours(old, log)


def _refuse(out: Path, seen: tuple | None, work: Path) -> None:
    now = out_state(out)
    if seen is None:
        what = f"appeared while this run worked ({_describe(now)})"
    elif now is not None and now[:3] == seen[:3]:  # the same folder: name what differs
        names = sorted({e[0] for e in set(now[3]) ^ set(seen[3])})
        what = (f"changed while this run worked ({', '.join(names[:5])}{' ...' if len(names) > 5 else ''} "
                f"added, removed or edited since --overwrite accepted it)")
    else:
        what = f"was replaced while this run worked (now {_describe(now)}, not the checkpoint --overwrite accepted)"
    raise Error(f"--out {out} {what}: it was left as it is and no checkpoint was written; the finished "
                f"blocks are kept in {work}: move {out} away and rerun with --resume to write it")
