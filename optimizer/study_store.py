"""The one adapter between mergeopt and Optuna's storage: every use of Optuna's private API is in this module.

Optuna's public Study API cannot do a few things a crash-safe, multi-worker search needs: change a trial that
the study no longer hands out (a dead worker's RUNNING trial marked failed and lost), find trials whose heartbeat
stopped *before* they are failed, and make a new SQLite database appear whole. Those steps go through the storage
object here, so an Optuna upgrade that moves them breaks one file (pyproject bounds Optuna to the tested range).
This module imports no torch: reading a run goes through it too.

A study on a database server survives the server: every storage call that fails because the connection dropped
(a server restart, a network cut) is retried with backoff until the server answers again (:class:`DatabaseRetry`),
on fresh connections (``pool_pre_ping``). A call made while this thread holds the study lock is not retried: the
server dropped the lock with the connection, so the whole locked step is abandoned (:class:`LockLost`) and redone
from its start by its caller (search/workers.py), as after a crash inside it.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

from optimizer.errors import MergeoptError
from optimizer.files import temporary_path

log = logging.getLogger("mergeopt")


class Attr:
    """The study's user-attribute keys, spelled once (every module reads and writes them through these names;
    :class:`optimizer.run.TrialRecord` is the typed view of a trial's)."""

    # a trial's
    RECIPE = "recipe"  # the recipe YAML the candidate was built from
    SEED = "seed"  # its DARE mask seed
    SCORES = "scores"  # {task: {value, stderr, n, ...}}
    SCALARIZED = "scalarized"  # the weighted mean of the objectives (larger is better)
    FIDELITY = "fidelity"  # "full" | "low"
    LOW_VALUE = "low_value"  # the scalarized score on the low-fidelity subset
    LOW_SCORES = "low_scores"
    SECONDS = "seconds"  # timings: swap, score, low_swap, low_score
    ERROR = "error"  # why a candidate failed
    FAILURE_KIND = "failure_kind"  # oom | nan | an exception's type name
    LOST = "lost"  # never scored to the end (a dead or interrupted worker): spends no budget
    ENGINE_FAULTS = "engine_faults"  # engine faults survived while it was scored: [{cause, detail, recovery_seconds}]
    WORKER = "worker"  # the worker that scored it (shared storage)
    CMA_GENERATION = "cma_generation"
    CMA_INDEX = "cma_index"
    CMA_X = "cma_x"
    ITEMS = "items"  # {task: per-item values}, "0110..." when all are 0 or 1 (optimizer/evaluate/stats.py)
    WARM_START = "warm_start"  # on the trial (and the study): the baseline the optimiser started from
    # the study's
    RUN = "mergeopt:run"  # the run's record: {"config": ..., "resolved": ...}
    PARENTS = "parents"  # the base's and the fine-tunes' scores
    WORKERS = "workers"  # how many workers joined (each takes the next number)
    BASELINES = "baselines"  # {label: record}: the merges scored before the search (optimizer/search/baselines.py)
    VALIDATION = "validation"  # finalists and the best baseline on the validation items (optimizer/search/validation.py)



def storage_url(run_dir: Path, storage: str | None) -> str:
    """The study's database: ``--storage`` when given, else ``study.db`` in the run folder."""
    return storage or f"sqlite:///{(Path(run_dir) / 'study.db').resolve()}"


def open_storage(url: str, heartbeat: tuple[int, int] | None = None,
                 retry: DatabaseRetry | None = None) -> optuna.storages.RDBStorage:
    """An RDB storage; ``heartbeat`` = (interval, grace period) in seconds for shared databases. A database server's
    storage retries calls whose connection dropped (``retry``, default :class:`DatabaseRetry`)."""
    local = url.startswith("sqlite")
    interval, grace = heartbeat if heartbeat is not None else (None, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if local:
            return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}},
                                              heartbeat_interval=interval, grace_period=grace)
        storage = RetryingRDBStorage(url, engine_kwargs={"pool_pre_ping": True}, heartbeat_interval=interval,
                                     grace_period=grace)
        storage.retry = retry or DatabaseRetry()
        return storage


class LockLost(Exception):
    """The database dropped the connection that held the study lock (a server restart): the locked step must be
    redone from its start (its writes so far are those of a step cut short by a crash)."""


# whether this thread holds the study lock (search/workers.StudyLock sets it)
LOCK = threading.local()


def holding_lock() -> bool:
    return getattr(LOCK, "held", False)


