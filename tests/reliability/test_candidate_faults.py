"""A candidate that fails (exception, NaN scores, out of memory) is recorded with its reason and the search goes
on; three failures in a row of the same kind stop the run with a clear message."""

from __future__ import annotations

import os

import pytest
from helpers import write_space
from optuna.trial import TrialState
from reliability_helpers import mergeopt_cli

from optimizer.errors import MergeoptError
from optimizer.search import faults
from optimizer.search.loop import run_search
from optimizer.space import load_space

pytestmark = pytest.mark.slow  # the kill/resume/fault/worker suites: `pytest -m slow` (CI's slow tier)


def search(path, run_dir, **overrides):
    """The search as the command line runs it: MERGEOPT_FAULT (set by each test) read and parsed by the caller."""
    return run_search(load_space(path, overrides), run_dir, progress=False,
                      faults=faults.parse(os.environ.get(faults.ENV, "")))


def space(root, name, **keys):
    """A small space: 4 items per task keep each candidate to a fraction of a second."""
    return write_space(root, name, limit=4, **keys)


def test_injected_oom_and_exception_are_recorded_and_the_search_goes_on(search_setup, tmp_path, monkeypatch, figures):
    monkeypatch.setenv(faults.ENV, "oom@trial:1,error@trial:2,oom@trial:4")
    path = space(search_setup, "mixed", budget={"trials": 7})
    result = search(path, tmp_path / "run")
    trials = result.study.get_trials()
    assert result.stopped_reason is None and len(trials) == 7
    failed = {t.number: t for t in trials if t.state == TrialState.FAIL}
    assert sorted(failed) == [1, 2, 4]
    assert failed[1].user_attrs["failure_kind"] == "oom" and "CUDA out of memory" in failed[1].user_attrs["error"]
    assert failed[2].user_attrs["failure_kind"] == "RuntimeError"
    assert "candidate build failed" in failed[2].user_attrs["error"]
    assert all(t.state == TrialState.COMPLETE for t in trials if t.number not in failed)
    figures("candidate fault (oom, exception)", injected=3, survived=3)


def test_three_ooms_in_a_row_stop_the_run_with_the_reason(search_setup, tmp_path, figures):
    path = space(search_setup, "oom3", budget={"trials": 10})
    proc = mergeopt_cli("search", path, "--run-dir", tmp_path / "run", "--quiet",
                        env={faults.ENV: "oom@trial:1-3"})
    assert proc.returncode == 1
    assert "stopped: 3 candidates in a row failed with the same fault (oom)" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    # the study holds trial 0 (complete) and the three failures, each with its reason; nothing more was spent
    resumed = search(path, tmp_path / "run", trials=5)  # the fault is gone: the same run continues
    trials = resumed.study.get_trials()
    assert [t.state for t in trials[:4]] == [TrialState.COMPLETE] + [TrialState.FAIL] * 3
    assert all("out of memory" in t.user_attrs["error"] for t in trials[1:4])
    assert len(trials) == 5 and trials[4].state == TrialState.COMPLETE
    figures("three same faults in a row stop the run", injected=3, survived=3)


def test_nan_logits_fail_the_candidate_and_three_nans_stop_the_run(search_setup, huge_model, tmp_path, figures):
    """A real NaN: one model's weights are 1e38, so every candidate that gives it weight overflows in the forward."""
    models = [str(search_setup / "models" / "m1"), str(huge_model)]
    path = space(search_setup, "nan", models=models, bounds={"weight": [0.5, 1.0]}, objectives=["mc"],
                       budget={"trials": 10})
    result = search(path, tmp_path / "run")
    trials = result.study.get_trials()
    assert len(trials) == 3 and all(t.state == TrialState.FAIL for t in trials)
    assert all(t.user_attrs["failure_kind"] == "nan" for t in trials)
    assert "NaN or infinite logits" in trials[0].user_attrs["error"]
    assert result.stopped_reason.startswith("3 candidates in a row failed with the same fault (nan)")
    figures("NaN logits (1e38 weights in a model)", injected=3, survived=3)


