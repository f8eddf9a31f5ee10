"""Commit safety (issue 28, items 1-3 and the default --out): what a quantize run may replace or remove when it
writes its checkpoint, with a person's shell acting on the same folders while the run works.

The cases that race with the run use real processes: the run is suspended as with Ctrl-Z (SIGSTOP) while the
"user" changes --out, or a small wrapper around the command (HOOKED, test code only) kills or pauses it at one of
the commit's steps. Every case asserts the exit code, the one-line message, and that the user's files are
byte-identical afterwards. The cheaper variants run in-process with the user's action hooked in after the blocks.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from test_hostile import assert_one_error, calib_file, changed, model_copy, quant_argv, run_cli, snapshot

# The quantize command with one commit step made observable, for the cases a shell cannot time by itself.
# argv[1] names the step: kill-after-aside (SIGKILL right after --out was renamed to .<out>.old), kill-after-swap
# (right after the new checkpoint was renamed to --out), appear-at-rename (a user's folder appears at --out in the
# instant before the final rename), pause-assembling (wait for a file `go` beside --out once .<out>.tmp is written).
HOOKED = r"""
import os, signal, sys, time
from pathlib import Path
import minigptq.checkpoint_writer as ck
import minigptq.out_folder as out_folder
step, argv = sys.argv[1], sys.argv[2:]
real_rename, real_shards = getattr(out_folder, "rename_new", None), ck.write_shards

def rename_new(src, dst):
    src, dst = Path(src), Path(dst)
    if step == "appear-at-rename" and src.name.endswith(".tmp"):
        dst.mkdir()
        (dst / "notes.txt").write_text("made at the last instant")
    real_rename(src, dst)
    if (step == "kill-after-aside" and dst.name.endswith(".old")) or \
            (step == "kill-after-swap" and src.name.endswith(".tmp")):
        os.kill(os.getpid(), signal.SIGKILL)

def write_shards(folder, tensors):
    real_shards(folder, tensors)
    deadline = time.time() + 120
    while step == "pause-assembling" and not (folder.parent / "go").exists() and time.time() < deadline:
        time.sleep(0.02)

out_folder.rename_new, ck.write_shards = rename_new, write_shards
from minigptq import quantize
from minigptq.cli import run
run(quantize.main, quantize.parser(), argv)
"""


STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_leftover_processes():
    """A failed assertion must not leave a paused or stopped run behind."""
    yield
    while STARTED:
        p = STARTED.pop()
        if p.poll() is None:
            p.kill()
            p.communicate()


def start(root: Path, m: Path, *extra, step: str | None = None, out: str = "q") -> subprocess.Popen:
    """A real quantize process at root/out (through HOOKED when a step is named)."""
    argv = quant_argv(root, m, root / out, *extra)
    cmd = [sys.executable, "-c", HOOKED, step, *argv] if step else [sys.executable, "-m", "minigptq.quantize", *argv]
    STARTED.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return STARTED[-1]


def wait_for(cond, p: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and p.poll() is None:
        try:
            if cond():
                return
        except (ValueError, OSError):
            pass  # a file being replaced right now
        time.sleep(0.01)
    p.kill()
    raise AssertionError(f"the run did not reach: {what}: {p.communicate()[1][-2000:]}")


def started(root: Path) -> bool:
    """The run holds its work folder (state.json written): --out was checked long ago."""
    return (root / ".q.partial" / "state.json").exists()


def blocks(root: Path) -> int:
    return len(json.loads((root / ".q.partial" / "state.json").read_text())["blocks"])


def outside_work(snap: dict) -> dict:
    """A snapshot without the run's own work folder (it changes while the run works)."""
    return {k: v for k, v in snap.items() if not k.startswith(".q.partial")}


@pytest.fixture(scope="module")
def previous(tmp_path_factory):
    """A checkpoint minigptq wrote with other settings: the `--overwrite` target."""
    root = tmp_path_factory.mktemp("prev")
    calib_file(root)
    got, err = run_cli("quantize", quant_argv(root, model_copy(root), root / "q", "--groupsize", "16"))
    assert got == 0, err
    return root / "q"


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """tmp_path with a model copy `m` and calib.txt, as the current folder -> the model path."""
    m = model_copy(tmp_path)
    calib_file(tmp_path)
    monkeypatch.chdir(tmp_path)
    return m


def resume_ok(root: Path, m: Path, *extra) -> None:
    got, err = run_cli("quantize", quant_argv(root, m, root / "q", "--resume", *extra))
    assert got == 0 and "resumed from block_0000" in err, err[-2000:]
    assert (root / "q" / "model.safetensors").is_file()
    assert not [p.name for p in root.iterdir() if p.name.startswith(".q.")]


