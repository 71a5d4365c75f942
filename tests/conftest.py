"""Shared fixtures; the model builders live in helpers.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import make_family, tiny_family


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory) -> tuple[Path, list[Path]]:
    return make_family(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def search_setup(tmp_path_factory) -> Path:
    """A folder with tiny char-level models (models/m0..m3), a two-task task set (gen + mc) for ``write_space``."""
    root = tmp_path_factory.mktemp("search")
    tiny_family(root / "models", 3)
    (root / "gen.jsonl").write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "target": str(2 * i)}) + "\n"
                                            for i in range(30)))
    (root / "mc.jsonl").write_text("".join(json.dumps({"prompt": f"{i}=", "choices": [str(i), str(i + 1), "x"],
                                                       "answer": i % 3}) + "\n" for i in range(30)))
    (root / "tasks.yaml").write_text("tasks:\n  - {name: gen, path: gen.jsonl, max_new_tokens: 3}\n"
                                     "  - {name: mc, kind: multiple_choice, path: mc.jsonl}\n")
    return root
