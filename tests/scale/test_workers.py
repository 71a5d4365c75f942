"""Three worker processes on one study in PostgreSQL: the budget is met exactly, nothing is scored twice, and a
worker killed with SIGKILL mid-candidate loses only that candidate (its trial is failed through the heartbeat).

Needs ``MERGEOPT_TEST_POSTGRES`` (``export MERGEOPT_TEST_POSTGRES=$(bash .ci/postgres.sh)``); skipped without it
unless ``MERGEOPT_REQUIRE_POSTGRES=1``.
"""

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from helpers import write_space
from optuna.trial import TrialState

pytestmark = pytest.mark.slow  # the kill/resume/fault/worker suites: `pytest -m slow` (CI's slow tier)

ROOT = Path(__file__).resolve().parents[2]
HEARTBEAT = "1,3"  # beat every second, stale after 3 s: the killed worker's trial is failed within seconds
# Every candidate takes 4 s longer than it would: longer than the stale window, so only the heartbeat keeps a slow
# but living worker's trial alive; and long enough that every worker has started before the budget is spent
# (a candidate of the tiny models takes 30 ms, and one worker alone could otherwise finish before the others load).
SLOW = "slow=4@trial:0-999"


def start_workers(space_path: Path, url: str, study: str, run_dir: Path, n: int) -> list[subprocess.Popen]:
    env = dict(os.environ, MERGEOPT_HEARTBEAT=HEARTBEAT, MERGEOPT_FAULT=SLOW)
    # one run folder for all: several workers on one machine (one per GPU) share runs/<name>/
    cmd = [sys.executable, "-m", "optimizer.cli", "search", str(space_path), "--storage", url, "--study", study,
           "--run-dir", str(run_dir), "--quiet", "--device", "cpu"]
    return [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for _ in range(n)]


def load(url: str, study: str, timeout: float = 60) -> optuna.Study:
    deadline = time.time() + timeout
    while True:
        try:
            return optuna.load_study(study_name=study, storage=url)
        except KeyError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)


def owner_pid(trial) -> int | None:
    worker = trial.user_attrs.get("worker")
    return int(worker.split(":")[1]) if worker else None


def kill_mid_candidate(procs: list[subprocess.Popen], study: optuna.Study, timeout: float = 60):
    """SIGKILL one of the workers while it scores a candidate; returns (that worker, that trial's number).

    A worker is frozen (SIGSTOP) first, so the check "it has a RUNNING trial" still holds when the kill lands.
    """
    deadline = time.time() + timeout
    while time.time() < deadline:
        for proc in [p for p in procs if p.poll() is None]:
            os.kill(proc.pid, signal.SIGSTOP)
            mine = [t for t in study.get_trials(states=(TrialState.RUNNING,)) if owner_pid(t) == proc.pid]
            if mine:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return proc, mine[0].number
            os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.1)
    raise AssertionError("no worker had a candidate in flight")


@pytest.mark.parametrize("optimizer, trials", [({"name": "cma", "popsize": 4}, 8),
                                               ({"name": "tpe", "n_startup_trials": 3}, 8)],
                         ids=["cma", "tpe"])
def test_three_workers_share_one_study_and_survive_a_kill(postgres_url, search_setup, tmp_path, optimizer, trials):
    name = f"workers-{optimizer['name']}-{uuid.uuid4().hex[:8]}"
    tasks = tmp_path / "tasks.yaml"  # the multiple-choice task only: the quickest to score
    tasks.write_text(f"tasks:\n  - {{name: mc, kind: multiple_choice, path: {search_setup / 'mc.jsonl'}}}\n")
    space = write_space(search_setup, name, optimizer=optimizer, objectives=["mc"], budget={"trials": trials},
                        tasks=str(tasks), limit=8)
    procs = start_workers(space, postgres_url, name, tmp_path / "run", 3)
    try:
        study = load(postgres_url, name)
        deadline = time.time() + 90
        # mid-run: two workers have each scored a candidate, most of the budget is left
        while len({owner_pid(t) for t in study.get_trials(states=(TrialState.COMPLETE,))}) < 2:
            assert time.time() < deadline, "two workers did not each complete a trial within 90 s"
            assert all(p.poll() is None for p in procs), [p.stderr.read() for p in procs if p.poll() is not None]
            time.sleep(0.2)
        victim, killed = kill_mid_candidate(procs, study)
        for p in [p for p in procs if p is not victim]:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    trials_now = study.get_trials()
    complete = [t for t in trials_now if t.state == TrialState.COMPLETE]
    assert len(complete) == trials  # the budget, exactly: the lost candidate did not spend it, nobody overshot
    numbers = [t.number for t in trials_now]
    assert len(set(numbers)) == len(numbers)
    genomes = [tuple(sorted(t.params.items())) for t in complete]
    assert len(set(genomes)) == len(genomes)  # no candidate scored twice
    assert not [t for t in trials_now if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    # only the killed worker's candidate in flight was lost, and it was failed as stale by a surviving worker
    failed = [t for t in trials_now if t.state != TrialState.COMPLETE]
    assert [t.number for t in failed] == [killed]  # no slow but living worker's trial was taken for dead
    assert failed[0].user_attrs["lost"] and "heartbeat" in failed[0].user_attrs["error"]
    assert len({owner_pid(t) for t in complete}) >= 2  # the work really was shared
    assert "parents" in study.user_attrs
    if optimizer["name"] == "cma":
        # one CMA run: generations of four, each told once; the lost candidate was scored by another worker
        assert study.user_attrs["cma:told"] == trials // 4 - 1
        by_generation = {}
        for t in complete:
            by_generation.setdefault(t.user_attrs["cma_generation"], []).append(t.user_attrs["cma_index"])
        assert {g: sorted(v) for g, v in by_generation.items()} == {g: [0, 1, 2, 3] for g in range(trials // 4)}
        lost = failed[0]
        assert any(t.params == lost.params and owner_pid(t) != owner_pid(lost) for t in complete)