# -- item 1: what appears at --out while the run works is never replaced ---------------------------------------------

@pytest.mark.parametrize("overwrite", [False, True], ids=["new-out", "overwrite"])
def test_folder_made_at_out_during_the_run_is_kept(tmp_path, setup, previous, overwrite):
    """The user suspends the run (Ctrl-Z), writes q/notes.txt, resumes it: the commit refuses, notes.txt survives,
    the finished blocks stay for --resume."""
    m, q = setup, tmp_path / "q"
    if overwrite:
        shutil.copytree(previous, q)
    p = start(tmp_path, m, *(["--overwrite"] if overwrite else []))
    wait_for(lambda: started(tmp_path), p, "its work folder")
    p.send_signal(signal.SIGSTOP)
    q.mkdir(exist_ok=True)
    (q / "notes.txt").write_text("my notes")
    before = outside_work(snapshot(tmp_path))
    p.send_signal(signal.SIGCONT)
    _, err = p.communicate(timeout=300)
    assert_one_error(p.returncode, err, 2, ["--out", "changed while this run worked" if overwrite else "appeared",
                                            "notes.txt", "left as it is", "--resume"])
    assert not changed(before, outside_work(snapshot(tmp_path)))
    assert (q / "notes.txt").read_text() == "my notes"
    assert blocks(tmp_path) == 5 and not (tmp_path / ".q.tmp").exists()
    if not overwrite:
        shutil.move(q, tmp_path / "mine")  # what the message says to do
        resume_ok(tmp_path, m)
        assert (tmp_path / "mine" / "notes.txt").read_text() == "my notes"


def test_folder_made_in_the_instant_before_the_rename_is_kept(tmp_path, setup):
    """The folder appears after the commit's last check, before its rename: the no-replace rename refuses."""
    p = start(tmp_path, setup, step="appear-at-rename")
    _, err = p.communicate(timeout=300)
    assert_one_error(p.returncode, err, 2, ["appeared", "notes.txt", "--resume"])
    assert sorted(os.listdir(tmp_path / "q")) == ["notes.txt"]
    assert (tmp_path / "q" / "notes.txt").read_text() == "made at the last instant"
    assert blocks(tmp_path) == 5 and not (tmp_path / ".q.tmp").exists()


def during_run(monkeypatch, action) -> None:
    """Call action() once every block is done, just before the checkpoint is assembled (in-process runs)."""
    import minigptq.driver as driver
    real = driver.quantize_checkpoint

    def hooked(*args, **kw):
        top = real(*args, **kw)
        action()
        return top
    monkeypatch.setattr(driver, "quantize_checkpoint", hooked)


def make_user_folder(root: Path) -> Path:
    d = root / "mine"
    d.mkdir(exist_ok=True)
    (d / "notes.txt").write_text("my notes")
    return d


@pytest.mark.parametrize("kind,needle", [
    ("file", "a file"), ("symlink", "a symbolic link"), ("empty-folder", "an empty folder"),
    ("edited-previous", "config.json")])
def test_other_things_at_out_are_kept(tmp_path, setup, previous, monkeypatch, kind, needle):
    """--out becomes a file, a link to a user's folder, an empty folder (which a plain rename(2) would replace); or
    the checkpoint --overwrite was given for is edited: refused at the commit, all of it unchanged, the blocks kept."""
    q, overwrite = tmp_path / "q", kind == "edited-previous"
    if overwrite:
        shutil.copytree(previous, q)
    make_user_folder(tmp_path)
    act = {"file": lambda: q.write_text("mine"), "symlink": lambda: q.symlink_to(tmp_path / "mine"),
           "empty-folder": lambda: q.mkdir(),
           "edited-previous": lambda: (q / "config.json").write_text((q / "config.json").read_text() + " ")}[kind]
    snaps = {}
    during_run(monkeypatch, lambda: (act(), snaps.setdefault("before", outside_work(snapshot(tmp_path)))))
    got, err = run_cli("quantize", quant_argv(tmp_path, setup, q, *(["--overwrite"] if overwrite else [])))
    assert_one_error(got, err, 2, ["--out", needle, "left as it is", "--resume"])
    assert not changed(snaps["before"], outside_work(snapshot(tmp_path)))
    assert blocks(tmp_path) == 5


def test_previous_checkpoint_removed_by_the_user_during_overwrite(tmp_path, setup, previous, monkeypatch):
    """Nothing is at --out any more at the commit: nothing to lose, the new checkpoint is written."""
    q = tmp_path / "q"
    shutil.copytree(previous, q)
    during_run(monkeypatch, lambda: shutil.rmtree(q))
    got, err = run_cli("quantize", quant_argv(tmp_path, setup, q, "--overwrite"))
    assert_one_error(got, err, 0)
    assert (q / "model.safetensors").is_file()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".q.")]


