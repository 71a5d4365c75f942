"""Shared fixtures; the model builders live in helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import make_family, write_search_setup

# Tiers allowed to read built families from the model cache (~/.cache/mergeopt or $MERGEOPT_CACHE).
FAMILY_TIERS = ("smollm2", "vllm")


@pytest.fixture(autouse=True)
def empty_model_cache(request, tmp_path_factory, monkeypatch):
    """Every test outside the family tiers sees an empty model cache, as on a fresh machine: a fast test that
    needs a built family fails here too, not only on a new CI machine (issue 19: the README's test command must
    pass with nothing in ~/.cache/mergeopt). Subprocesses inherit it through MERGEOPT_CACHE."""
    if any(request.node.get_closest_marker(tier) for tier in FAMILY_TIERS):
        yield None
        return
    from optimizer.zoo import smollm2

    empty = tmp_path_factory.getbasetemp() / "empty-model-cache"
    empty.mkdir(exist_ok=True)
    monkeypatch.setenv("MERGEOPT_CACHE", str(empty))
    smollm2.set_cache_root(empty)
    try:
        yield empty
    finally:
        smollm2.set_cache_root(None)


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory) -> tuple[Path, list[Path]]:
    return make_family(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def search_setup(tmp_path_factory) -> Path:
    """A folder with tiny char-level models (models/m0..m3), a two-task task set (gen + mc) for ``write_space``."""
    return write_search_setup(tmp_path_factory.mktemp("search"))
