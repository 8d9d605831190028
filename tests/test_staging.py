"""Hidden siblings a killed run leaves next to an output are removed by the next run for that output, and only
those: a live process's (whatever its pid namespace), another host's, and the only copy of a previous output stay."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import fixture_data
from converter import convert as pipeline, staging
from converter.unpack import safe_extract

CLS = "ch_ppocr_mobile_v2.0_cls"
REPO = Path(__file__).resolve().parents[1]


def _left_by_a_killed_process(target: Path, role: str, content: str = "half-written") -> Path:
    """A sibling made by another process that is gone by now (as a run killed while writing leaves it)."""
    code = ("import sys; from pathlib import Path; from converter import staging; "
            "d = staging.Staged(Path(sys.argv[1]), sys.argv[2]).path; "
            "(d / 'model.safetensors').write_text(sys.argv[3]); print(d)")
    made = subprocess.run([sys.executable, "-c", code, str(target), role, content], capture_output=True, text=True,
                          check=True, cwd=REPO)
    return Path(made.stdout.strip())


def test_a_killed_conversion_s_temp_directory_is_removed_by_the_next_one(tmp_path):
    out = tmp_path / "cls"
    stale = _left_by_a_killed_process(out, "tmp")
    running = staging.Staged(out, "tmp")  # this process works in it: e.g. a parallel batch worker
    elsewhere = tmp_path / f".cls.tmp-otherhost-{os.getpid() + 1}-abc"  # another host's, on a shared disk
    elsewhere.mkdir()
    assert stale.name.startswith(".cls.tmp-") and stale.is_dir()

    pipeline.convert(fixture_data.infer_tar(CLS), out=out, check=False)
    assert not stale.exists() and running.path.is_dir() and elsewhere.is_dir()
    assert (out / "model.safetensors").is_file()
    running.release()


def test_a_live_process_s_directory_is_kept_whatever_its_pid_says(tmp_path):
    """A process in another pid namespace (a container sharing the volume and the host name) has pids that do not
    exist here; its lock says it is alive. Once it ends, its directory goes."""
    out = tmp_path / "cls"
    code = ("import sys; from pathlib import Path; from converter import staging; "
            "s = staging.Staged(Path(sys.argv[1]), 'tmp'); print(s.path, flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, cwd=REPO)
    try:
        made = Path(holder.stdout.readline().strip())
        host = made.name.split("-")[1]
        foreign = made.rename(made.with_name(f".cls.tmp-{host}-4194999-abc"))  # a pid no process has here
        pipeline.convert(fixture_data.infer_tar(CLS), out=out, check=False)
        assert foreign.is_dir()
    finally:
        holder.communicate("")
    pipeline.convert(fixture_data.infer_tar(CLS), out=out, check=False, force=True)
    assert not foreign.exists()


def test_the_only_copy_of_a_previous_output_is_kept_until_an_output_exists_again(tmp_path):
    """A run killed between moving the old output aside and moving the new one in leaves the old one in an "old"
    sibling: it is kept while ``out`` is missing, and removed once a new output is in place."""
    out = tmp_path / "cls"
    aside = _left_by_a_killed_process(out, "old", content="previous output")
    pipeline.convert(fixture_data.infer_tar(CLS), out=out, check=False)
    assert aside.is_dir() and (aside / "model.safetensors").read_text() == "previous output"
    pipeline.convert(fixture_data.infer_tar(CLS), out=out, check=False, force=True)
    assert not aside.exists()


def test_a_killed_unpack_s_partial_directory_is_removed_by_the_next_one(tmp_path):
    dest = tmp_path / "unpacked"
    stale = _left_by_a_killed_process(dest, "partial")
    safe_extract(fixture_data.infer_tar(CLS), dest)
    assert not stale.exists() and any(dest.rglob("inference.pdiparams"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unpacked"]


def test_symlinks_and_files_named_like_siblings_are_left_alone(tmp_path):
    target = tmp_path / "out"
    dead = _left_by_a_killed_process(target, "tmp")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("x")
    os.rename(dead, tmp_path / "moved")
    link = tmp_path / dead.name  # a dead process's sibling name, but a symlink to a user's directory
    link.symlink_to(victim, target_is_directory=True)
    assert staging.remove_stale(target, ("tmp",)) == []
    assert (victim / "keep").is_file() and link.is_symlink()


def test_a_directory_being_made_is_never_seen_unlocked(tmp_path, monkeypatch):
    """It was made under its final name and locked a moment later: another run's remove_stale in between took it
    for a killed run's and removed it under the process about to write in it."""
    target = tmp_path / "out"
    make = staging.tempfile.mkdtemp

    def made_then_raced(*args, **kwargs):
        path = make(*args, **kwargs)
        staging.remove_stale(target, ("tmp",))  # another run for the same output, at the worst moment
        return path

    monkeypatch.setattr(staging.tempfile, "mkdtemp", made_then_raced)
    with staging.Staged(target, "tmp") as staged:
        assert staged.path.is_dir() and staged.path.name.startswith(".out.tmp-")
        monkeypatch.undo()
        assert staging.remove_stale(target, ("tmp",)) == [] and staged.path.is_dir()


def test_unreadable_vanished_or_undeletable_siblings_are_skipped(tmp_path, monkeypatch):
    target = tmp_path / "out"
    dead = _left_by_a_killed_process(target, "tmp")
    real_open = staging.os.open

    def refused(path, *args, **kwargs):
        if Path(path) == dead:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(staging.os, "open", refused)  # e.g. a root-owned 0700 sibling of a killed sudo run
    assert staging.remove_stale(target, ("tmp",)) == [] and dead.is_dir()
    monkeypatch.undo()
    monkeypatch.setattr(staging.shutil, "rmtree", lambda *a, **k: None)  # removal fails silently
    assert staging.remove_stale(target, ("tmp",)) == [] and dead.is_dir()
    monkeypatch.undo()
    assert staging.remove_stale(target, ("tmp",)) == [dead] and not dead.exists()
