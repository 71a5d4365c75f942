"""When the inference engine fails, not the candidate: the policy that replaces it, and the watch that finds it dead
or hung.

A search of days on GPUs outlives its engine: a CUDA error, the OOM killer, a hung collective, a driver reset. Such a
fault says nothing about the candidate being scored, so it must not be recorded against its genome, spend the budget,
or be told to the optimiser as a failure. A backend that can replace its engine (vLLM: its engine processes) does so
itself and scores the candidate in flight again; one that cannot in this process (a CUDA context poisoned in the
search process itself, the hf backend on a GPU) raises :class:`~optimizer.errors.EngineFault` with ``new_process``, and
the command restarts its own process on the same study (optimizer/search/restart.py).

Both are bounded by one :class:`EngineRecovery` policy: at most ``restarts_per_hour`` replacements in any hour, each
after a backoff that doubles with every replacement in that hour; past that the run stops with one line naming the
cause (the candidate in flight left unscored, as a killed worker leaves it). A call to the engine that makes no
progress for :meth:`EngineRecovery.hang_timeout` (a multiple of the longest candidate measured so far, never under a
floor) counts as a dead engine: its processes are killed and replaced.

Library code reads no environment: the command line builds the policy with :meth:`EngineRecovery.from_env`.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from optimizer.errors import EngineFault, MergeoptError

RESTARTS_ENV = "MERGEOPT_ENGINE_RESTARTS"  # engine replacements allowed in any hour (0: stop at the first fault)
TIMEOUT_ENV = "MERGEOPT_ENGINE_TIMEOUT"  # the hang timeout's floor, seconds


@dataclass(frozen=True)
class EngineRecovery:
    """How a run survives its engine. The defaults suit long runs on GPUs; tests shorten them."""

    restarts_per_hour: int = 5
    backoff_seconds: float = 5.0  # before the first replacement of an hour; doubled for each further one
    max_backoff_seconds: float = 300.0
    hang_floor_seconds: float = 120.0  # no engine call is called hung sooner than this
    hang_factor: float = 5.0  # ... nor sooner than this many times the longest candidate measured so far
    load_timeout_seconds: float = 3600.0  # starting an engine, loading the models into it

    def hang_timeout(self, longest_candidate: float | None) -> float:
        """Seconds without an answer after which one call to the engine counts as hung."""
        return max(self.hang_floor_seconds, self.hang_factor * (longest_candidate or 0.0))

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> EngineRecovery:
        """``MERGEOPT_ENGINE_RESTARTS=N`` (per hour) and ``MERGEOPT_ENGINE_TIMEOUT=SECONDS`` (the hang floor)."""
        settings: dict[str, Any] = {}
        text = env.get(RESTARTS_ENV, "").strip()
        if text:
            if not text.isdigit():
                raise MergeoptError(f"{RESTARTS_ENV}={text!r}: give the engine restarts allowed per hour, a whole "
                                    "number (0: stop at the first engine fault)")
            settings["restarts_per_hour"] = int(text)
        text = env.get(TIMEOUT_ENV, "").strip()
        if text:
            try:
                seconds = float(text)
            except ValueError:
                seconds = -1.0
            if not 1.0 <= seconds < float("inf"):
                raise MergeoptError(f"{TIMEOUT_ENV}={text!r}: give the seconds after which an engine call that "
                                    "makes no progress counts as hung (1 or more; the default is 120)")
            settings["hang_floor_seconds"] = seconds
            settings["backoff_seconds"] = min(cls.backoff_seconds, seconds / 4)  # short hang floors: tests
        return cls(**settings)


@dataclass
class EngineEvent:
    """One engine fault survived: what happened, when, and how long the replacement took."""

    cause: str
    detail: str
    at: float  # time.time() of the fault
    recovery_seconds: float | None = None  # from the fault to a new engine holding the candidate again

    def to_dict(self) -> dict:
        return {"cause": self.cause, "detail": self.detail[:300], "at": round(self.at, 3),
                "recovery_seconds": None if self.recovery_seconds is None else round(self.recovery_seconds, 3)}


@dataclass
class RestartBudget:
    """Replacements within a rolling hour; ``history`` (times of earlier ones) survives a process restart."""

    policy: EngineRecovery
    history: list[float] = field(default_factory=list)
    clock: Callable[[], float] = time.time

    def recent(self) -> list[float]:
        now = self.clock()
        return [t for t in self.history if now - t < 3600.0]

    def spend(self, fault: EngineFault, what: str = "the engine") -> float:
        """Account for one replacement after ``fault``: the seconds to wait before it, or the final EngineFault
        (one line: the cause, and what to do) when this hour's replacements are spent."""
        recent = self.recent()
        if len(recent) >= self.policy.restarts_per_hour:
            limit = self.policy.restarts_per_hour
            times = "no restart is allowed" if limit == 0 else f"{limit} restart(s) in the last hour were spent"
            raise EngineFault(f"{what} failed ({fault.cause}: {fault}) and {times}; the study is intact: rerun the "
                              f"same command to continue ({RESTARTS_ENV} raises the limit)",
                              cause=fault.cause, final=True)
        self.history = [*recent, self.clock()]
        return min(self.policy.max_backoff_seconds, self.policy.backoff_seconds * 2 ** len(recent))


