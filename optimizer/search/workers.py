"""Several workers on one study: a database lock for the short bookkeeping steps, heartbeats for the long ones.

Workers never talk to each other: the study in a database server (Optuna's RDB storage) is the only shared record.
Two things need more than Optuna's row-level updates:

* bookkeeping that reads the study and then writes to it must not interleave between workers: "are fewer than N
  trials finished or in flight? then start one" (the budget), "is CMA generation g complete? then tell it and
  enqueue g+1", creating the tables and the study, claiming a worker number. Those steps run under `StudyLock`, a
  PostgreSQL advisory lock held for one transaction on a connection of its own. The server drops it when the
  holder's connection dies, so a killed worker never leaves it held. The steps take milliseconds; merging and
  scoring run outside the lock.
* a worker that dies while scoring leaves its trial RUNNING. Every trial in flight records Optuna's heartbeat from
  a thread (`Heartbeat`); any worker, under the lock, finds trials whose heartbeat is older than the grace period
  (`stale_trials`), marks them lost (they do not spend the budget) and lets the optimiser queue them again.

Local runs (SQLite in the run folder, one worker guarded by the folder's lock file) take the same path with a lock
and heartbeat that do nothing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import socket
import threading
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import optuna
from optuna.trial import TrialState

from optimizer import study_store
from optimizer.study_store import Attr
from optimizer.run import FINISHED, spends_budget
from optimizer.search.optimizers import Optimizer

log = logging.getLogger("mergeopt")

HEARTBEAT_ENV = "MERGEOPT_HEARTBEAT"  # "INTERVAL[,GRACE]" in whole seconds; default 20,60


DEFAULT_HEARTBEAT = (20, 60)


def heartbeat_settings(text: str | None = None) -> tuple[int, int]:
    """Heartbeat interval and grace period (seconds) for shared storage, from ``INTERVAL[,GRACE]`` (the CLI passes
    $MERGEOPT_HEARTBEAT; tests shorten them so); None or empty: the defaults."""
    text = (text or "").strip()
    if not text:
        return DEFAULT_HEARTBEAT
    try:
        parts = [int(p) for p in text.split(",")]
        interval, grace = (parts[0], parts[1]) if len(parts) == 2 else (parts[0], 3 * parts[0])
    except (ValueError, IndexError):
        interval = grace = 0
    if interval < 1 or grace <= interval:
        from optimizer.errors import MergeoptError

        raise MergeoptError(f"{HEARTBEAT_ENV}={text!r}: give INTERVAL[,GRACE] in whole seconds, GRACE > INTERVAL")
    return interval, grace


def join_study(study: optuna.Study) -> int:
    """Under the lock: take the next worker number (the run's identity was checked just before, by
    :func:`optimizer.run.check_same_run` on the study's record: one check for a resume and a joining worker)."""
    number = int(study.user_attrs.get(Attr.WORKERS, 0))
    study.set_user_attr(Attr.WORKERS, number + 1)
    return number


def worker_id(device: str | None) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{device or 'auto'}"


def _key(study_name: str, purpose: str) -> int:
    digest = hashlib.sha256(f"mergeopt:{study_name}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class StudyLock:
    """A lock on one study shared by every worker that uses the same database (PostgreSQL advisory locks).

    ``with lock():`` waits for and holds the study's lock; ``with lock.claim(purpose) as mine:`` takes a second
    lock without waiting (``mine`` is False when another worker holds it). Both are transaction-scoped, so a
    crash or a dropped connection releases them. For SQLite they do nothing (one worker per run folder).
    """

    def __init__(self, url: str, study_name: str):
        self.study_name = study_name
        self._engine = None
        self.retry = study_store.DatabaseRetry()  # taking the lock waits for a restarting server
        if url.startswith("postgresql"):
            import sqlalchemy

            self._engine = sqlalchemy.create_engine(url, pool_size=1, max_overflow=1, pool_pre_ping=True)
        elif not url.startswith("sqlite"):
            warnings.warn(f"no cross-worker lock for {url.split(':', 1)[0]} storage: run one worker per study, "
                          "or use PostgreSQL for several", stacklevel=2)

    @property
    def shared(self) -> bool:
        return self._engine is not None

    @contextmanager
    def __call__(self):
        """Hold the study lock. Taking it waits for a database server that is restarting (study_store.DatabaseRetry);
        a storage call that finds the connection gone while the lock is held raises study_store.LockLost out of the
        body (the server dropped the lock too), and the caller redoes the step."""
        if self._engine is None:
            yield
            return
        import sqlalchemy

        engine = self._engine

        def take():
            conn = engine.connect()
            try:
                transaction = conn.begin()
                conn.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:k)"),
                             {"k": _key(self.study_name, "study")})
            except BaseException:
                conn.close()
                raise
            return conn, transaction

        conn, transaction = self.retry.call(take, "study lock")
        study_store.LOCK.held = True
        try:
            yield
        finally:
            study_store.LOCK.held = False
            try:
                transaction.commit()  # releases the lock (transaction-scoped)
            except Exception as exc:
                if not study_store.connection_lost(exc):
                    raise
                # the server dropped the lock with the connection after the step's last call: the step is done
            finally:
                conn.close()

    @contextmanager
    def claim(self, purpose: str):
        if self._engine is None:
            yield True
            return
        import sqlalchemy

        with self._engine.begin() as conn:
            got = conn.execute(sqlalchemy.text("SELECT pg_try_advisory_xact_lock(:k)"),
                               {"k": _key(self.study_name, purpose)}).scalar()
            yield bool(got)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()


