"""Shared fixtures; the model builders live in helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import make_family


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory) -> tuple[Path, list[Path]]:
    return make_family(tmp_path_factory.mktemp("llama"), "llama")