def watched_call(fn: Callable[[], Any], timeout: float, alive: Callable[[], str | None], on_hang: Callable[[], Any],
                 poll: float = 0.2, grace: float = 5.0) -> Any:
    """``fn()``, run in a thread the caller watches: its value or its exception, or an EngineFault when the engine
    died (``alive()`` names the dead part, and ``fn`` did not return within ``grace`` seconds of that) or made no
    progress for ``timeout`` seconds (``on_hang`` then kills what is left of it).

    A blocked call into a dead engine may never return (a reply that will not come): its thread is left behind
    (a daemon, blocked on the old engine) rather than the search. Time the whole process spent stopped (Ctrl-Z, a
    suspended job) does not count towards the timeout.
    """
    box: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread, which decides what it means
            box["error"] = exc
        finally:
            done.set()

    thread = threading.Thread(target=run, name="mergeopt-engine-call", daemon=True)
    start = last = time.monotonic()
    deadline = start + timeout
    dead_since: float | None = None
    thread.start()
    while not done.wait(poll):
        now = time.monotonic()
        if now - last > poll + 5.0:  # this process itself was stopped meanwhile: the engine was not hanging
            deadline += now - last - poll
        last = now
        dead = alive()
        if dead is not None:
            dead_since = dead_since or now
            if now - dead_since >= grace:
                raise EngineFault(f"the engine died ({dead})", cause="dead")
        elif now >= deadline:
            on_hang()
            raise EngineFault(f"the engine made no progress for {now - start:.0f} s (hung; the limit was "
                              f"{timeout:.0f} s); its processes were killed", cause="hung")
    if "error" in box:
        raise box["error"]
    return box.get("value")


class EngineProcesses:
    """The processes one engine started (found as new descendants of this process once it is up), to tell whether
    they live and to end them all, the stopped and the orphaned included. Helper processes shared by every engine of
    the process (multiprocessing's resource tracker) are not the engine's."""

    SHARED = ("resource_tracker", "forkserver")

    def __init__(self, before: set[int]):
        import psutil

        self.procs: dict[int, Any] = {}
        self.names: dict[int, str] = {}  # read while they live: a dead process can no longer be asked
        for proc in psutil.Process().children(recursive=True):
            if proc.pid in before or self._shared(proc):
                continue
            try:
                self.names[proc.pid] = proc.name()
            except psutil.Error:
                continue
            self.procs[proc.pid] = proc

    @staticmethod
    def snapshot() -> set[int]:
        import psutil

        return {p.pid for p in psutil.Process().children(recursive=True)}

    @classmethod
    def _shared(cls, proc) -> bool:
        import psutil

        try:
            return any(name in " ".join(proc.cmdline()) for name in cls.SHARED)
        except psutil.Error:
            return False

    @property
    def pids(self) -> list[int]:
        return sorted(self.procs)

    def dead(self) -> str | None:
        """None while every engine process runs; else the first one gone ("VLLM::Worker pid 123 exited")."""
        for pid, proc in self.procs.items():
            if not _running(proc):
                return f"{self.names[pid]} pid {pid} exited"
        return None

    def kill(self, timeout: float = 30.0) -> list[int]:
        """SIGKILL every engine process (a stopped one too) and wait until they are gone; the pids still there."""
        import psutil

        for proc in self.procs.values():
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(list(self.procs.values()), timeout=timeout)
        return sorted(p.pid for p in alive if _running(p))


def _running(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def pid_running(pid: int) -> bool:
    """Whether a process of that id runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True
