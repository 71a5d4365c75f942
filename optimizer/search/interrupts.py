"""Ctrl-C during a search: stop at once, but never half-way through writing the study.

While a candidate is merged and scored (minutes on a large model), SIGINT raises KeyboardInterrupt as usual, so
the search stops at once; the loop records that candidate as lost and queues it again. While the loop asks for a
candidate or records one (a few database writes, milliseconds), SIGINT is held back: the step completes and the
loop stops before the next candidate. Either way the command exits 130 with the study complete and consistent.
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

    def _handler(self, signum, frame) -> None:
        self.pending = True
        if not self._depth:
            raise KeyboardInterrupt

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
            self._previous = None
