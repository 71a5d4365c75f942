"""The embedded zoo: tiny homologous char-level Llama models and the held-out tasks they are scored on.

``base`` is pretrained on copying plus easy addition, reversal and sorting; ``adder``, ``reverser`` and
``sorter`` are fine-tuned from it on the mid-difficulty version of one skill each. Everything here is rebuilt by
``optimizer.builders.tiny.rebuild`` (``python -m optimizer.builders.tiny``).
"""

from __future__ import annotations

from pathlib import Path

ZOO_DIR: Path = Path(__file__).resolve().parent
"""The package's zoo folder: ``models/<name>/`` (transformers folders) and ``tasks/`` (JSONL + zoo.yaml)."""

SPECIALIST_TASK: dict[str, str] = {"adder": "add", "reverser": "reverse", "sorter": "sort"}
"""Each specialist and the task it was fine-tuned for."""

MODEL_NAMES: tuple[str, ...] = ("base", *SPECIALIST_TASK)

TASK_NAMES: tuple[str, ...] = ("add", "reverse", "sort")

TASK_MAX_NEW_TOKENS: dict[str, int] = {"add": 7, "reverse": 10, "sort": 10}
"""Room for the longest target plus EOS (targets: at most 5 digits, at most 8 letters)."""


def zoo_models(root: Path | None = None) -> dict[str, Path]:
    """Model name -> transformers folder, base first then the specialists."""
    root = ZOO_DIR if root is None else Path(root)
    return {name: root / "models" / name for name in MODEL_NAMES}


def zoo_tasks(root: Path | None = None) -> dict[str, Path]:
    """Task name -> held-out JSONL file (``{"id", "prompt", "target"}`` per line)."""
    root = ZOO_DIR if root is None else Path(root)
    return {name: root / "tasks" / f"{name}.jsonl" for name in TASK_NAMES}


def zoo_task_spec(root: Path | None = None) -> Path:
    """The ``zoo.yaml`` that describes the task set (name, path, kind, metric, max_new_tokens)."""
    root = ZOO_DIR if root is None else Path(root)
    return root / "tasks" / "zoo.yaml"


__all__ = [
    "MODEL_NAMES",
    "SPECIALIST_TASK",
    "TASK_MAX_NEW_TOKENS",
    "TASK_NAMES",
    "ZOO_DIR",
    "zoo_models",
    "zoo_task_spec",
    "zoo_tasks",
]
