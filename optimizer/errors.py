"""The exceptions of mergeopt: one for the user (a single line naming the problem and the fix), and the typed
failures of one candidate (the run records them and goes on)."""

from __future__ import annotations


class MergeoptError(Exception):
    """A problem with the user's input or environment, reported as one clear line (no traceback)."""


class CandidateFailure(RuntimeError):
    """Building or scoring one candidate went wrong: the candidate fails, the run goes on.

    ``kind`` names the failure in the study (``failure_kind``) and decides when repeated failures stop a run.
    """

    kind = "error"


class CandidateOutOfMemory(CandidateFailure):
    """The device ran out of memory for this candidate (a smaller batch or another device may fit it)."""

    kind = "oom"


class NonFiniteOutput(CandidateFailure):
    """The candidate's outputs (logits, a metric) are NaN or infinite: a broken merge, not a broken setup."""

    kind = "nan"


def failure_kind(exc: BaseException) -> str:
    """The kind of a candidate's failure, by the exception's type: ``oom``, ``nan`` or the type's name."""
    if isinstance(exc, CandidateFailure):
        return exc.kind
    # torch.OutOfMemoryError (and its CUDA alias) without importing torch here: matched by class, not by message
    if any(cls.__name__ == "OutOfMemoryError" for cls in type(exc).__mro__):
        return CandidateOutOfMemory.kind
    return type(exc).__name__
