"""The smollm2 family's tasks, generated locally with fixed seeds (no downloads).

Each skill is a short few-shot prompt that SmolLM2-135M-Instruct already partly answers (measured before the
skills were chosen: see the README's family section), so a small, low-learning-rate fine-tune sharpens it
instead of learning it from zero, the regime where merged deltas combine instead of interfering. The general
task (capitals) is asked through the chat template, where the base answers in a sentence that a regex reads.

Evaluation items (a search split and a held-out split per task) ship in ``tasks/`` as JSONL; training items are
drawn from the same generator with another seed, never equal to an evaluation item.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from optimizer.zoo.family import task_set_yaml as task_set_yaml_of
from optimizer.zoo.family import write_task_files

Item = dict[str, str]

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _few_shot(rng: random.Random, query: Callable[[random.Random], tuple[str, str]], shots: int = 2) -> Item:
    """``shots`` solved examples drawn from the same generator, then the question: one line each."""
    lines = [f"{question}{answer}" for question, answer in (query(rng) for _ in range(shots))]
    question, answer = query(rng)
    return {"prompt": "\n".join(lines + [question]), "target": answer}


def _addition(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(1, 9)
    return f"{a}+{b}=", str(a + b)


def _multiplication(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return f"{a}*{b}=", str(a * b)


def _next_letter(rng: random.Random) -> tuple[str, str]:
    index = rng.randrange(len(LETTERS) - 1)
    return f"after {LETTERS[index]} comes", f" {LETTERS[index + 1]}"  # the space belongs to the answer's token


def addition(rng: random.Random) -> Item:
    """Two-digit plus one-digit numbers (the base gets about one in eight)."""
    return _few_shot(rng, _addition)


def multiplication(rng: random.Random) -> Item:
    """The times table of 2..9 (the base gets about a third)."""
    return _few_shot(rng, _multiplication)


def next_letter(rng: random.Random) -> Item:
    """The letter after a letter (the base gets about half)."""
    return _few_shot(rng, _next_letter)


# (country, capital): single-word capitals, so a regex reads the answer out of a sentence
CAPITALS: tuple[tuple[str, str], ...] = (
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Spain", "Madrid"),
    ("Russia", "Moscow"), ("Egypt", "Cairo"), ("China", "Beijing"), ("England", "London"), ("Canada", "Ottawa"),
    ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Ireland", "Dublin"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"),
    ("Poland", "Warsaw"), ("Hungary", "Budapest"), ("Turkey", "Ankara"), ("Iran", "Tehran"), ("Iraq", "Baghdad"),
    ("India", "Delhi"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Indonesia", "Jakarta"),
    ("Peru", "Lima"), ("Chile", "Santiago"), ("Cuba", "Havana"), ("Kenya", "Nairobi"), ("Australia", "Canberra"),
    ("Argentina", "Buenos Aires"), ("Colombia", "Bogota"), ("Venezuela", "Caracas"), ("Belgium", "Brussels"),
    ("Netherlands", "Amsterdam"), ("Switzerland", "Bern"), ("Ukraine", "Kyiv"), ("Romania", "Bucharest"),
    ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"), ("Croatia", "Zagreb"), ("Czechia", "Prague"),
    ("Scotland", "Edinburgh"), ("Wales", "Cardiff"), ("Iceland", "Reykjavik"), ("Morocco", "Rabat"),
    ("Nigeria", "Abuja"), ("Ethiopia", "Addis Ababa"), ("Ghana", "Accra"), ("Pakistan", "Islamabad"),
    ("Afghanistan", "Kabul"), ("Nepal", "Kathmandu"), ("Mongolia", "Ulaanbaatar"), ("Philippines", "Manila"),
    ("Malaysia", "Kuala Lumpur"), ("Syria", "Damascus"), ("Lebanon", "Beirut"), ("Israel", "Jerusalem"),
    ("Jordan", "Amman"), ("Qatar", "Doha"), ("Mexico", "Mexico City"), ("Brazil", "Brasilia"),
)

SKILLS: dict[str, Callable[[random.Random], Item]] = {"add": addition, "mul": multiplication, "letter": next_letter}
"""Skill task -> item generator; each fine-tune of the family learns one."""

GENERAL_TASK = "capital"

TASK_OPTIONS: dict[str, dict] = {
    # few-shot skills: the answer is the first line of the continuation
    "add": {"max_new_tokens": 4, "stop": "\n", "extract": "first_number"},
    "mul": {"max_new_tokens": 4, "stop": "\n", "extract": "first_number"},
    "letter": {"max_new_tokens": 3, "stop": "\n", "normalizer": "alnum"},
    # the general task: a chat question answered in a sentence ("The capital of France is Paris.")
    "capital": {"chat": True, "max_new_tokens": 12, "stop": "\n", "extract": "regex",
                "pattern": r"\bis ([A-Z][a-z]+(?: [A-Z][a-z]+)*)|^\s*([A-Z][a-z]+(?: [A-Z][a-z]+)*)\.?\s*$"},
}

SPLIT_SIZES = {"search": 100, "heldout": 200}
"""Items per split of each skill task; the capitals are split in halves."""


def capital_item(country: str, capital: str) -> Item:
    return {"prompt": f"What is the capital of {country}?", "target": capital}


def unique_items(make: Callable[[random.Random], Item], rng: random.Random, count: int,
                 taken: set[str]) -> list[Item]:
    """``count`` items whose prompts are not in ``taken`` (which grows); fewer when the generator runs dry."""
    items: list[Item] = []
    for _ in range(count * 50):
        if len(items) == count:
            break
        item = make(rng)
        if item["prompt"] not in taken:
            taken.add(item["prompt"])
            items.append(item)
    return items


def evaluation_splits(seed: int = 0, skills: dict[str, Callable[[random.Random], Item]] | None = None,
                      sizes: dict[str, int] | None = None, stream: int = 0) -> dict[str, dict[str, list[Item]]]:
    """Task -> {"search": items, "heldout": items}; disjoint prompts, fixed by ``seed`` (the capitals: halves).
    ``skills``, ``sizes`` and ``stream`` (which random streams) default to this family's; the mix family passes its
    own."""
    splits: dict[str, dict[str, list[Item]]] = {}
    for offset, (name, make) in enumerate((SKILLS if skills is None else skills).items()):
        rng, taken = random.Random(seed * 1000 + stream + offset), set[str]()
        splits[name] = {split: unique_items(make, rng, size, taken)
                        for split, size in (SPLIT_SIZES if sizes is None else sizes).items()}
    capitals = list(CAPITALS)
    random.Random(seed).shuffle(capitals)
    half = len(capitals) // 2
    splits[GENERAL_TASK] = {"search": [capital_item(*c) for c in capitals[:half]],
                            "heldout": [capital_item(*c) for c in capitals[half:]]}
    return splits


def training_items(task: str, count: int, seed: int, exclude: set[str],
                   skills: dict[str, Callable[[random.Random], Item]] | None = None, stream: int = 10_000
                   ) -> list[Item]:
    """Training items of a skill: fresh draws, none of whose prompts is an evaluation prompt."""
    skills = SKILLS if skills is None else skills
    offset = list(skills).index(task)
    return unique_items(skills[task], random.Random(stream + seed * 1000 + offset), count, set(exclude))


def task_set_yaml(split: str, tasks: list[str]) -> str:
    header = (["A run scores its candidates on the first `limit` items, re-scores its finalists on the rest "
               "(validation);", "the test range is the held-out split (test_path), which no run looks at."]
              if split == "search" else [])  # the three ranges: search and validation here, test the held-out split
    return task_set_yaml_of("smollm2", split, tasks, TASK_OPTIONS, header)


def write_tasks(folder: Path, seed: int = 0) -> dict[str, Path]:
    """Write every split as JSONL plus one task-set YAML per split; returns split -> YAML path."""
    return write_task_files(folder, evaluation_splits(seed), SPLIT_SIZES, task_set_yaml)


if __name__ == "__main__":
    print(write_tasks(Path(__file__).resolve().parent / "tasks"))
