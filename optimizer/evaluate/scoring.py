"""Scoring a candidate: every task's requests through one backend; failures stay with the candidate."""

from __future__ import annotations

import importlib
import math
import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from optimizer.errors import EngineFault, MergeoptError, NonFiniteOutput, engine_fault_of, failure_kind
from optimizer.evaluate.tasks import GenerationRequest, LoglikelihoodRequest, Score, TaskSet

class Backend(Protocol):
    """An inference engine loaded once per run; candidates are swapped into it. Use it as a context manager
    (``contextlib.closing(make_backend(...))``) so its engine is shut down however the command ends."""

    name: str
    # Engine faults (optimizer/evaluate/recovery.py): a backend that can replace its engine does so itself, scores the
    # weights in flight again and notes each fault survived here; one that cannot raises errors.EngineFault, which
    # scoring never records against the candidate.
    engine_events: list

    def swap(self, engine: Any, recipe: Any) -> None:
        """Build ``recipe`` with the merge ``engine`` into the live weights."""

    def load_parent(self, engine: Any, index: int) -> None:
        """Put one of the engine's own models into the live weights as it is (0: the base, i: fine-tune i), from the
        engine's mapped weights (no second load); the parents are scored so."""

    def load_state(self, tensors: Iterable[tuple[str, Any]]) -> None:
        """Copy ``(name, tensor)`` pairs into the live weights (a parent model as it is)."""

    def generate(self, requests: list[GenerationRequest]) -> list[str]:
        """Greedy completions, one per request."""

    def loglikelihood(self, requests: list[LoglikelihoodRequest]) -> list[tuple[float, bool]]:
        """(log-likelihood of the continuation, whether it is the greedy one), one per request."""

    def close(self) -> None:
        """Shut the engine down and free its memory."""


# the registry of backends: name -> "module:class" (imported on use: vLLM is heavy and optional)
BACKENDS = {"hf": "optimizer.evaluate.hf:HFBackend", "vllm": "optimizer.evaluate.vllm:VLLMBackend"}


# backends whose merge engine lives inside the inference engine (vLLM's worker): they are told the engine device,
# and the caller's own engine only checks recipes, on the host
OWN_MERGE_ENGINE = frozenset({"vllm"})

# backends that replace their own engine when it dies or hangs (the others' engine is this process)
REPLACES_ENGINE = frozenset({"vllm"})


def make_backend(name: str, model_path, device: str | None = None, dtype: str = "float32",
                 engine_device: str | None = None, recovery=None, **kwargs) -> Backend:
    """The live inference engine of a run, loaded once from the base model's folder. ``engine_device``: where a
    backend with its own merge engine holds the models (the others build with the caller's engine). ``recovery``:
    the :class:`~optimizer.evaluate.recovery.EngineRecovery` of a backend that replaces its engine (its default
    otherwise)."""
    if name not in BACKENDS:
        raise MergeoptError(f"backend {name!r} is not one of {', '.join(BACKENDS)}")
    module, _, cls = BACKENDS[name].partition(":")
    backend_class = getattr(importlib.import_module(module), cls)
    if name in OWN_MERGE_ENGINE:
        kwargs["engine_device"] = engine_device
    if name in REPLACES_ENGINE and recovery is not None:
        kwargs["recovery"] = recovery
    return backend_class(model_path, device=device, dtype=dtype, **kwargs)


def check_backend(name: str, model_path, swaps: bool = True, engine_device: str | None = None) -> None:
    """Refuse, before any model is loaded, what a backend cannot run (``swaps``: candidates will be loaded into it)."""
    if name == "vllm":
        from optimizer.evaluate.vllm import preflight

        preflight(model_path, swaps=swaps, engine_device=engine_device)


@dataclass
class CandidateResult:
    scores: dict[str, Score]
    seconds: dict[str, float] = field(default_factory=dict)  # "swap", "score"
    error: str | None = None
    kind: str | None = None  # the first failure's kind (errors.failure_kind): "oom", "nan", an exception's type

    @property
    def failed(self) -> bool:
        return self.error is not None

    def to_dict(self) -> dict:
        return {name: s.to_dict() for name, s in self.scores.items()}

    def items(self) -> dict[str, list[float]]:
        """Each task's per-item values (the paired comparisons of optimizer/evaluate/stats.py need them)."""
        return {name: s.items for name, s in self.scores.items() if s.items is not None}


def score(backend, task_set: TaskSet, progress: bool = False, kinds: dict[str, str] | None = None
          ) -> dict[str, Score]:
    """Per-task scores; a task whose scoring raises gets a failed Score with the reason (its kind in ``kinds``)."""
    from tqdm import tqdm

    results: dict[str, Score] = {}
    kinds = {} if kinds is None else kinds
    for task in tqdm(task_set.tasks, desc="scoring", unit="task", disable=not progress, leave=False):
        try:
            generated = backend.generate(task.generation) if task.generation else []
            likelihoods = backend.loglikelihood(task.loglikelihood) if task.loglikelihood else []
            result = task.finish(generated, likelihoods)
            if result.value is None or not math.isfinite(result.value):
                result = Score(task.metric, None, None, result.n, error="the metric is not a finite number")
                kinds[task.spec.name] = NonFiniteOutput.kind
        except (MergeoptError, EngineFault):
            raise
        except Exception as exc:  # one bad candidate must not end the run
            _raise_engine_fault(exc)
            result = Score(task.metric, None, None, 0, error=_reason(exc))
            kinds[task.spec.name] = failure_kind(exc)
        results[task.spec.name] = result
    return results


def evaluate_candidate(backend, task_set: TaskSet, engine=None, recipe=None, progress: bool = False) -> CandidateResult:
    """Swap a recipe's weights into the backend (when given) and score it; never raises for a bad candidate."""
    seconds = {}
    start = time.perf_counter()
    if recipe is not None:
        try:
            backend.swap(engine, recipe)
        except (MergeoptError, EngineFault):
            raise
        except Exception as exc:
            _raise_engine_fault(exc)
            return CandidateResult({}, {"swap": time.perf_counter() - start}, error=_reason(exc),
                                   kind=failure_kind(exc))
    seconds["swap"] = time.perf_counter() - start
    kinds: dict[str, str] = {}
    scores = score(backend, task_set, progress=progress, kinds=kinds)
    seconds["score"] = time.perf_counter() - start - seconds["swap"]
    errors = [f"{name}: {s.error}" for name, s in scores.items() if s.error]
    kind = next((kinds[name] for name, s in scores.items() if s.error and name in kinds), None)
    return CandidateResult(scores, seconds, error="; ".join(errors) or None, kind=kind if errors else None)


def _raise_engine_fault(exc: Exception) -> None:
    """An exception that stands for the engine's fault, not the candidate's (errors.engine_fault_of), is raised as
    that EngineFault."""
    fault = engine_fault_of(exc)
    if fault is not None:
        raise fault from exc


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    place = f" at {where.filename.rsplit('/', 1)[-1]}:{where.lineno}" if where else ""
    return f"{type(exc).__name__}: {text}{place}"[:500]