# -- item 2: a run refused by the lock removes nothing ---------------------------------------------------------------

def test_refused_second_run_leaves_the_first_runs_work(tmp_path, setup):
    """Run A at a/b/q (it made a/ and a/b/) is paused while assembling its checkpoint in .q.tmp; run B at the same
    --out (plain, --overwrite, --resume) is refused and changes nothing, not even the parent folders; A finishes."""
    m, q = setup, tmp_path / "a" / "b" / "q"
    p = start(tmp_path, m, step="pause-assembling", out="a/b/q")
    wait_for(lambda: (q.parent / ".q.tmp" / "model.safetensors").exists(), p, "assembling .q.tmp")
    before = snapshot(tmp_path)
    for extra in ([], ["--overwrite"], ["--resume"]):
        got, err = run_cli("quantize", quant_argv(tmp_path, m, q, *extra))
        assert_one_error(got, err, 2, ["another minigptq run is writing", "wait for it"])
        assert not changed(before, snapshot(tmp_path))
    (q.parent / "go").write_text("")
    _, err = p.communicate(timeout=300)
    assert_one_error(p.returncode, err, 0)
    assert (q / "model.safetensors").is_file()
    assert not [p.name for p in q.parent.iterdir() if p.name.startswith(".q.")]


def test_empty_work_folder_left_by_a_racing_start_is_reused(tmp_path, setup):
    """An empty .q.partial (a run started at the same moment made it, then was refused) holds nothing to resume:
    the next run uses it without --resume."""
    (tmp_path / ".q.partial").mkdir()
    got, err = run_cli("quantize", quant_argv(tmp_path, setup, tmp_path / "q"))
    assert_one_error(got, err, 0)
    assert not (tmp_path / ".q.partial").exists()


# -- item 3: SIGKILL between the two renames of --overwrite ----------------------------------------------------------

def killed_overwrite(tmp_path, m, previous, step):
    q = tmp_path / "q"
    shutil.copytree(previous, q)
    prev = snapshot(q)
    p = start(tmp_path, m, "--overwrite", step=step)
    p.communicate(timeout=300)
    assert p.returncode == -signal.SIGKILL
    return prev


def test_killed_after_moving_aside_restores_the_previous_checkpoint(tmp_path, setup, previous):
    m, q, old = setup, tmp_path / "q", tmp_path / ".q.old"
    prev = killed_overwrite(tmp_path, m, previous, "kill-after-aside")
    assert not q.exists() and old.is_dir()
    got, err = run_cli("quantize", quant_argv(tmp_path, m, q))  # any next run: here one without flags
    assert_one_error(got, err, 2, ["already exists", "--overwrite"])
    assert "restored the previous checkpoint" in err
    assert snapshot(q) == prev and not old.exists()
    resume_ok(tmp_path, m, "--overwrite")  # the killed run's blocks, committed now


def test_killed_after_the_swap_removes_the_stale_old(tmp_path, setup, previous):
    m, q, old = setup, tmp_path / "q", tmp_path / ".q.old"
    prev = killed_overwrite(tmp_path, m, previous, "kill-after-swap")
    assert old.is_dir() and snapshot(old) == prev
    new = snapshot(q)
    assert new != prev and (q / "model.safetensors").is_file()
    got, err = run_cli("quantize", quant_argv(tmp_path, m, q, "--resume"))
    assert_one_error(got, err, 2, ["already exists", "--overwrite"])
    assert "removed .q.old" in err
    assert not old.exists() and snapshot(q) == new


def test_old_that_minigptq_did_not_write_is_never_touched(tmp_path, setup, previous):
    """A user's folder named .q.old: kept beside a missing --out (the run writes q), and an --overwrite that would
    need the name is refused before any work."""
    m, q, old = setup, tmp_path / "q", tmp_path / ".q.old"
    old.mkdir()
    (old / "model.safetensors").write_text("my own file")
    mine = snapshot(old)
    got, err = run_cli("quantize", quant_argv(tmp_path, m, q))
    assert_one_error(got, err, 0)
    assert snapshot(old) == mine
    before = snapshot(tmp_path)
    got, err = run_cli("quantize", quant_argv(tmp_path, m, q, "--overwrite"))
    assert_one_error(got, err, 2, [".q.old", "move"])
    assert not changed(before, snapshot(tmp_path))


# -- item 4: `cd model && quantize --model .` ------------------------------------------------------------------------

