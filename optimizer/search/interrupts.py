"""Ctrl-C during a search: stop soon, but never half-way through writing the study.

From the first candidate on, SIGINT is held back everywhere in the loop (asking, recording, telling: database
writes) except while the backend builds and scores a candidate (minutes on a large model): there it raises
KeyboardInterrupt at once and the loop records that candidate as lost and queues it again. Held back, it lets the
step finish and the loop stops before the next candidate. Either way the command exits 130 with the study complete
and consistent. SIGTERM (a scheduler's notice before it kills a job) is handled the same way. Before the loop
(loading models, scoring the parents) Ctrl-C acts at once, as usual.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


class Interrupts:
    def __init__(self):
        self.pending = False
        self._depth = 0
        self._previous = None
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._previous = signal.signal(signal.SIGINT, self._handler)
            # SIGTERM (what schedulers such as SLURM send before killing a job) stops the run the same way
            self._previous_term = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame) -> None:
        self.pending = True
        if not self._depth:
            raise KeyboardInterrupt

    def hold(self) -> None:
        """From now on Ctrl-C waits for the current step (until :meth:`restore`), except inside :meth:`released`."""
        self._depth += 1

    @contextmanager
    def released(self):
        """Pure computation (no study writes) that Ctrl-C may cut short; raises at once if one is waiting."""
        self.check()
        depth, self._depth = self._depth, 0
        try:
            yield
        finally:
            self._depth = depth

    def around(self, backend):
        """The backend, its weight swaps and scoring calls made under :meth:`released`."""
        return _Released(backend, self)

    @contextmanager
    def deferred(self):
        """A bookkeeping step that Ctrl-C does not cut in two (the loop sees ``pending`` after it)."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1

    def check(self) -> None:
        """Raise the KeyboardInterrupt that arrived during a deferred step."""
        if self.pending:
            raise KeyboardInterrupt

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            signal.signal(signal.SIGTERM, self._previous_term)
            self._previous = None


class _Released:
    CALLS = ("swap", "generate", "loglikelihood", "load_state", "load_parent")

    def __init__(self, backend, interrupts: Interrupts):
        self._backend, self._interrupts = backend, interrupts

    def __getattr__(self, name):
        attr = getattr(self._backend, name)
        if name not in self.CALLS:
            return attr

        def call(*args, **kwargs):
            with self._interrupts.released():
                return attr(*args, **kwargs)
        return call
