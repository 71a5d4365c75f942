"""The engine dies, the search lives: `mergeopt search --backend vllm` on the tiny tied Llama while its vLLM worker
process is killed (SIGKILL) or stopped (SIGSTOP: a hang) from outside, mid-candidate (CI tier `-m vllm`).

The same run must finish its budget with every trial COMPLETE (the candidate in flight rebuilt on a new engine and
scored again: its recorded scores are the transformers backend's), note the fault in that trial, and leave no
process of the failed engine behind. With no restart allowed, the run stops in one line with exit 75 and the
candidate in flight is left lost (no FAIL against its genome, no budget spent).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")

import optuna  # noqa: E402
import psutil  # noqa: E402
from helpers import write_search_setup, write_space  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from test_vllm_search import assert_recorded_scores_are_transformers  # noqa: E402

CLONE = Path(__file__).resolve().parents[2]
TRIALS = 6


def start_search(space: Path, run_dir: Path, tmp: Path, **env) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": str(CLONE), "TMPDIR": str(tmp), **env}
    return subprocess.Popen([sys.executable, "-m", "optimizer.cli", "search", str(space), "--run-dir", str(run_dir),
                             "--engine-device", "cpu", "--quiet"], env=environment, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def engine_processes(pid: int) -> dict[int, str]:
    """The vLLM processes under the search process (pid -> name)."""
    found = {}
    try:
        for proc in psutil.Process(pid).children(recursive=True):
            try:
                if proc.name().startswith("VLLM::"):
                    found[proc.pid] = proc.name()
            except psutil.Error:
                pass
    except psutil.NoSuchProcess:
        pass
    return found


def trials(run_dir: Path, name: str) -> list:
    try:
        return optuna.load_study(study_name=name, storage=f"sqlite:///{run_dir / 'study.db'}").get_trials()
    except Exception:  # not created yet (KeyError), or the file is being made
        return []


def signal_worker_mid_candidate(proc: subprocess.Popen, run_dir: Path, name: str, sig: int, after: int = 2,
                                timeout: float = 400) -> tuple[int, dict[int, str]]:
    """Once ``after`` trials are COMPLETE and another is in flight, send ``sig`` to the VLLM::Worker process; its pid
    and every engine process seen until then."""
    seen: dict[int, str] = {}
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        seen |= engine_processes(proc.pid)
        now = trials(run_dir, name)
        done = sum(t.state == TrialState.COMPLETE for t in now)
        if done >= after and any(t.state == TrialState.RUNNING for t in now):
            workers = [pid for pid, n in engine_processes(proc.pid).items() if n == "VLLM::Worker"]
            if workers:
                os.kill(workers[0], sig)
                return workers[0], seen
        time.sleep(0.02)
    raise AssertionError(f"no trial in flight after {after} complete within {timeout} s")


def finish(proc: subprocess.Popen, seen: dict[int, str], timeout: float = 600) -> str:
    """Wait for the search, collecting the engine processes it starts meanwhile; its stderr."""
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        seen |= engine_processes(proc.pid)
        time.sleep(0.2)
    if proc.poll() is None:
        proc.kill()
    _, err = proc.communicate()
    return err


def assert_no_engine_process_left(seen: dict[int, str]) -> None:
    def running(pid):
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
    deadline = time.time() + 10  # an orphan's reaping by init takes a moment
    while time.time() < deadline and any(running(pid) for pid in seen):
        time.sleep(0.2)
    left = {pid: name for pid, name in seen.items() if running(pid)}
    assert not left, f"engine processes left behind: {left}"


@pytest.fixture(scope="module")
def tied_setup(tmp_path_factory):
    return write_search_setup(tmp_path_factory.mktemp("tied-faults"), tied=True)


@pytest.mark.parametrize("sig, cause", [(signal.SIGKILL, "dead"), (signal.SIGSTOP, "hung")], ids=["kill", "hang"])
def test_the_worker_killed_or_hung_mid_search_costs_no_trial(tied_setup, tmp_path, sig, cause):
    name = f"vllm-{cause}"
    space = write_space(tied_setup, name, backend="vllm", budget={"trials": TRIALS}, limit=8)
    run_dir = tmp_path / "run"
    # a short hang floor: the stopped worker is found within seconds, not the default two minutes; trials 2-3 are
    # held 2 s in flight (MERGEOPT_FAULT's straggler, before their weights are built) so that the poll below finds a
    # candidate in flight on a quiet machine too, where a tiny model's candidate takes a few hundredths of a second
    proc = start_search(space, run_dir, tmp_path, MERGEOPT_ENGINE_TIMEOUT="10", MERGEOPT_FAULT="slow=2@trial:2-3")
    try:
        victim, seen = signal_worker_mid_candidate(proc, run_dir, name, sig)
        err = finish(proc, seen)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    every = trials(run_dir, name)
    assert [t.state for t in every] == [TrialState.COMPLETE] * TRIALS, [(t.number, t.state, t.user_attrs.get("error"))
                                                                       for t in every]
    faults = [f for t in every for f in t.user_attrs.get("engine_faults", [])]
    assert [f["cause"] for f in faults] == [cause], faults
    assert faults[0]["recovery_seconds"] > 0
    assert ("exited" if cause == "dead" else "no progress") in faults[0]["detail"]
    assert "starting a new engine" in err
    assert victim in seen and len(set(seen)) >= 4  # the first engine's core and worker, and the new engine's
    assert_no_engine_process_left(seen)
    assert_recorded_scores_are_transformers(run_dir, trials=TRIALS)  # the candidate in flight was rebuilt right


def test_with_no_restart_allowed_the_run_stops_in_one_line_and_the_candidate_is_lost(tied_setup, tmp_path):
    name = "vllm-no-restart"
    space = write_space(tied_setup, name, backend="vllm", budget={"trials": TRIALS}, limit=8)
    run_dir = tmp_path / "run"
    proc = start_search(space, run_dir, tmp_path, MERGEOPT_ENGINE_RESTARTS="0", MERGEOPT_FAULT="slow=2@trial:1-2")
    try:
        victim, seen = signal_worker_mid_candidate(proc, run_dir, name, signal.SIGKILL, after=1)
        err = finish(proc, seen)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, err[-3000:]
    # one line says why (vLLM's and multiprocessing's own shutdown notices may follow it)
    stops = [line for line in err.splitlines() if line.startswith("mergeopt search: stopped:")]
    assert len(stops) == 1, err[-3000:]
    last = stops[0]
    assert last.startswith("mergeopt search: stopped: engine fault (dead): the vLLM engine failed"), last
    assert "no restart is allowed" in last and "rerun the same command" in last
    every = trials(run_dir, name)
    complete = [t for t in every if t.state == TrialState.COMPLETE]
    lost = [t for t in every if t.state != TrialState.COMPLETE]
    assert 1 <= len(complete) < TRIALS
    # the candidate in flight: failed as lost (spends no budget, nothing told against its genome), nothing else
    assert len(lost) == 1 and lost[0].state == TrialState.FAIL and lost[0].user_attrs["lost"]
    assert lost[0].user_attrs["error"].startswith("engine fault (dead)")
    assert_no_engine_process_left(seen)