@dataclass(frozen=True)
class DatabaseRetry:
    """How long a worker waits for its database server: backoff from ``first`` doubling to ``cap`` seconds, for at
    most ``patience`` seconds in all (then one line: the study is intact, rerun to continue)."""

    first: float = 0.5
    cap: float = 10.0
    patience: float = 600.0

    def call(self, fn, name: str) -> Any:
        start = time.monotonic()
        wait, failed = self.first, False
        while True:
            try:
                return fn()
            except optuna.exceptions.UpdateFinishedTrialError:
                if failed and name == "set_trial_state_values":
                    return True  # the write that failed to answer had been committed: it is done
                raise
            except Exception as exc:
                if not connection_lost(exc):
                    raise
                if holding_lock():
                    raise LockLost(f"{name}: {_first_line(exc)}") from exc
                waited = time.monotonic() - start
                if waited >= self.patience:
                    raise MergeoptError(f"the study's database stopped answering for {waited:.0f} s "
                                        f"({_first_line(exc)}); the study is intact: rerun the same command when the "
                                        "server is back") from None
                if not failed:
                    log.warning("the study's database dropped the connection (%s); retrying", _first_line(exc))
                failed = True
                time.sleep(wait * random.uniform(0.8, 1.2))
                wait = min(self.cap, wait * 2)


def connection_lost(exc: BaseException) -> bool:
    """Whether an error (or what caused it) is a lost or refused database connection, not a bad statement."""
    import sqlalchemy.exc

    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError,
                             sqlalchemy.exc.DisconnectionError)):
            return True
        if isinstance(seen, sqlalchemy.exc.DBAPIError) and seen.connection_invalidated:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


class RetryingRDBStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage, every public call (and the stale-trial query) retried on a lost connection."""

    retry: DatabaseRetry = DatabaseRetry()


def _retrying(name: str):
    method = getattr(optuna.storages.RDBStorage, name)

    def call(self, *args, **kwargs):
        return self.retry.call(lambda: method(self, *args, **kwargs), name)
    call.__name__ = call.__qualname__ = name
    call.__doc__ = method.__doc__
    return call


# every call Optuna makes on an RDB storage: the public API, and the private ones its cache layer
# (storages/_cached_storage.py) and the heartbeat use; each opens and commits its own session
_PRIVATE_CALLS = ("_create_new_trial", "_set_trial_param", "_get_trials", "_get_best_trial_id", "_get_stale_trial_ids")
for _name in sorted({n for n in dir(optuna.storages.RDBStorage)
                     if (not n.startswith("_") or n in _PRIVATE_CALLS)
                     and callable(getattr(optuna.storages.RDBStorage, n))
                     and n not in ("remove_session", "upgrade", "get_current_version", "get_head_version",
                                   "get_all_versions")}):
    setattr(RetryingRDBStorage, _name, _retrying(_name))


def load_study(url: str, name: str) -> optuna.Study:
    """An existing study, to read (no sampler of ours); KeyError when the storage has no study of that name."""
    return optuna.load_study(study_name=name, storage=open_storage(url))


def create_sqlite_whole(url: str) -> None:
    """A new SQLite study database appears with its tables already made.

    Optuna creates the tables of a new database one statement at a time; a reader opening the file meanwhile
    (`mergeopt report`, optuna-dashboard, a script polling the run) makes the missing tables itself, and the two
    creators then collide ("table ... already exists"). So the tables are made in a private file that is linked into
    place only if no database is there yet; a reader finds no file or a whole schema.
    """
    if not url.startswith("sqlite:///"):
        return
    path = Path(url.removeprefix("sqlite:///"))
    if path.name in ("", ":memory:") or path.exists():
        return
    tmp = temporary_path(path)
    try:
        storage = optuna.storages.RDBStorage(f"sqlite:///{tmp}")
        storage.engine.dispose()
        os.link(tmp, path)  # never replaces a database another process made first
    except FileExistsError:
        pass
    except OSError:  # a file system without hard links: a rename, unless a database appeared meanwhile
        if not path.exists():
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def trial_id(trial: Trial | FrozenTrial) -> int:
    """The storage's key of a trial (not its number within the study)."""
    return trial._trial_id


def frozen(study: optuna.Study, trial: Trial) -> FrozenTrial:
    """A live trial's record as the storage holds it now."""
    return study._storage.get_trial(trial._trial_id)


def fail_as_lost(study: optuna.Study, trials: list[FrozenTrial], reason: str) -> None:
    """Trials no worker will finish (RUNNING, so the Study API cannot touch them): FAIL, with ``lost`` and why."""
    storage = study._storage
    for t in trials:
        storage.set_trial_user_attr(t._trial_id, Attr.ERROR, reason)
        storage.set_trial_user_attr(t._trial_id, Attr.LOST, True)
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)


def heartbeats_enabled(study: optuna.Study) -> bool:
    return getattr(study._storage, "get_heartbeat_interval", lambda: None)() is not None


def record_heartbeat(study: optuna.Study, trial: Trial) -> None:
    study._storage.record_heartbeat(trial._trial_id)  # type: ignore[attr-defined]  # RDBStorage


def stale_trial_ids(study: optuna.Study) -> set[int]:
    """Trials whose heartbeat is older than the grace period, found before they are failed (the same query as
    ``optuna.storages.fail_stale_trials``, which fails them at once: we must mark them lost first)."""
    return set(study._storage._get_stale_trial_ids(study._study_id))  # type: ignore[attr-defined]  # RDBStorage
