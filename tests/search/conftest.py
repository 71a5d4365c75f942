import json
from pathlib import Path

import pytest
from helpers import tiny_family


@pytest.fixture(scope="session")
def search_setup(tmp_path_factory) -> Path:
    """A folder with tiny char-level models, a two-task task set and a space file writer."""
    root = tmp_path_factory.mktemp("search")
    tiny_family(root / "models", 3)
    (root / "gen.jsonl").write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "target": str(2 * i)}) + "\n"
                                            for i in range(30)))
    (root / "mc.jsonl").write_text("".join(json.dumps({"prompt": f"{i}=", "choices": [str(i), str(i + 1), "x"],
                                                       "answer": i % 3}) + "\n" for i in range(30)))
    (root / "tasks.yaml").write_text("tasks:\n  - {name: gen, path: gen.jsonl, max_new_tokens: 3}\n"
                                     "  - {name: mc, kind: multiple_choice, path: mc.jsonl}\n")
    return root


