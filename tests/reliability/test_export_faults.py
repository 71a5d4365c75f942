"""`mergeopt export` on a full disk or a read-only run folder: one clear line, non-zero exit, the study intact,
and the same export succeeds once the fault is gone."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import write_space
from reliability_helpers import completed, load, mergeopt_cli

from optimizer import cli
from optimizer.files import temporary_path
from optimizer.search.loop import run_search
from optimizer.space import load_space

pytestmark = pytest.mark.slow  # the kill/resume/fault/worker suites: `pytest -m slow` (CI's slow tier)


@pytest.fixture(scope="module")
def finished_run(search_setup, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("export") / "run"
    run_search(load_space(write_space(search_setup, "export", budget={"trials": 4}, limit=6)), run_dir,
               progress=False)
    return run_dir


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _mount(*args) -> bool:
    return subprocess.run(["mount", *map(str, args)], capture_output=True).returncode == 0


def _in_process(*args) -> subprocess.CompletedProcess:
    """``mergeopt ARGS`` in this process (so its temporary files carry this process's id), output captured."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in args])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def _check_fault_then_recovery(run_dir: Path, expected: str, repair, run=mergeopt_cli) -> None:
    db = run_dir / "study.db"
    before_db, before = _digest(db), completed(load(db, "export"))
    proc = run("export", run_dir)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("mergeopt export: error: ") and expected in proc.stderr, proc.stderr
    assert "rerun 'mergeopt export'" in proc.stderr or "writable" in proc.stderr
    assert _digest(db) == before_db and completed(load(db, "export")) == before  # the study is untouched
    assert not list(run_dir.rglob("*.tmp"))  # no half-written file left behind
    repair()
    proc = mergeopt_cli("export", run_dir)
    assert proc.returncode == 0, proc.stderr
    assert (run_dir / "best.yaml").is_file() and (run_dir / "pareto" / "front.csv").is_file()
    assert len((run_dir / "trials.csv").read_text().splitlines()) == 5


def test_read_only_run_folder(finished_run, tmp_path, figures):
    source = tmp_path / "source"
    shutil.copytree(finished_run, source)
    view = tmp_path / "view"
    view.mkdir()
    if os.geteuid() == 0:  # root writes through chmod: a read-only bind mount is the real thing
        if not (_mount("--bind", source, view) and _mount("-o", "remount,ro,bind", view)):
            subprocess.run(["umount", "-l", str(view)], capture_output=True)
            pytest.skip("mount is not permitted here, and chmod does not stop root")
        run_dir, repair = view, lambda: _mount("-o", "remount,rw,bind", view)
    else:
        for folder in [source, *[p for p in source.rglob("*") if p.is_dir()]]:
            folder.chmod(0o555)
        run_dir = source

        def repair():
            for folder in [source, *[p for p in source.rglob("*") if p.is_dir()]]:
                folder.chmod(0o755)
    try:
        assert not os.access(run_dir, os.W_OK) or os.geteuid() == 0
        _check_fault_then_recovery(run_dir, "Read-only file system" if os.geteuid() == 0 else "Permission denied",
                                   repair)
    finally:
        subprocess.run(["umount", "-l", str(view)], capture_output=True)
    figures("export: read-only run folder")


def test_disk_full_during_export(finished_run, tmp_path, figures):
    """A real ENOSPC: /dev/full behind the file export writes, first the first file, then the last one."""
    for victim in ("trials.csv", "best.yaml"):
        run_dir = tmp_path / victim
        shutil.copytree(finished_run, run_dir)
        (run_dir / "best.yaml").unlink(missing_ok=True)
        temporary_path(run_dir / victim).symlink_to("/dev/full")  # where this process writes it first
        _check_fault_then_recovery(run_dir, "No space left on device", lambda: None, run=_in_process)
        figures("export: disk full")


def test_disk_full_on_a_small_filesystem(finished_run, tmp_path, figures):
    """The whole run folder on a tiny tmpfs filled to the last byte."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or not _mount("-t", "tmpfs", "-o", "size=2m", "tmpfs", mount):
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        run_dir = mount / "run"
        shutil.copytree(finished_run, run_dir)
        for name in ("trials.csv", "best.yaml"):
            (run_dir / name).unlink(missing_ok=True)
        shutil.rmtree(run_dir / "pareto", ignore_errors=True)
        filler = mount / "filler"
        with open(filler, "wb", buffering=0) as handle:
            try:
                while True:
                    handle.write(b"\0" * 4096)
            except OSError:
                pass
        _check_fault_then_recovery(run_dir, "No space left on device", lambda: filler.unlink())
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
    figures("export: disk full")
