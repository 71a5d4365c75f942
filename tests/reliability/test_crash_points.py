"""A crash at every single write of the CMA-ES bookkeeping: the resumed run stays consistent.

The kill -9 loop (test_kill_resume.py) lands at random moments, mostly inside a candidate's scoring. Here the
process "dies" right before each write the optimiser makes to the study in turn (write 0, then 1, ... of a
12-trial run), so every window between two writes is hit once: then a fresh optimiser resumes on the same
storage the way `mergeopt search` does (RUNNING trials marked lost and re-queued) and runs to the budget."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState
from reliability_helpers import cma_problems, completed, duplicate_genomes

from optimizer.search.loop import _mark_lost
from optimizer.search.optimizers import FINISHED, CMAOptimizer

pytestmark = pytest.mark.slow  # the kill/resume/fault/worker suites: `pytest -m slow` (CI's slow tier)

GENES = ["w.a", "w.b", "d.a", "d.b"]
BUDGET = 12
WRITES = ("create_new_study", "set_study_user_attr", "create_new_trial", "set_trial_param", "set_trial_state_values",
          "set_trial_user_attr", "set_trial_system_attr", "set_trial_intermediate_value")


class Crash(BaseException):
    """The process died (raised before the write, so the write never happens)."""


class CrashingStorage:
    def __init__(self, inner, crash_at: int):
        self._inner, self._crash_at, self.writes = inner, crash_at, 0

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if name not in WRITES:
            return attr

        def write(*args, **kwargs):
            if self.writes == self._crash_at:
                raise Crash
            self.writes += 1
            return attr(*args, **kwargs)
        return write


def objective(params: dict) -> float:
    return -sum((v - 0.3) ** 2 for v in params.values())


def spent(study) -> int:
    return sum(1 for t in study.get_trials(deepcopy=False, states=FINISHED) if not t.user_attrs.get("lost"))


def work(study, optimizer) -> None:
    """The search loop's ask -> score -> tell, until the budget is met."""
    while spent(study) < BUDGET:
        trial = optimizer.ask(study)
        assert trial is not None, "a lone worker was told to wait"
        optimizer.tell(study, trial, [objective(trial.params)])


def resume(storage, seed: int) -> tuple[optuna.Study, CMAOptimizer]:
    """What a new `mergeopt search` process does first: RUNNING trials are a dead worker's, marked lost."""
    study = optuna.load_study(study_name="s", storage=storage, sampler=optuna.samplers.RandomSampler(seed=seed))
    optimizer = CMAOptimizer(GENES, seed=0, popsize=4)  # nothing but the study survives a process
    _mark_lost(study, optimizer, study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)), "killed")
    return study, optimizer


def run_with_crash(crash_at: int, recovery_crash_at: int | None = None):
    inner = optuna.storages.InMemoryStorage()
    optuna.create_study(study_name="s", storage=inner, direction="maximize")
    crashing = CrashingStorage(inner, crash_at)
    study = optuna.load_study(study_name="s", storage=crashing, sampler=optuna.samplers.RandomSampler(seed=0))
    crashed = False
    try:
        work(study, CMAOptimizer(GENES, seed=0, popsize=4))
    except Crash:
        crashed = True
    before = completed(optuna.load_study(study_name="s", storage=inner))
    if recovery_crash_at is not None:  # the resumed process dies too, while it recovers
        try:
            work(*resume(CrashingStorage(inner, recovery_crash_at), seed=2))
        except Crash:
            pass
    study, optimizer = resume(inner, seed=1)
    work(study, optimizer)
    return crashed, crashing.writes, before, study


def _problems(label: str, before: dict, study) -> list[str]:
    after = completed(study)
    return ([f"{label}: completed trial {n} lost" for n in before if after.get(n) != before[n]]
            + [f"{label}: genome completed twice" for _ in duplicate_genomes(study)]
            + [f"{label}: {p}" for p in cma_problems(study)])


def test_a_crash_before_any_write_resumes_consistently(figures):
    crash_at, crashes, problems = 0, 0, []
    while True:
        crashed, writes, before, study = run_with_crash(crash_at)
        if not crashed:
            break  # the run finished before reaching this write: every write was a crash point
        crashes += 1
        problems += _problems(f"crash before write {crash_at}", before, study)
        crash_at += 1
    assert crashes > 50, crashes
    assert not problems, "\n".join(problems[:20])
    figures("crash before each CMA bookkeeping write", injected=crashes, survived=crashes)


def test_a_second_crash_during_the_recovery_resumes_consistently(figures):
    """The resumed process dies too, before each of its first writes (marking the lost trial, re-queuing it)."""
    problems, crashes = [], 0
    for crash_at in range(3, 100, 9):  # crash points that leave a trial RUNNING, all through the run
        for recovery_crash_at in range(6):
            crashed, _, before, study = run_with_crash(crash_at, recovery_crash_at)
            crashes += 1 + crashed
            problems += _problems(f"crash before write {crash_at}, then before write {recovery_crash_at} of the "
                                  "recovery", before, study)
    assert not problems, "\n".join(problems[:20])
    figures("crash before each CMA bookkeeping write", injected=crashes, survived=crashes)
