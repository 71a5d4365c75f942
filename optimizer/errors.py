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


class EngineFault(RuntimeError):
    """The inference engine failed, not the candidate: its process died or hung, the connection to it was lost, or a
    CUDA error poisoned the process that holds it. Never recorded against a genome: the engine is replaced and the
    candidate scored again (optimizer/evaluate/recovery.py).

    ``cause``: ``dead``, ``hung`` or ``cuda``. ``new_process``: only a new process can recover (a poisoned CUDA
    context). ``final``: the backend gave up replacing its engine (restarts per hour spent); the candidate in flight
    is then left unscored (lost: it spends no budget) and the run stops with this line.
    """

    def __init__(self, message: str, cause: str = "dead", new_process: bool = False, final: bool = False):
        super().__init__(message)
        self.cause, self.new_process, self.final = cause, new_process, final


def engine_fault_of(exc: BaseException) -> EngineFault | None:
    """The engine fault an exception raised in this process stands for, or None (then it is the candidate's).

    A CUDA error other than out-of-memory (an illegal address, a device-side assert, a launch failure: torch raises
    them as ``torch.AcceleratorError``, older releases as a RuntimeError saying "CUDA error") is sticky: every later
    kernel of the process fails too, whatever the candidate. Matched by class name and message, without torch."""
    if isinstance(exc, EngineFault):
        return exc
    if failure_kind(exc) == CandidateOutOfMemory.kind:
        return None
    names = {cls.__name__ for cls in type(exc).__mro__}
    text = str(exc).strip()
    if "AcceleratorError" in names or (isinstance(exc, RuntimeError) and text.startswith("CUDA error")):
        first = text.splitlines()[0] if text else type(exc).__name__
        return EngineFault(f"a CUDA error poisoned this process ({first})", cause="cuda", new_process=True)
    return None


NEAR_MISS_CUTOFF = 0.6  # how alike a typo must be to a known name to be suggested (difflib's ratio)


def nearest(word: str, known) -> str | None:
    """The known name nearest to a misspelt one, or None when none is near enough."""
    import difflib

    close = difflib.get_close_matches(str(word), [str(k) for k in known], n=1, cutoff=NEAR_MISS_CUTOFF)
    return close[0] if close else None


def did_you_mean(word: str, known) -> str:
    """`` (did you mean 'density'?)`` for a near miss of a known name, else nothing: the one suggestion every
    message of mergeopt gives (search spaces, task sets, recipes, method names and parameters)."""
    near = nearest(word, known)
    return f" (did you mean {near!r}?)" if near else ""


def unknown_key(source: str, key: str, known, where: str = "") -> MergeoptError:
    """The one message for a key that is not allowed: ``SOURCE: [WHERE: ]unknown key 'k' (did you mean 'x'?);
    allowed keys: ...``."""
    place = f"{where}: " if where else ""
    return MergeoptError(f"{source}: {place}unknown key {key!r}{did_you_mean(key, known)}; allowed keys: "
                         f"{', '.join(str(k) for k in known)}")


def _where(loc) -> str:
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int):
            parts[-1] = f"{parts[-1]}[{part}]" if parts else f"[{part}]"
        else:
            parts.append(str(part))
    return ".".join(parts)


def schema_error(exc, source: str, allowed: dict[str, list[str]], hints: dict[str, str] | None = None,
                 flags: dict[str, str] | None = None) -> MergeoptError:
    """The one-line message for a pydantic ``ValidationError`` (the formatter of every declared schema).

    ``allowed`` maps a location ("" for the top level, "bounds", "objectives[]") to the names accepted there, for
    unknown keys; ``hints`` maps a top-level key to what it expects; ``flags`` maps a location whose value came
    from the command line ("budget.minutes") to its flag ("--minutes"), so the message names what the user typed.
    An unknown key that is a near miss of a missing required key is said first ("unknown key 'objectivs' (did you
    mean 'objectives'?)" rather than "objectives: is missing").
    """
    errors = exc.errors()
    error = errors[0]
    extras = [e for e in errors if e["type"] == "extra_forbidden"]
    missing = [e for e in errors if e["type"] == "missing"]
    for extra in extras:  # a typo of a required key: both errors are reported; the typo is the one to fix
        parent = extra["loc"][:-1]
        if any(m["loc"][:-1] == parent and nearest(str(extra["loc"][-1]), [str(m["loc"][-1])]) for m in missing):
            error = extra
            break
    else:
        if extras and error["type"] == "missing":
            error = extras[0]
    loc = error["loc"]
    where = _where(loc)
    kind, message, given = error["type"], error["msg"], error.get("input")
    if kind == "extra_forbidden":
        key = str(loc[-1])
        parent = ".".join(str(p) for p in loc[:-1] if not isinstance(p, int))
        parent_key = parent + ("[]" if any(isinstance(p, int) for p in loc[:-1]) else "")
        names = allowed.get(parent_key, [])
        if not parent:
            return unknown_key(source, key, names)
        where = _where(loc[:-1])
        return MergeoptError(f"{source}: {where}: unknown entry {key!r}{did_you_mean(key, names)}; allowed: "
                             f"{', '.join(names)}")
    if kind == "missing":
        text = "is missing"
    elif kind in ("value_error", "assertion_error"):
        text = message.removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if text.startswith("."):  # a validator of a mapping naming the sub-key at fault: ".name: ..."
            key, _, text = text[1:].partition(": ")
            where = f"{where}.{key}"
    else:
        text = f"{message[0].lower()}{message[1:]}, got {given!r}"
    flag = (flags or {}).get(where)
    if flag is not None:  # the value came from the command line: name the flag, not the file's key
        return MergeoptError(f"{flag}: {text}")
    hint = (hints or {}).get(str(loc[0]) if loc else "", "")
    return MergeoptError(f"{source}: {where}: {text}" + (f" (expected {hint})" if hint else ""))
