"""Non-dominated sets and hypervolume, for objectives that are all maximised (callers flip minimised ones)."""

from __future__ import annotations

from collections.abc import Sequence


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def non_dominated(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the points no other point dominates (duplicates all kept)."""
    return [i for i, p in enumerate(points) if not any(dominates(q, p) for j, q in enumerate(points) if j != i)]


def hypervolume(points: Sequence[Sequence[float]], reference: Sequence[float]) -> float:
    """Volume dominated by ``points`` and bounded below by ``reference`` (maximisation), by slicing.

    Exact; fine for the few dozen points and 2-4 objectives of a merge search.
    """
    pts = [tuple(p) for p in points if all(x > r for x, r in zip(p, reference))]
    if not pts:
        return 0.0
    if len(reference) == 1:
        return max(p[0] for p in pts) - reference[0]
    front = [pts[i] for i in non_dominated(pts)]
    # slice along the last objective: between consecutive levels, the volume is the (d-1)-volume of the points
    # at least that high
    levels = sorted({p[-1] for p in front}, reverse=True)
    total = 0.0
    for k, level in enumerate(levels):
        lower = levels[k + 1] if k + 1 < len(levels) else reference[-1]
        above = [p[:-1] for p in front if p[-1] >= level]
        total += hypervolume(above, reference[:-1]) * (level - lower)
    return total
