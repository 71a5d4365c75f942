"""kill -9 at random moments, and Ctrl-C, during real `mergeopt search` processes: every resume continues, nothing
completed is lost, no candidate is completed twice, the CMA state matches its trials, and the budget is met."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import write_space
from optuna.trial import TrialState
from reliability_helpers import cma_problems, completed, duplicate_genomes, load

pytestmark = pytest.mark.slow  # the kill/resume/fault/worker suites: `pytest -m slow` (CI's slow tier)

KILLS = 10
ENDLESS = 100_000  # the killed runs' budget: however fast this machine is, no run ends before its kill
FINAL = 8  # the last run's budget: this many trials more than the kills left finished


def _command(space: Path, run_dir: Path, trials: int) -> list[str]:
    return [sys.executable, "-m", "optimizer.cli", "search", str(space), "--run-dir", str(run_dir), "--quiet",
            "--trials", str(trials)]


def _spent(study) -> int:
    return sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
               if not t.user_attrs.get("lost"))


def kill_loop(space: Path, run_dir: Path, name: str, seed: int) -> dict:
    """Start the search, kill -9 it after a random delay, check the study, repeat; then let it finish."""
    rng = random.Random(seed)
    db, lock = run_dir / "study.db", run_dir / ".lock"
    kills = 0
    survivors: dict[int, tuple] = {}  # every trial seen COMPLETE after some kill
    problems: list[str] = []
    while kills < KILLS:
        proc = subprocess.Popen(_command(space, run_dir, ENDLESS), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # the delay counts from the moment the run holds its folder (imports done), so kills land in the engine
        # load, the parents' scoring, asks, tells and candidates rather than in the interpreter's start-up
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if lock.is_file() and lock.read_text().strip() == str(proc.pid):
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 2.5))
        assert proc.poll() is None, proc.stderr.read().decode()  # it died before its kill
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        kills += 1
        try:
            study = load(db, name)
        except KeyError:  # killed before the study was created
            continue
        now = completed(study)
        lost = [n for n, rec in survivors.items() if now.get(n) != rec]
        problems += [f"kill {kills}: completed trial {n} lost or changed" for n in lost]
        problems += [f"kill {kills}: genome completed twice" for _ in duplicate_genomes(study)]
        survivors.update(now)
    target = _spent(load(db, name)) + FINAL
    final = subprocess.run(_command(space, run_dir, target), capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    study = load(db, name)
    now = completed(study)
    problems += [f"final: completed trial {n} lost or changed" for n, rec in survivors.items() if now.get(n) != rec]
    problems += ["final: genome completed twice" for _ in duplicate_genomes(study)]
    problems += [f"final: {p}" for p in cma_problems(study)]
    trials = study.get_trials(deepcopy=False)
    spent = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.FAIL) and not t.user_attrs.get("lost")]
    return {"kills": kills, "target": target, "problems": problems, "spent": len(spent),
            "lost_candidates": sum(1 for t in trials if t.user_attrs.get("lost")),
            "running": sum(t.state == TrialState.RUNNING for t in trials),
            "survivors": len(survivors), "trials": len(trials)}


def test_kill_minus_9_at_random_moments_cma_and_tpe(search_setup, tmp_path, figures):
    spaces = {
        "kill-cma": write_space(search_setup, "kill-cma", optimizer={"name": "cma", "popsize": 4},
                                objectives=["mc"], limit=4),
        "kill-tpe": write_space(search_setup, "kill-tpe", optimizer={"name": "tpe", "n_startup_trials": 6},
                                limit=4),
    }
    reports: dict[str, dict] = {}
    errors: list[BaseException] = []

    def drive(name: str, seed: int) -> None:
        try:
            reports[name] = kill_loop(spaces[name], tmp_path / name, name, seed)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(exc)

    # the two loops run side by side (one per core): each is a chain of processes started and killed in turn
    threads = [threading.Thread(target=drive, args=(name, seed)) for seed, name in enumerate(spaces)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    for name, report in reports.items():
        print(name, report)
        assert report["kills"] == KILLS, (name, report)
        assert not report["problems"], (name, report["problems"])
        assert report["spent"] == report["target"] and report["running"] == 0, (name, report)
        figures(f"kill -9 at a random moment ({name[5:]})", injected=report["kills"], survived=report["kills"])


def test_ctrl_c_stops_cleanly_with_130_and_the_run_resumes(search_setup, tmp_path, figures):
    """SIGINT at random moments of the search loop (twice, fixed seed): exit 130, nothing lost, resume goes on."""
    name, rounds, rng = "sigint", 2, random.Random(7)
    space = write_space(search_setup, name, optimizer={"name": "cma", "popsize": 4}, objectives=["mc"], limit=4)
    run_dir, db = tmp_path / "run", tmp_path / "run" / "study.db"
    kept: dict[int, tuple] = {}
    for round_ in range(rounds):
        proc = subprocess.Popen(_command(space, run_dir, ENDLESS), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        deadline = time.time() + 120
        while time.time() < deadline:  # a few candidates into this run's loop, then a random moment
            time.sleep(0.1)
            try:
                if len(completed(load(db, name))) >= len(kept) + 2:
                    break
            except Exception:  # the study is being created
                pass
        time.sleep(rng.uniform(0.0, 1.0))
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err
        assert "interrupted; everything so far is saved" in err and "Traceback" not in err, err
        study = load(db, name)
        now = completed(study)
        assert all(now.get(n) == rec for n, rec in kept.items())
        assert not [t for t in study.get_trials() if t.state == TrialState.RUNNING]
        assert not (run_dir / ".lock").exists() and (run_dir / "trials.csv").is_file()  # tables written on the way out
        assert not duplicate_genomes(study) and not cma_problems(study)
        kept = now
        figures("Ctrl-C (SIGINT to mergeopt search)")
    target = _spent(study) + 4
    resumed = subprocess.run(_command(space, run_dir, target), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    study = load(db, name)
    after = completed(study)
    assert all(after.get(n) == rec for n, rec in kept.items())
    assert len(after) == target and _spent(study) == target and not duplicate_genomes(study) and not cma_problems(study)