def test_default_out_of_dot_model_is_beside_it(tmp_path, setup, monkeypatch):
    """`cd m && quantize --model .` writes ../m-gptq-4bit-g32, never a hidden `.-gptq-4bit-g32` inside the model."""
    m = setup
    monkeypatch.chdir(m)
    before = snapshot(m)
    argv = quant_argv(tmp_path, Path("."), tmp_path / "x")
    argv = argv[:2] + argv[4:]  # no --out: the default
    got, err = run_cli("quantize", argv)
    assert_one_error(got, err, 0)
    assert not changed(before, snapshot(m)), "the run wrote inside the model folder"
    assert (tmp_path / "m-gptq-4bit-g32" / "model.safetensors").is_file()


# -- past the list: the run's own hidden folders held by something else ---------------------------------------------

@pytest.mark.parametrize("kind,flags,needle", [
    ("symlink", ["--overwrite"], "symbolic link"), ("symlink", ["--resume"], "symbolic link"),
    ("file", [], "not a folder")])
def test_work_folder_that_is_not_a_real_folder(tmp_path, setup, kind, flags, needle):
    """.q.partial a link to a user's folder (--overwrite would empty it) or a file: refused, nothing changed."""
    mine = make_user_folder(tmp_path)
    if kind == "symlink":
        (tmp_path / ".q.partial").symlink_to(mine)
    else:
        (tmp_path / ".q.partial").write_text("mine")
    before = snapshot(tmp_path)
    got, err = run_cli("quantize", quant_argv(tmp_path, setup, tmp_path / "q", *flags))
    assert_one_error(got, err, 2, [".q.partial", needle])
    assert not changed(before, snapshot(tmp_path))


@pytest.mark.parametrize("kind", ["folder", "symlink"])
def test_assembly_folder_that_minigptq_did_not_write(tmp_path, setup, kind):
    """A user's .q.tmp (a folder with their file, or a link to one): never emptied; refused at the commit with the
    blocks kept, and --resume writes the checkpoint once it is moved away."""
    mine, tmp = make_user_folder(tmp_path), tmp_path / ".q.tmp"
    {"folder": lambda: shutil.copytree(mine, tmp), "symlink": lambda: tmp.symlink_to(mine)}[kind]()
    before = snapshot(tmp_path)
    got, err = run_cli("quantize", quant_argv(tmp_path, setup, tmp_path / "q"))
    assert_one_error(got, err, 2, [".q.tmp", "did not write", "--resume"])
    assert not changed(before, outside_work(snapshot(tmp_path)))
    assert blocks(tmp_path) == 5
    if kind == "folder":
        tmp.rename(tmp_path / "moved")
        resume_ok(tmp_path, setup)


def test_stale_assembly_folder_of_a_killed_run_is_replaced(tmp_path, setup):
    """.q.tmp holding only minigptq's half-written files (a run killed while assembling) is cleared and reused."""
    tmp = tmp_path / ".q.tmp"
    tmp.mkdir()
    (tmp / "model.safetensors.tmp").write_bytes(b"half")
    (tmp / "config.json").write_text("{}")
    got, err = run_cli("quantize", quant_argv(tmp_path, setup, tmp_path / "q"))
    assert_one_error(got, err, 0)
    assert not tmp.exists() and (tmp_path / "q" / "model.safetensors").is_file()


def test_old_that_is_a_link_is_never_followed(tmp_path, setup, previous):
    """.q.old a symbolic link to a user's checkpoint, --out missing: never moved to --out nor emptied."""
    theirs = tmp_path / "theirs"
    shutil.copytree(previous, theirs)
    (tmp_path / ".q.old").symlink_to(theirs)
    before = snapshot(tmp_path)
    got, err = run_cli("quantize", quant_argv(tmp_path, setup, tmp_path / "q"))
    assert_one_error(got, err, 0)
    assert "restored" not in err
    assert not changed(before, snapshot(tmp_path)) - {"q"} - {f"q/{n}" for n in os.listdir(tmp_path / "q")}


def test_out_name_too_long_for_the_work_folder(tmp_path, setup):
    """The hidden .<out>.partial adds 9 bytes to --out's name: refused before the calibration, at the exact edge."""
    from minigptq.out_folder import check_out
    assert check_out(tmp_path / ("q" * 246), setup, False).name == "q" * 246  # .<246>.partial = 255 bytes: fits
    before = snapshot(tmp_path)
    got, err = run_cli("quantize", quant_argv(tmp_path, setup, tmp_path / ("q" * 247)))
    assert_one_error(got, err, 2, ["247 bytes", "at most 246"])
    assert "calibration" not in err  # found before any work
    assert not changed(before, snapshot(tmp_path))
