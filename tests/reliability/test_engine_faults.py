"""Faults of the inference engine are not faults of the candidate (optimizer/evaluate/recovery.py).

Fast: the rules themselves on real objects (real torch exceptions, real threads, a clock the test moves). Slow: a
real `mergeopt search` on the hf backend whose candidate raises the CUDA error a kernel fault raises
(``MERGEOPT_FAULT=cuda``): the process is replaced on the same study and the run meets its budget, or, its restarts
spent, stops in one line with exit 75. The vLLM engine killed or hung for real: tests/evaluate/test_vllm_faults.py.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from helpers import assert_one_line_error, write_space
from optuna.trial import TrialState
from reliability_helpers import load, mergeopt_cli

from optimizer.errors import EngineFault, MergeoptError, engine_fault_of
from optimizer.evaluate.recovery import EngineRecovery, RestartBudget, watched_call
from optimizer.search.restart import EXIT_ENGINE, HISTORY_ENV, restart_history


# ---- which fault is whose ----------------------------------------------------------------------------------------
def test_a_cuda_error_poisons_the_process_and_an_oom_stays_the_candidates():
    fault = engine_fault_of(torch.AcceleratorError("CUDA error: an illegal memory access was encountered\nmore"))
    assert fault is not None and fault.cause == "cuda" and fault.new_process and not fault.final
    assert str(fault) == "a CUDA error poisoned this process (CUDA error: an illegal memory access was encountered)"
    assert engine_fault_of(RuntimeError("CUDA error: device-side assert triggered")).new_process  # older torch
    assert engine_fault_of(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")) is None
    assert engine_fault_of(RuntimeError("shape mismatch")) is None
    assert engine_fault_of(ValueError("CUDA error: not a torch error type")) is None


def test_scoring_raises_an_engine_fault_instead_of_failing_the_candidate(search_setup):
    from optimizer.evaluate.hf import HFBackend
    from optimizer.evaluate.scoring import evaluate_candidate
    from optimizer.evaluate.tasks import load_task_set
    from optimizer.merge.engine import MergeEngine
    from optimizer.search import faults

    base, models = search_setup / "models" / "m0", [search_setup / "models" / f"m{i}" for i in (1, 2, 3)]
    engine = MergeEngine(base, models, device="cpu")
    backend = HFBackend(base, device="cpu")
    task_set = load_task_set(str(search_setup / "tasks.yaml"), limit=2)
    from optimizer.recipe import ModelSpec, Recipe

    recipe = Recipe("task_arithmetic", [ModelSpec(str(m), {"weight": 0.3}) for m in models], base_model=str(base))
    planned = faults.parse("oom@trial:0,cuda@trial:1")
    oom = evaluate_candidate(faults.with_faults(backend, 0, planned), task_set, engine, recipe)
    assert oom.failed and oom.kind == "oom"  # the candidate's: recorded against it
    with pytest.raises(EngineFault) as raised:
        evaluate_candidate(faults.with_faults(backend, 1, planned), task_set, engine, recipe)
    assert raised.value.cause == "cuda" and raised.value.new_process


# ---- the restart budget ----------------------------------------------------------------------------------------
class Clock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_restarts_back_off_and_stop_after_the_hourly_limit_then_the_window_rolls():
    clock = Clock()
    budget = RestartBudget(EngineRecovery(restarts_per_hour=3, backoff_seconds=5, max_backoff_seconds=12),
                           clock=clock)
    fault = EngineFault("the engine died (VLLM::Worker pid 7 exited)")
    waits = []
    for _ in range(3):
        waits.append(budget.spend(fault))
        clock.now += 60
    assert waits == [5, 10, 12]  # doubled, capped
    with pytest.raises(EngineFault) as stop:
        budget.spend(fault, "the vLLM engine")
    final = stop.value
    assert final.final and final.cause == "dead" and "\n" not in str(final)
    assert str(final).startswith("the vLLM engine failed (dead: the engine died (VLLM::Worker pid 7 exited)) and 3 "
                                 "restart(s) in the last hour were spent")
    assert "MERGEOPT_ENGINE_RESTARTS" in str(final)
    clock.now += 3600 - 3 * 60 + 61  # the first restart is now over an hour old: one more is allowed
    assert budget.spend(fault) == 10  # two still within the hour: the backoff remembers them


def test_no_restart_allowed_stops_at_the_first_fault():
    with pytest.raises(EngineFault, match="no restart is allowed"):
        RestartBudget(EngineRecovery(restarts_per_hour=0)).spend(EngineFault("x", cause="hung"))


def test_the_settings_come_from_two_variables_and_a_bad_one_is_one_line():
    assert EngineRecovery.from_env({}) == EngineRecovery()
    recovery = EngineRecovery.from_env({"MERGEOPT_ENGINE_RESTARTS": "2", "MERGEOPT_ENGINE_TIMEOUT": "10"})
    assert recovery.restarts_per_hour == 2 and recovery.hang_floor_seconds == 10
    assert recovery.hang_timeout(None) == 10 and recovery.hang_timeout(4.0) == 20  # 5 x the longest candidate
    for env, fragment in [({"MERGEOPT_ENGINE_RESTARTS": "many"}, "MERGEOPT_ENGINE_RESTARTS='many'"),
                          ({"MERGEOPT_ENGINE_TIMEOUT": "0.1"}, "MERGEOPT_ENGINE_TIMEOUT='0.1'"),
                          ({"MERGEOPT_ENGINE_TIMEOUT": "inf"}, "MERGEOPT_ENGINE_TIMEOUT='inf'")]:
        with pytest.raises(MergeoptError, match=fragment):
            EngineRecovery.from_env(env)
    assert restart_history({HISTORY_ENV: "1.5,2.5"}) == [1.5, 2.5] and restart_history({}) == []


def test_a_bad_setting_is_refused_before_the_search_loads_anything(search_setup, tmp_path):
    space = write_space(search_setup, "bad-engine-env")
    proc = mergeopt_cli("search", space, "--run-dir", tmp_path / "run", "--quiet",
                        env={"MERGEOPT_ENGINE_RESTARTS": "-1"})
    assert_one_line_error(proc, "MERGEOPT_ENGINE_RESTARTS='-1'", "whole number")
    assert not (tmp_path / "run").exists()


# ---- the watch on one engine call ------------------------------------------------------------------------------
def test_a_call_that_answers_is_left_alone_and_its_own_error_is_its_own():
    assert watched_call(lambda: 42, timeout=5, alive=lambda: None, on_hang=lambda: None) == 42

    def bad():
        raise ValueError("the candidate's")
    with pytest.raises(ValueError, match="the candidate's"):
        watched_call(bad, timeout=5, alive=lambda: None, on_hang=lambda: None)


def test_a_call_that_makes_no_progress_is_hung_and_its_engine_killed():
    release = threading.Event()
    killed = []

    def on_hang():
        killed.append(time.monotonic())
        release.set()  # as killing the engine ends a blocked call
    start = time.monotonic()
    with pytest.raises(EngineFault) as raised:
        watched_call(lambda: release.wait(30), timeout=0.6, alive=lambda: None, on_hang=on_hang, poll=0.05)
    assert raised.value.cause == "hung" and "no progress" in str(raised.value)
    assert killed and 0.6 <= killed[0] - start < 5


def test_a_call_into_a_dead_engine_that_never_returns_is_a_dead_engine():
    dead_at = time.monotonic() + 0.3
    never = threading.Event()
    with pytest.raises(EngineFault) as raised:
        watched_call(lambda: never.wait(30), timeout=60,
                     alive=lambda: "VLLM::Worker pid 9 exited" if time.monotonic() > dead_at else None,
                     on_hang=lambda: pytest.fail("a dead engine is not a hung one"), poll=0.05, grace=0.3)
    assert raised.value.cause == "dead" and "VLLM::Worker pid 9 exited" in str(raised.value)


# ---- the search process replaced after a CUDA error (slow: real `mergeopt search` processes) -------------------
@pytest.mark.slow
def test_a_cuda_error_restarts_the_process_on_the_same_study_and_the_budget_is_met(search_setup, tmp_path, figures):
    space = write_space(search_setup, "cuda-restart", limit=4, budget={"trials": 4})
    proc = mergeopt_cli("search", space, "--run-dir", tmp_path / "run", "--quiet",
                        env={"MERGEOPT_FAULT": "cuda@trial:1", "MERGEOPT_ENGINE_TIMEOUT": "4"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    restarts = [line for line in proc.stderr.splitlines() if "restarting the process on the same study" in line]
    assert len(restarts) == 1 and restarts[0].startswith("mergeopt search: a CUDA error poisoned this process")
    study = load(tmp_path / "run" / "study.db", "cuda-restart")
    states = {t.number: t.state for t in study.get_trials()}
    assert sum(s == TrialState.COMPLETE for s in states.values()) == 4  # the whole budget, in the same command
    lost = [t for t in study.get_trials() if t.state != TrialState.COMPLETE]
    assert [t.number for t in lost] == [1] and lost[0].user_attrs["lost"]  # not charged to its genome
    assert lost[0].user_attrs["error"].startswith("engine fault (cuda): a CUDA error poisoned this process")
    assert "failure_kind" not in lost[0].user_attrs
    figures("CUDA error in the search process (restarted)", injected=1, survived=1)


@pytest.mark.slow
def test_repeated_cuda_errors_stop_the_run_in_one_line_once_the_restarts_are_spent(search_setup, tmp_path, figures):
    space = write_space(search_setup, "cuda-spent", limit=4, budget={"trials": 4})
    proc = mergeopt_cli("search", space, "--run-dir", tmp_path / "run", "--quiet",
                        env={"MERGEOPT_FAULT": "cuda@trial:0-99", "MERGEOPT_ENGINE_RESTARTS": "1",
                             "MERGEOPT_ENGINE_TIMEOUT": "4"})
    assert proc.returncode == EXIT_ENGINE, proc.stderr[-3000:]
    stops = [line for line in proc.stderr.splitlines() if line.startswith("mergeopt search: stopped:")]
    assert len(stops) == 1 and stops[0].startswith("mergeopt search: stopped: engine fault (cuda): the search "
                                                   "process failed")
    assert "1 restart(s) in the last hour were spent" in stops[0]
    study = load(tmp_path / "run" / "study.db", "cuda-spent")
    trials = study.get_trials()
    assert len(trials) == 2 and all(t.state == TrialState.FAIL and t.user_attrs["lost"] for t in trials)
    figures("repeated CUDA errors stop the run (exit 75)", injected=2, survived=2)


def test_the_readme_quotes_the_line_that_stops_a_run_whose_restarts_are_spent():
    from pathlib import Path

    from optimizer.search.restart import stopped_line

    clock = Clock()
    budget = RestartBudget(EngineRecovery(), history=[clock.now - 60 * i for i in range(5)], clock=clock)
    with pytest.raises(EngineFault) as stop:
        budget.spend(EngineFault("the engine died (VLLM::Worker pid 4242 exited)"), "the vLLM engine")
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert f"\n{stopped_line(stop.value)}\n" in readme
