"""Scores with their noise, and paired comparisons of two candidates scored on the same items (pure Python).

A candidate's score on a task is the mean of its per-item values (1/0 for exact match and accuracy); its standard
error is the sample standard deviation over sqrt(n) (lm-evaluation-harness' convention). Two candidates scored on
the same items are compared item by item: the difference of their scores is the mean of the per-item differences,
and its standard error is that of the differences, which is far smaller than the unpaired one when the two
candidates get mostly the same items right.

The scalarized objective (the weighted mean of the objectives, signs turned so larger is better) is a weighted sum of
task means over disjoint items, so its variance is the weighted sum of the tasks' variances:
``se(sum_t c_t * mean_t) = sqrt(sum_t c_t^2 * se_t^2)`` with ``c_t = sign_t * w_t / sum(w)``.

The words: ``better by 2.6 s.e.`` / ``worse by 2.6 s.e.`` when |z| >= 2 (z = difference / its s.e.), else ``within
noise``. Per-item values are stored compactly (:func:`pack`): a string of 0/1 when every value is 0 or 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

NOISE_Z = 2.0  # |difference| below this many standard errors is "within noise"


def pack(values: Sequence[float]) -> str | list[float]:
    """Per-item values as stored in a study: "0110..." when every value is 0 or 1, else the numbers."""
    if all(v in (0.0, 1.0) for v in values):
        return "".join("1" if v else "0" for v in values)
    return [round(float(v), 6) for v in values]


def unpack(stored: str | Sequence[float]) -> list[float]:
    if isinstance(stored, str):
        return [1.0 if c == "1" else 0.0 for c in stored]
    return [float(v) for v in stored]


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error (sample variance); 0.0 s.e. for fewer than two values."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


@dataclass(frozen=True)
class Estimate:
    """A score (or a difference of scores) with its standard error, over ``n`` items."""

    value: float
    se: float
    n: int

    @property
    def z(self) -> float:
        if self.se > 0:
            return self.value / self.se
        return 0.0 if self.value == 0 else math.copysign(math.inf, self.value)

    def words(self) -> str:
        """``better by 2.6 s.e.``, ``worse by 2.6 s.e.`` or ``within noise`` (|z| < 2)."""
        z = self.z
        if abs(z) < NOISE_Z:
            return "within noise"
        direction = "better" if z > 0 else "worse"
        if math.isinf(z):
            return f"{direction} on every item that differs (no noise)"
        return f"{direction} by {abs(z):.1f} s.e."


def coefficients(objectives: Sequence[tuple[str, bool]], weights: Mapping[str, float] | None = None
                 ) -> dict[str, float]:
    """Task -> coefficient of its mean in the scalarized objective: sign (maximise +1) x weight / sum of weights.
    ``objectives``: (task, maximise) pairs."""
    weights = weights or {}
    total = sum(float(weights.get(task, 1.0)) for task, _ in objectives)
    return {task: (1.0 if maximize else -1.0) * float(weights.get(task, 1.0)) / total for task, maximize in objectives}


def scalarized(items: Mapping[str, Sequence[float]], coefs: Mapping[str, float]) -> Estimate:
    """The scalarized score of one candidate from its per-item values, with its (unpaired) standard error."""
    value, variance, n = 0.0, 0.0, 0
    for task, c in coefs.items():
        mean, se = mean_se(items[task])
        value += c * mean
        variance += c * c * se * se
        n += len(items[task])
    return Estimate(value, math.sqrt(variance), n)


def paired(a: Sequence[float], b: Sequence[float]) -> Estimate:
    """Score of ``a`` minus score of ``b`` on the same items, with the standard error of the paired difference."""
    if len(a) != len(b):
        raise ValueError(f"paired comparison of {len(a)} and {len(b)} items: not the same items")
    mean, se = mean_se([x - y for x, y in zip(a, b)])
    return Estimate(mean, se, len(a))


@dataclass(frozen=True)
class Comparison:
    """Candidate A against candidate B on the same items: per task and for the scalarized objective."""

    a: Estimate  # A's scalarized score
    b: Estimate  # B's scalarized score
    difference: Estimate  # A - B, paired
    tasks: dict[str, Estimate]  # per task: A - B, paired (in the task's own direction: raw means)

    def words(self) -> str:
        return self.difference.words()


def compare(a: Mapping[str, Sequence[float]], b: Mapping[str, Sequence[float]], coefs: Mapping[str, float]
            ) -> Comparison:
    """Paired comparison of two candidates' per-item values (task -> values, the same items in the same order)."""
    tasks = {task: paired(a[task], b[task]) for task in coefs}
    value = sum(c * tasks[t].value for t, c in coefs.items())
    se = math.sqrt(sum((c * tasks[t].se) ** 2 for t, c in coefs.items()))
    n = sum(tasks[t].n for t in coefs)
    return Comparison(scalarized(a, coefs), scalarized(b, coefs), Estimate(value, se, n), tasks)
