"""The mix family's tasks: five skills in SmolLM2's few-shot form (two pairs share a prompt format and differ in
the rule) and the general task, generated locally with fixed seeds.

``add`` (two-digit + one-digit) and ``sub`` (two-digit - one-digit) read alike and differ in the rule, as do
``letter`` (the letter after a letter) and ``prev`` (the letter before one); ``mul`` (the times table) is
disjoint from both pairs; ``capital`` (through the chat template) measures the general ability a fine-tune may
lose. Evaluation items (a search split and a held-out split per task) ship in ``tasks/``; training items come
from the same generators with other seeds and never equal an evaluation prompt.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from optimizer.zoo.family import task_set_yaml as task_set_yaml_of
from optimizer.zoo.family import write_task_files

from optimizer.zoo.smollm2 import data as smollm2_data
from optimizer.zoo.smollm2.data import (GENERAL_TASK, LETTERS, TASK_OPTIONS, Item, _addition, _few_shot,
                                        _multiplication, _next_letter)


def _subtraction(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(1, 9)
    return f"{a}-{b}=", str(a - b)


def _previous_letter(rng: random.Random) -> tuple[str, str]:
    index = rng.randrange(1, len(LETTERS))
    return f"before {LETTERS[index]} comes", f" {LETTERS[index - 1]}"


SKILLS: dict[str, Callable[[random.Random], Item]] = {
    "add": lambda rng: _few_shot(rng, _addition),
    "sub": lambda rng: _few_shot(rng, _subtraction),
    "mul": lambda rng: _few_shot(rng, _multiplication),
    "letter": lambda rng: _few_shot(rng, _next_letter),
    "prev": lambda rng: _few_shot(rng, _previous_letter),
}
"""Skill task -> item generator (one fine-tune each)."""

OVERLAPPING = (("add", "sub"), ("letter", "prev"))
"""Pairs of skills with the same prompt format and a different rule."""

OPTIONS: dict[str, dict] = {**{k: TASK_OPTIONS[k] for k in ("add", "mul", "letter", GENERAL_TASK)},
                            "sub": TASK_OPTIONS["add"], "prev": TASK_OPTIONS["letter"]}

SPLIT_SIZES = {"search": 100, "heldout": 200}


def evaluation_splits(seed: int = 0) -> dict[str, dict[str, list[Item]]]:
    """Task -> {"search": items, "heldout": items}; disjoint prompts, fixed by ``seed``, on random streams of their
    own (so no prompt is drawn as the smollm2 family draws it)."""
    return smollm2_data.evaluation_splits(seed, SKILLS, SPLIT_SIZES, stream=500)


def training_items(task: str, count: int, seed: int, exclude: set[str]) -> list[Item]:
    """Training items of a skill: fresh draws, none of whose prompts is an evaluation prompt."""
    return smollm2_data.training_items(task, count, seed, exclude, SKILLS, stream=20_000)


def task_set_yaml(split: str, tasks: list[str]) -> str:
    header = (["Search and validation are cut from this split; the test range is the held-out split."]
              if split == "search" else [])
    return task_set_yaml_of("mix", split, tasks, OPTIONS, header)


def write_tasks(folder: Path, seed: int = 0) -> dict[str, Path]:
    """Write every split as JSONL plus one task-set YAML per split; returns split -> YAML path."""
    return write_task_files(folder, evaluation_splits(seed), SPLIT_SIZES, task_set_yaml)


if __name__ == "__main__":
    print(write_tasks(Path(__file__).resolve().parent / "tasks"))
