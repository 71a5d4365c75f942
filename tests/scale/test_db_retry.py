"""The rule the study store follows when its database server drops the connection (fast; the real server restarted
under three workers: test_db_restart.py): retry with backoff, but never inside the study lock (the server dropped the
lock too: the step is redone whole), and give up in one line after the patience."""

import optuna
import pytest
import sqlalchemy.exc

from optimizer import study_store
from optimizer.errors import MergeoptError
from optimizer.study_store import DatabaseRetry, LockLost, connection_lost

FAST = DatabaseRetry(first=0.01, cap=0.02, patience=5.0)


def dropped() -> sqlalchemy.exc.OperationalError:
    return sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))


def failing(times: int, value="done", error=dropped):
    calls = []

    def fn():
        calls.append(1)
        if len(calls) <= times:
            raise error()
        return value
    return fn, calls


def test_a_dropped_connection_is_retried_until_the_server_answers():
    fn, calls = failing(3)
    assert FAST.call(fn, "get_trial") == "done" and len(calls) == 4


def test_optunas_wrapping_of_the_error_is_seen_through():
    def wrapped():
        try:
            raise dropped()
        except sqlalchemy.exc.OperationalError as exc:
            raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from exc
    assert connection_lost(_raised(wrapped))
    assert not connection_lost(_raised(lambda: (_ for _ in ()).throw(ValueError("bad value"))))


def _raised(fn) -> BaseException:
    try:
        fn()
    except BaseException as exc:  # the exception itself, to classify
        return exc
    raise AssertionError("did not raise")


def test_a_bad_statement_is_not_retried():
    fn, calls = failing(1, error=lambda: sqlalchemy.exc.IntegrityError("INSERT", {}, Exception("duplicate key")))
    with pytest.raises(sqlalchemy.exc.IntegrityError):
        FAST.call(fn, "set_trial_param")
    assert len(calls) == 1


def test_inside_the_study_lock_the_step_is_abandoned_not_retried():
    fn, calls = failing(1)
    study_store.LOCK.held = True
    try:
        with pytest.raises(LockLost, match="set_study_user_attr"):
            FAST.call(fn, "set_study_user_attr")
    finally:
        study_store.LOCK.held = False
    assert len(calls) == 1


def test_a_state_write_whose_answer_was_lost_counts_as_done():
    """The first attempt committed but the reply never came: the retry finds the trial finished."""
    attempts = []

    def fn():
        attempts.append(1)
        if len(attempts) == 1:
            raise dropped()
        raise optuna.exceptions.UpdateFinishedTrialError("Trial#3 has already finished")
    assert FAST.call(fn, "set_trial_state_values") is True
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):  # without a lost answer it is a real error
        FAST.call(lambda: (_ for _ in ()).throw(optuna.exceptions.UpdateFinishedTrialError("x")),
                  "set_trial_state_values")


def test_a_server_that_stays_away_is_one_line_after_the_patience():
    fn, _ = failing(10**6)
    with pytest.raises(MergeoptError) as stop:
        DatabaseRetry(first=0.01, cap=0.02, patience=0.2).call(fn, "get_all_trials")
    assert "\n" not in str(stop.value) and "the study is intact" in str(stop.value)
    assert str(stop.value).startswith("the study's database stopped answering for 0 s (OperationalError")
