"""A search whose process must be replaced: a CUDA error poisoned the context of the process that scores (the hf
backend on a GPU), and no later kernel of that process can succeed, whatever the candidate.

The search leaves the candidate in flight unscored first (lost: no budget spent, queued again; optimizer/search/
loop.py), so a new process resumes the same study exactly as a rerun by hand would. The command then replaces its
own process image with the same command line (``execve``), instead of exiting for a supervisor to start it again:

* a new image has a new CUDA context; every descriptor is marked close-on-exec first, so the exec closes the
  driver's handles and the card's memory is freed exactly as at exit;
* the process keeps its id: the run folder's lock, the job scheduler, the user's shell and its signals (Ctrl-C,
  SIGTERM) still see the one process they started, and there is no supervisor process to be orphaned or killed
  apart from its child;
* the same bound as an engine replacement (``EngineRecovery.restarts_per_hour``, with its backoff), the history
  carried across the exec in ``MERGEOPT_ENGINE_RESTARTED``.

When the bound is spent, or for an engine fault that a new process would not help (a backend that gave up
replacing its own engine), the command exits :data:`EXIT_ENGINE` (75, ``EX_TEMPFAIL``: try again later) with one
line, so an outer supervisor (systemd ``RestartForceExitStatus=75``, a SLURM requeue, a shell loop) can tell it from
bad input (exit 1).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence

from optimizer.errors import EngineFault
from optimizer.evaluate.recovery import EngineRecovery, RestartBudget

EXIT_ENGINE = 75  # EX_TEMPFAIL: the engine failed, not the input; the study is intact
HISTORY_ENV = "MERGEOPT_ENGINE_RESTARTED"  # times (seconds since the epoch) of this command's earlier restarts
log = logging.getLogger("mergeopt")


def restart_history(env: Mapping[str, str]) -> list[float]:
    """The restart times a replaced process was handed (none for a command started by hand)."""
    times = []
    for part in env.get(HISTORY_ENV, "").split(","):
        try:
            times.append(float(part))
        except ValueError:
            continue
    return times


def restart_if_allowed(fault: EngineFault, recovery: EngineRecovery, env: Mapping[str, str], argv: Sequence[str],
                       command: str = "mergeopt search") -> EngineFault:
    """Replace this process with ``argv`` (never returns) when ``fault`` needs a new process and the restarts allow;
    otherwise the fault that stops the run (``fault`` itself, or the final one saying the restarts are spent)."""
    if not fault.new_process or fault.final:
        return fault
    budget = RestartBudget(recovery, restart_history(env))
    try:
        wait = budget.spend(fault, "the search process")
    except EngineFault as final:
        return final
    print(f"{command}: {fault}; restarting the process on the same study in {wait:.0f} s "
          f"(restart {len(budget.history)} of {recovery.restarts_per_hour} allowed per hour)", file=sys.stderr)
    time.sleep(wait)
    replace_process(argv, {**env, HISTORY_ENV: ",".join(f"{t:.3f}" for t in budget.history)})
    raise AssertionError("unreachable: execve returned")


def stopped_line(fault: EngineFault, command: str = "mergeopt search") -> str:
    """The one line of a run stopped by an engine fault (the command then exits :data:`EXIT_ENGINE`)."""
    return f"{command}: stopped: engine fault ({fault.cause}): {fault}"


def replace_process(argv: Sequence[str], env: Mapping[str, str]) -> None:
    """``execve`` this interpreter with ``argv`` (``sys.orig_argv``: the interpreter's own options and ``-m``
    included); every inherited descriptor but stdin, stdout and stderr is closed by the exec."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    for name in os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else []:
        fd = int(name)
        if fd > 2:
            try:
                os.set_inheritable(fd, False)
            except OSError:  # the listing's own descriptor, already closed
                pass
    os.execve(sys.executable, [sys.executable, *argv[1:]], dict(env))