class Heartbeat:
    """Records Optuna's heartbeat of one trial every ``interval`` seconds from a thread, until stopped."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial, interval: int):
        self._study, self._trial, self._interval = study, trial, interval
        self._stop = threading.Event()
        study_store.record_heartbeat(study, trial)  # before the lock is released: no RUNNING trial is ever unwatched
        self._thread = threading.Thread(target=self._beat, daemon=True,
                                        name=f"heartbeat-{study_store.trial_id(trial)}")
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                study_store.record_heartbeat(self._study, self._trial)
            except Exception:  # a database hiccup: the next beat tries again; a long outage makes the trial stale
                pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def stale_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """RUNNING trials whose worker is gone: heartbeat older than the grace period, or never claimed by a worker.

    Call under the study lock: a live worker records the first heartbeat and its ``worker`` attribute before it
    releases the lock, so a RUNNING trial without them belongs to a worker that died in between.
    """
    if not study_store.heartbeats_enabled(study):
        return []
    ids = study_store.stale_trial_ids(study)
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if study_store.trial_id(t) in ids or "worker" not in t.user_attrs]


@dataclass
class Coordinated:
    """The optimiser as seen by one of several workers: ask and tell under the study lock, heartbeat in between.

    ``ask`` returns None when this worker should stop: the budget is met (finished trials, lost ones not
    counted) or the deadline has passed. While the rest of the budget is in other workers' hands, or a CMA
    generation is handed out but not complete, it polls (and fails stale trials) instead of inventing work.
    """

    optimizer: Optimizer
    lock: StudyLock
    recover_stale: Callable[[optuna.Study], list]  # trials marked lost; run under the lock when shared
    worker: str
    heartbeat: tuple[int, int] = DEFAULT_HEARTBEAT  # (interval, grace) seconds, with shared storage
    # coordination: ask and tell with the lock (waiting for it included); waiting: idle polls for other workers
    seconds: dict = field(default_factory=lambda: {"coordination": 0.0, "waiting": 0.0})
    _beats: dict = field(default_factory=dict)

    def ask(self, study: optuna.Study, target: int, deadline: float | None, stop=None):
        """The next trial to score, or None: budget met, deadline passed, or ``stop()`` true while polling."""
        interval = self.heartbeat[0] if self.lock.shared else None
        # poll soon (a generation usually completes within one candidate's time), then back off: many waiting
        # workers must not keep the lock busy for the ones that come to tell
        poll, cap = 0.2, max(0.2, min(2.0, (interval or 1) / 2))
        while deadline is None or time.monotonic() < deadline:
            trial = None
            try:
                with self._timed(), self.lock():
                    if self.lock.shared:
                        self.recover_stale(study)
                    states = study.get_trials(deepcopy=False, states=FINISHED + (TrialState.RUNNING,))
                    done = sum(1 for t in states if spends_budget(t))
                    in_flight = sum(1 for t in states if t.state == TrialState.RUNNING)
                    if done >= target:
                        return None
                    if done + in_flight < target:
                        trial = self.optimizer.ask(study)
                    if trial is not None:
                        if interval:
                            self._beats[study_store.trial_id(trial)] = Heartbeat(study, trial, interval)
                        trial.set_user_attr(Attr.WORKER, self.worker)
                        return trial
            except study_store.LockLost as lost:
                # the database restarted mid-step: a trial this step made is left to the stale-trial rule (no
                # heartbeat from us), and the step starts again once the server answers
                if trial is not None:
                    self._stop(study_store.trial_id(trial))
                log.warning("the study lock was lost (%s); asking again", lost)
                continue
            if not self.lock.shared:
                raise RuntimeError("the optimiser had no candidate to give although no other worker is running")
            if stop is not None and stop():  # e.g. Ctrl-C while waiting for other workers
                return None
            start = time.monotonic()
            time.sleep(poll * random.uniform(0.8, 1.2))
            poll = min(cap, poll * 1.5)
            self.seconds["waiting"] += time.monotonic() - start
        return None

    def tell(self, study: optuna.Study, trial: optuna.Trial, values) -> None:
        while True:
            try:
                with self._timed(), self.lock():
                    self.optimizer.tell(study, trial, values)  # idempotent: redone whole after a lost lock
                break
            except study_store.LockLost as lost:
                log.warning("the study lock was lost (%s); telling again", lost)
        self._stop(study_store.trial_id(trial))

    def recover(self, study: optuna.Study, stale: list) -> None:
        """Candidates given up (this worker's, interrupted): the caller holds the lock; stop their heartbeats."""
        for t in stale:
            self._stop(study_store.trial_id(t))
        self.optimizer.recover(study, stale)

    @contextmanager
    def _timed(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds["coordination"] += time.perf_counter() - start

    def _stop(self, trial_id: int) -> None:
        beat = self._beats.pop(trial_id, None)
        if beat is not None:
            beat.stop()

    def close(self) -> None:
        for trial_id in list(self._beats):
            self._stop(trial_id)
        self.lock.close()