def test_different_faults_in_a_row_do_not_stop_the_run(search_setup, huge_model, tmp_path, monkeypatch, figures):
    # NaN from the weights for every candidate, but an oom and an exception in between: never 3 of one kind
    monkeypatch.setenv(faults.ENV, "oom@trial:1,error@trial:3,oom@trial:5")
    models = [str(search_setup / "models" / "m1"), str(huge_model)]
    path = space(search_setup, "alternating", models=models, bounds={"weight": [0.5, 1.0]},
                       objectives=["mc"], budget={"trials": 7})
    result = search(path, tmp_path / "run")
    kinds = [t.user_attrs["failure_kind"] for t in result.study.get_trials()]
    assert kinds == ["nan", "oom", "nan", "RuntimeError", "nan", "oom", "nan"] and result.stopped_reason is None
    figures("candidate fault (oom, exception)", injected=3, survived=3)
    figures("NaN logits (1e38 weights in a model)", injected=4, survived=4)


def test_interrupt_mid_candidate_loses_nothing_and_spends_no_budget(search_setup, tmp_path, monkeypatch, figures):
    path = space(search_setup, "intr", optimizer={"name": "cma", "popsize": 4}, objectives=["mc"],
                       budget={"trials": 8})
    monkeypatch.setenv(faults.ENV, "interrupt@trial:2")
    first = search(path, tmp_path / "run")
    assert first.interrupted and first.new_trials == 2
    interrupted = first.study.get_trials()[2]
    assert interrupted.state == TrialState.FAIL and interrupted.user_attrs["lost"]
    monkeypatch.delenv(faults.ENV)
    result = search(path, tmp_path / "run")
    trials = result.study.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 8 and len(trials) == 9  # the interrupted candidate was scored again, once
    assert trials[-1].params == interrupted.params or any(t.params == interrupted.params for t in complete)
    assert len({tuple(sorted(t.params.items())) for t in complete}) == 8
    assert result.study.user_attrs["cma:told"] == 1
    figures("Ctrl-C mid-candidate (in process)", injected=1, survived=1)


def test_a_bad_fault_spec_is_one_clear_line(monkeypatch):
    with pytest.raises(MergeoptError, match="MERGEOPT_FAULT='oom@3'"):
        faults.parse("oom@3")
    assert faults.parse("oom@trial:2-3, kill@trial:9") == {2: "oom", 3: "oom", 9: "kill"}
    assert faults.parse("slow=1.5@trial:4") == {4: "slow=1.5"}
    for bad in ("slow@trial:1", "slow=-1@trial:1", "slow=inf@trial:1", "slow=x@trial:1"):
        with pytest.raises(MergeoptError, match="slow=S"):
            faults.parse(bad)


def test_a_slow_candidate_is_only_slower(search_setup, tmp_path, monkeypatch):
    """``slow=S`` delays the candidate and nothing else: it completes, scored like its neighbours."""
    monkeypatch.setenv(faults.ENV, "slow=1.2@trial:1")
    result = search(space(search_setup, "slow", budget={"trials": 3}), tmp_path / "run")
    trials = result.study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    seconds = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials]
    assert seconds[1] >= 1.2 and seconds[1] > seconds[2] + 1.0, seconds


def test_a_bad_fault_spec_is_refused_before_the_run_folder(search_setup, tmp_path):
    path = space(search_setup, "badfault", budget={"trials": 2})
    proc = mergeopt_cli("search", path, "--run-dir", tmp_path / "run", "--quiet", env={faults.ENV: "slow=x@trial:1"})
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "MERGEOPT_FAULT='slow=x@trial:1'" in proc.stderr and "slow=S" in proc.stderr
    assert not (tmp_path / "run").exists()
