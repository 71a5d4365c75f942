"""The CMA-ES bookkeeping several workers share, without processes or a server (an in-memory study)."""

import optuna
import pytest
from helpers import write_space

from optimizer.search.optimizers import CMAOptimizer

pytestmark = pytest.mark.slow  # the kill/resume/fault/worker suites: `pytest -m slow` (CI's slow tier)


def test_a_generation_is_handed_out_once_and_told_once():
    study = optuna.create_study(direction="maximize")
    a, b = CMAOptimizer(["x", "y"], seed=0, popsize=4), CMAOptimizer(["x", "y"], seed=0, popsize=4)
    handed = [a.ask(study), b.ask(study), a.ask(study), b.ask(study)]
    assert {t.user_attrs["cma_index"] for t in handed} == {0, 1, 2, 3}
    assert a.ask(study) is None and b.ask(study) is None  # all in flight: wait, do not invent a fifth
    for t in handed[:3]:
        a.tell(study, t, [0.5])
    assert "cma:told" not in study.user_attrs and b.ask(study) is None
    b.tell(study, handed[3], [0.7])
    assert study.user_attrs["cma:told"] == 0
    nxt = a.ask(study)
    assert nxt.user_attrs["cma_generation"] == 1
    assert len([t for t in study.get_trials() if t.user_attrs.get("cma_generation") == 1]) == 4


def test_a_half_enqueued_generation_is_completed_not_replaced():
    """A worker that died while enqueuing a generation: the next asker enqueues the missing candidates."""
    study = optuna.create_study(direction="maximize")
    cma = CMAOptimizer(["x", "y"], seed=0, popsize=4)
    first = cma.ask(study)
    pending = study.user_attrs["cma:pending"]
    # as if the enqueuing worker had died after two of the four candidates of generation 1
    for t in [first] + [cma.ask(study) for _ in range(3)]:
        cma.tell(study, t, [0.1])
    study.set_user_attr("cma:pending", pending)  # generation 0's list stands in for generation 1's
    study.set_user_attr("cma:generation", 1)
    for index in (0, 1):
        cma._enqueue(study, 1, index, pending[index])
    got = [cma.ask(study) for _ in range(4)]
    assert sorted(t.user_attrs["cma_index"] for t in got) == [0, 1, 2, 3]
    assert cma.ask(study) is None


def test_a_worker_with_another_space_is_refused(search_setup, postgres_url):
    import uuid

    from optimizer.errors import MergeoptError
    from optimizer.search.loop import open_study
    from optimizer.search.workers import StudyLock
    from optimizer.space import load_space

    name = f"mismatch-{uuid.uuid4().hex[:8]}"
    lock = StudyLock(postgres_url, name)
    run = search_setup / "runs"
    open_study(load_space(write_space(search_setup, name)), run, postgres_url, name, lock=lock)
    open_study(load_space(write_space(search_setup, name)), run, postgres_url, name, lock=lock)  # same: joins
    with pytest.raises(MergeoptError, match="different search space .key 'limit' differs"):
        open_study(load_space(write_space(search_setup, name, limit=5)), run, postgres_url, name, lock=lock)
    lock.close()
