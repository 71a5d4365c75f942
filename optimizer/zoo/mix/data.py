"""The mix family's tasks: five skills in SmolLM2's few-shot form (two pairs share a prompt format and differ in
the rule) and the general task, generated locally with fixed seeds.

``add`` (two-digit + one-digit) and ``sub`` (two-digit - one-digit) read alike and differ in the rule, as do
``letter`` (the letter after a letter) and ``prev`` (the letter before one); ``mul`` (the times table) is
disjoint from both pairs; ``capital`` (through the chat template) measures the general ability a fine-tune may
lose. Evaluation items (a search split and a held-out split per task) ship in ``tasks/``; training items come
from the same generators with other seeds and never equal an evaluation prompt.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

from optimizer.zoo.smollm2.data import (CAPITALS, GENERAL_TASK, LETTERS, TASK_OPTIONS, Item, _addition, _few_shot,
                                        _multiplication, _next_letter, capital_item, unique_items)


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
    """Task -> {"search": items, "heldout": items}; disjoint prompts, fixed by ``seed`` (the capitals: halves)."""
    splits: dict[str, dict[str, list[Item]]] = {}
    for offset, (name, make) in enumerate(SKILLS.items()):
        rng, taken = random.Random(seed * 1000 + 500 + offset), set[str]()
        splits[name] = {split: unique_items(make, rng, size, taken) for split, size in SPLIT_SIZES.items()}
    capitals = list(CAPITALS)
    random.Random(seed).shuffle(capitals)
    half = len(capitals) // 2
    splits[GENERAL_TASK] = {"search": [capital_item(*c) for c in capitals[:half]],
                            "heldout": [capital_item(*c) for c in capitals[half:]]}
    return splits


def training_items(task: str, count: int, seed: int, exclude: set[str]) -> list[Item]:
    """Training items of a skill: fresh draws, none of whose prompts is an evaluation prompt."""
    offset = list(SKILLS).index(task)
    return unique_items(SKILLS[task], random.Random(20_000 + seed * 1000 + offset), count, set(exclude))


def task_set_yaml(split: str, tasks: list[str]) -> str:
    lines = [f"# The mix family's {split} split (written by optimizer.zoo.mix.data.write_tasks)."]
    if split == "search":
        lines.append("# Search and validation are cut from this split; the test range is the held-out split.")
    lines.append("tasks:")
    for name in tasks:
        entry = {"name": name, "path": f"{name}-{split}.jsonl", "kind": "generate", **OPTIONS[name]}
        if split == "search":
            entry["test_path"] = f"{name}-heldout.jsonl"
        lines.append("  - " + json.dumps(entry))
    return "\n".join(lines) + "\n"


def write_tasks(folder: Path, seed: int = 0) -> dict[str, Path]:
    """Write every split as JSONL plus one task-set YAML per split; returns split -> YAML path."""
    folder.mkdir(parents=True, exist_ok=True)
    splits = evaluation_splits(seed)
    for name, by_split in splits.items():
        for split, items in by_split.items():
            with (folder / f"{name}-{split}.jsonl").open("w") as handle:
                for number, item in enumerate(items):
                    handle.write(json.dumps({"id": f"{name}-{split}-{number:04d}", **item}) + "\n")
    paths = {}
    for split in SPLIT_SIZES:
        paths[split] = folder / f"{split}.yaml"
        paths[split].write_text(task_set_yaml(split, list(splits)))
    return paths


if __name__ == "__main__":
    print(write_tasks(Path(__file__).resolve().parent / "tasks"))
