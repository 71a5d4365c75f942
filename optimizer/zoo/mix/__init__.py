"""The mix family: SmolLM2-135M-Instruct and five fine-tunes as users have them (the case searching should pay).

Unlike the smollm2 family (three alike, small deltas on disjoint skills), these fine-tunes differ: learning rates
and lengths of training make deltas of very different size (the largest over 50x the smallest, by learning rate
x steps), one of them (``alphabet``) overshoots, and two pairs of skills share a prompt format with a different
rule (``adder``/``subtractor``, ``alphabet``/``retreater``) beside the disjoint ``multiplier`` and the general
task. One shared weight cannot suit them all. Built by ``optimizer.builders.mix`` (``mergeopt zoo --family mix
--build``) into the cache folder; the tasks ship here, in ``tasks/``.
"""

from __future__ import annotations

from pathlib import Path

from optimizer.zoo.family import Family

FAMILY = "mix"

SPECIALIST_TASK: dict[str, str] = {"adder": "add", "subtractor": "sub", "multiplier": "mul", "alphabet": "letter",
                                   "retreater": "prev"}
"""Each fine-tune and the skill task it is trained on."""

MODEL_NAMES: tuple[str, ...] = ("base", *SPECIALIST_TASK)

TASKS_DIR: Path = Path(__file__).resolve().parent / "tasks"


MIX = Family(FAMILY, MODEL_NAMES, TASKS_DIR)
family_dir, family_models, resolve, task_set_path = MIX.folder, MIX.models, MIX.resolve, MIX.task_set_path


__all__ = ["FAMILY", "MIX", "MODEL_NAMES", "SPECIALIST_TASK", "TASKS_DIR", "family_dir", "family_models", "resolve",
           "task_set_path"]
