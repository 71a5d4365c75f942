"""Fixtures of the reliability suite: the search tests' tiny models and task set, broken variants of them, and a
recorder of the figures (faults injected, survived, completed trials lost) printed at the end of the session."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import pytest
from reliability_helpers import variant

_FIGURES: dict[str, dict[str, int]] = defaultdict(lambda: {"injected": 0, "survived": 0, "trials_lost": 0})


@pytest.fixture(scope="session")
def huge_model(search_setup) -> Path:
    """Homologous to the others and finite, but one weight is 1e38: every merge that gives it weight overflows to
    inf inside the forward pass and has NaN logits (a checkpoint cannot be refused for a large finite value)."""
    def poison(state):
        state["model.layers.0.mlp.down_proj.weight"][:, :] = 1e38
    return variant(search_setup, "m_huge", poison)


@pytest.fixture(scope="session")
def inf_model(search_setup) -> Path:
    """Homologous to the others, but one tensor holds inf: damaged, refused before the search starts."""
    def poison(state):
        state["model.layers.0.mlp.down_proj.weight"][0, 0] = float("inf")
    return variant(search_setup, "m_inf", poison)


@pytest.fixture
def figures():
    """``figures(scenario, injected=1, survived=1, trials_lost=0)`` adds to the session's reliability figures."""
    def record(scenario: str, injected: int = 1, survived: int = 1, trials_lost: int = 0) -> None:
        row = _FIGURES[scenario]
        row["injected"] += injected
        row["survived"] += survived
        row["trials_lost"] += trials_lost
    return record


def pytest_terminal_summary(terminalreporter):
    if not _FIGURES:
        return
    tr = terminalreporter
    tr.section("reliability figures")
    tr.write_line(f"{'scenario':<44} {'injected':>8} {'survived':>8} {'trials lost':>11}")
    for name, row in _FIGURES.items():
        tr.write_line(f"{name:<44} {row['injected']:>8} {row['survived']:>8} {row['trials_lost']:>11}")
    total = {k: sum(r[k] for r in _FIGURES.values()) for k in ("injected", "survived", "trials_lost")}
    tr.write_line(f"{'total':<44} {total['injected']:>8} {total['survived']:>8} {total['trials_lost']:>11}")
    target = os.environ.get("MERGEOPT_FIGURES_JSON")
    if target:
        Path(target).write_text(json.dumps(dict(_FIGURES), indent=2) + "\n")
