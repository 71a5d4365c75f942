"""Fixtures of the report tests: the search tests' tiny models and task set, and a finished tiny run."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import write_space


@pytest.fixture(scope="session")
def report_run(search_setup, tmp_path_factory) -> Path:
    """A finished and exported 10-trial multi-objective run (enough trials for parameter importance)."""
    from optimizer.export import export_run
    from optimizer.search.loop import run_search
    from optimizer.space import load_space

    path = write_space(search_setup, "report", optimizer={"name": "random"}, budget={"trials": 10},
                       granularity={"layer_groups": 2}, limit=6, baselines="default", validation={"finalists": 3})
    run_dir = tmp_path_factory.mktemp("report") / "run"
    run_search(load_space(path), run_dir, progress=False)
    export_run(run_dir)
    return run_dir


@pytest.fixture(scope="session")
def low_fidelity_run(search_setup, tmp_path_factory) -> Path:
    """A 5-trial run that screens candidates on 4 items first: some trials stop at low fidelity."""
    from optimizer.search.loop import run_search
    from optimizer.space import load_space

    path = write_space(search_setup, "report-low", budget={"trials": 5}, limit=6,
                       fidelity={"low": 3, "promote": 0.3})
    run_dir = tmp_path_factory.mktemp("report-low") / "run"
    run_search(load_space(path), run_dir, progress=False)
    return run_dir
