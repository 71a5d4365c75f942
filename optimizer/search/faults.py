"""A testing hook: inject faults into chosen trials of a search through ``MERGEOPT_FAULT``.

The reliability tests (and anyone checking a deployment) use it to make a candidate fail the way real hardware
fails, without mocking the loop, the study or the optimiser::

    MERGEOPT_FAULT=oom@trial:3                 # trial 3 runs out of memory while its weights are built
    MERGEOPT_FAULT=error@trial:2-4,kill@trial:7
    MERGEOPT_FAULT=slow=1.5@trial:0-99         # every candidate 1.5 s slower (the multi-worker tests use it)

Kinds (all raised inside the backend's weight swap, where the real faults happen):
  ``oom``        torch.OutOfMemoryError, as a GPU allocation failure raises it
  ``error``      RuntimeError (a bug or a driver error in the candidate's build)
  ``interrupt``  KeyboardInterrupt, as Ctrl-C delivers it mid-candidate
  ``kill``       SIGKILL of the whole process mid-candidate (as ``kill -9`` or the OOM killer)
  ``cuda``       a CUDA error that poisons the process's context: on a CUDA device a real device-side assert (an
                 out-of-bounds index), elsewhere the torch.AcceleratorError such a kernel fault raises; a fault of
                 the engine, not of the candidate
  ``slow=S``     a straggler: the candidate takes S seconds longer (a busy GPU, a slow disk), then builds as usual
Trial numbers are the study's trial numbers; ``N-M`` is a closed range. Unset (the default), nothing changes.
The command line reads the variable and parses it (:func:`parse`) before the run folder is made; the search gets
the parsed plan (``SearchOptions.faults``) and :func:`with_faults` applies it to every candidate.
"""

from __future__ import annotations

import os
import signal
import time

import torch

from optimizer.errors import MergeoptError

ENV = "MERGEOPT_FAULT"
KINDS = ("oom", "error", "interrupt", "kill", "cuda")  # and slow=S


def parse(spec: str) -> dict[int, str]:
    """``"oom@trial:3,error@trial:5-6"`` -> {3: "oom", 5: "error", 6: "error"}."""
    faults: dict[int, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        kind, _, where = item.partition("@trial:")
        first, _, last = where.partition("-")
        if (kind not in KINDS and _seconds(kind) is None) or not first.isdigit() or (last and not last.isdigit()):
            raise MergeoptError(f"{ENV}={spec!r}: {item!r} is not KIND@trial:N or KIND@trial:N-M "
                                f"(KIND one of {', '.join(KINDS)}, slow=S)")
        for number in range(int(first), int(last or first) + 1):
            faults[number] = kind
    return faults


def _seconds(kind: str) -> float | None:
    """The S of ``slow=S`` (a finite number of seconds, 0 or more); None for anything else."""
    name, _, value = kind.partition("=")
    if name != "slow":
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if 0 <= seconds < float("inf") else None


def with_faults(backend, trial_number: int, planned: dict[int, str]):
    """The backend itself, or (when ``planned``, the parsed ``MERGEOPT_FAULT``, names this trial) a wrapper whose
    swap fails or straggles."""
    kind = planned.get(trial_number)
    return backend if kind is None else _FaultyBackend(backend, kind, trial_number)


class _FaultyBackend:
    def __init__(self, backend, kind: str, trial_number: int):
        self._backend, self._kind, self._number = backend, kind, trial_number

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def swap(self, engine, recipe) -> None:
        note = f"(injected by {ENV} at trial {self._number})"
        if self._kind.startswith("slow"):
            time.sleep(_seconds(self._kind) or 0.0)
            return self._backend.swap(engine, recipe)
        if self._kind == "oom":
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB {note}")
        if self._kind == "error":
            raise RuntimeError(f"candidate build failed {note}")
        if self._kind == "interrupt":
            raise KeyboardInterrupt
        if self._kind == "cuda":
            device = getattr(self._backend, "device", None)
            if isinstance(device, torch.device) and device.type == "cuda":
                # the real thing: an out-of-bounds index is a device-side assert, which poisons the context
                torch.zeros(1, device=device)[torch.tensor([1], device=device)].sum().item()
            raise torch.AcceleratorError(f"CUDA error: an illegal memory access was encountered {note}")
        os.kill(os.getpid(), signal.SIGKILL)
