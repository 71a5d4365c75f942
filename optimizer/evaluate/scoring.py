"""Scoring a candidate: every task's requests through one backend; failures stay with the candidate."""

from __future__ import annotations

import math
import time
import traceback
from dataclasses import dataclass, field

from optimizer.errors import MergeoptError
from optimizer.evaluate.tasks import Score, TaskSet

BACKENDS = ("hf", "vllm")


def make_backend(name: str, model_path, device: str | None = None, dtype: str = "float32", **kwargs):
    """The live inference engine of a run, loaded once from the base model's folder."""
    if name == "hf":
        from optimizer.evaluate.hf import HFBackend

        return HFBackend(model_path, device=device, dtype=dtype, **kwargs)
    if name == "vllm":
        from optimizer.evaluate.vllm import VLLMBackend

        return VLLMBackend(model_path, device=device, dtype=dtype, **kwargs)
    raise MergeoptError(f"backend {name!r} is not one of {', '.join(BACKENDS)}")


def check_backend(name: str, model_path, swaps: bool = True) -> None:
    """Refuse, before any model is loaded, what a backend cannot run (``swaps``: candidates will be loaded into it)."""
    if name == "vllm":
        from optimizer.evaluate.vllm import preflight

        preflight(model_path, swaps=swaps)


@dataclass
class CandidateResult:
    scores: dict[str, Score]
    seconds: dict[str, float] = field(default_factory=dict)  # "swap", "score"
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None

    def to_dict(self) -> dict:
        return {name: s.to_dict() for name, s in self.scores.items()}


def score(backend, task_set: TaskSet, progress: bool = False) -> dict[str, Score]:
    """Per-task scores; a task whose scoring raises gets a failed Score with the reason."""
    from tqdm import tqdm

    results: dict[str, Score] = {}
    for task in tqdm(task_set.tasks, desc="scoring", unit="task", disable=not progress, leave=False):
        try:
            generated = backend.generate(task.generation) if task.generation else []
            likelihoods = backend.loglikelihood(task.loglikelihood) if task.loglikelihood else []
            result = task.finish(generated, likelihoods)
            if result.value is None or not math.isfinite(result.value):
                result = Score(task.metric, None, None, result.n, error="the metric is not a finite number")
        except MergeoptError:
            raise
        except Exception as exc:  # one bad candidate must not end the run
            result = Score(task.metric, None, None, 0, error=_reason(exc))
        results[task.spec.name] = result
    return results


def evaluate_candidate(backend, task_set: TaskSet, engine=None, recipe=None, progress: bool = False) -> CandidateResult:
    """Swap a recipe's weights into the backend (when given) and score it; never raises for a bad candidate."""
    seconds = {}
    start = time.perf_counter()
    if recipe is not None:
        try:
            backend.swap(engine, recipe)
        except MergeoptError:
            raise
        except Exception as exc:
            return CandidateResult({}, {"swap": time.perf_counter() - start}, error=_reason(exc))
    seconds["swap"] = time.perf_counter() - start
    scores = score(backend, task_set, progress=progress)
    seconds["score"] = time.perf_counter() - start - seconds["swap"]
    errors = [f"{name}: {s.error}" for name, s in scores.items() if s.error]
    return CandidateResult(scores, seconds, error="; ".join(errors) or None)


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    place = f" at {where.filename.rsplit('/', 1)[-1]}:{where.lineno}" if where else ""
    return f"{type(exc).__name__}: {text}{place}"[:500]
