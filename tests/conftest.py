"""Shared fixtures; the model builders live in helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import make_family, write_search_setup


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory) -> tuple[Path, list[Path]]:
    return make_family(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def search_setup(tmp_path_factory) -> Path:
    """A folder with tiny char-level models (models/m0..m3), a two-task task set (gen + mc) for ``write_space``."""
    return write_search_setup(tmp_path_factory.mktemp("search"))
