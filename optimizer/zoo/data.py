"""Deterministic task generators for the zoo: copying plus three skills (add, reverse, sort).

Every generator takes an explicit integer seed and draws from its own ``random.Random`` so the same seed gives
the same items in every process (no use of ``hash()``, which Python randomises per process).

Each skill has two difficulty levels. The base model is pretrained on copying plus the *easy* level of every
skill; each specialist is fine-tuned on the *mid* level of one skill (plus a replay share of the pretraining
mixture, see :func:`specialist_mixture`); the held-out evaluation sets are drawn from the *mid* level and every training stream skips their prompts, so evaluation items are never trained on.

Prompt formats (the target is the exact completion, without EOS):
    add:123+4567=   -> 4690
    rev:hello=      -> olleh
    sort:hello=     -> ehllo
    copy:hello=     -> hello
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

SKILLS: tuple[str, ...] = ("add", "reverse", "sort")
"""The three skills that have a specialist and a held-out evaluation set."""

LEVELS: tuple[str, ...] = ("easy", "mid")

EVAL_SEED = 20240611
"""Seed of the shipped held-out evaluation split (independent of the training seed)."""

EVAL_SIZE = 200
"""Items per skill that every training stream excludes by construction (the first items of each eval set)."""

SHIPPED_EVAL_SIZE = 400
"""Items per skill in the shipped task files: the ``EVAL_SIZE`` excluded ones, then items checked against a replay of
the actual training streams (see ``optimizer.builders.tiny.trained_prompts``), so a search can select on one half
and report the other."""

LETTERS = string.ascii_lowercase


@dataclass(frozen=True)
class Level:
    """Size range of one difficulty level: operand digits for add, string length for the others."""

    min_len: int
    max_len: int


# Ranges overlap on purpose: the base sees the short end of the mid range during pretraining, so it partly has
# each mid skill already, which keeps the specialists' deltas small and mergeable. Measured: when the mid level
# needs something the base never saw at all (e.g. 5-digit operands after 1-3 digit pretraining) the specialist
# still learns it, but that gain does not survive task arithmetic.
DIFFICULTY: dict[str, dict[str, Level]] = {
    "add": {"easy": Level(1, 4), "mid": Level(3, 4)},
    "reverse": {"easy": Level(2, 6), "mid": Level(4, 8)},
    "sort": {"easy": Level(2, 6), "mid": Level(4, 8)},
    "copy": {"easy": Level(2, 10), "mid": Level(2, 10)},
}

PROMPT_PREFIX = {"add": "add:", "reverse": "rev:", "sort": "sort:", "copy": "copy:"}

def _number(rng: random.Random, digits: int) -> int:
    if digits == 1:
        return rng.randrange(0, 10)
    return rng.randrange(10 ** (digits - 1), 10**digits)


def make_item(skill: str, level: str, rng: random.Random) -> tuple[str, str]:
    """One (prompt, target) pair of ``skill`` at ``level``, drawn from ``rng``."""
    size = DIFFICULTY[skill][level]
    prefix = PROMPT_PREFIX[skill]
    if skill == "add":
        a = _number(rng, rng.randint(size.min_len, size.max_len))
        b = _number(rng, rng.randint(size.min_len, size.max_len))
        return f"{prefix}{a}+{b}=", str(a + b)
    text = "".join(rng.choice(LETTERS) for _ in range(rng.randint(size.min_len, size.max_len)))
    if skill == "reverse":
        return f"{prefix}{text}=", text[::-1]
    if skill == "sort":
        return f"{prefix}{text}=", "".join(sorted(text))
    if skill == "copy":
        return f"{prefix}{text}=", text
    raise ValueError(f"unknown skill {skill!r}; expected one of {SKILLS + ('copy',)}")


def eval_items(skill: str, n: int = EVAL_SIZE, seed: int = EVAL_SEED,
               skip: frozenset[str] = frozenset()) -> list[dict[str, str]]:
    """The held-out evaluation set of ``skill``: ``n`` distinct mid-level items, ``{"id", "prompt", "target"}``.

    Prompts in ``skip`` (those a training run drew) are passed over; the first ``EVAL_SIZE`` items never are, as
    training excludes them, so a longer set always starts with the shorter one.
    """
    rng = random.Random(seed * 101 + SKILLS.index(skill))
    seen: set[str] = set()
    items: list[dict[str, str]] = []
    while len(items) < n:
        prompt, target = make_item(skill, "mid", rng)
        if prompt in seen or prompt in skip:
            continue
        seen.add(prompt)
        items.append({"id": f"{skill}-{len(items):04d}", "prompt": prompt, "target": target})
    return items


def heldout_prompts(n: int = EVAL_SIZE, seed: int = EVAL_SEED) -> frozenset[str]:
    """Every prompt of every held-out set; training streams never yield one of these."""
    return frozenset(item["prompt"] for skill in SKILLS for item in eval_items(skill, n, seed))


def training_stream(
    mixture: dict[tuple[str, str], float],
    seed: int,
    exclude: Iterable[str] = (),
) -> Iterator[tuple[str, str]]:
    """Endless (prompt, target) pairs; each draws its (skill, level) with the weights of ``mixture``.

    Prompts in ``exclude`` (normally :func:`heldout_prompts`) are skipped, so the held-out split stays unseen.
    """
    excluded = frozenset(exclude)
    keys = sorted(mixture)
    weights = [mixture[key] for key in keys]
    rng = random.Random(seed)
    while True:
        skill, level = rng.choices(keys, weights)[0]
        prompt, target = make_item(skill, level, rng)
        if prompt not in excluded:
            yield prompt, target


PRETRAIN_MIXTURE: dict[tuple[str, str], float] = {
    ("copy", "easy"): 1.0,
    ("add", "easy"): 1.0,
    ("reverse", "easy"): 1.0,
    ("sort", "easy"): 1.0,
}
"""What the base model learns: copying and the easy level of every skill."""


def specialist_mixture(skill: str, replay: float = 0.0) -> dict[tuple[str, str], float]:
    """What a specialist is fine-tuned on: the mid level of its one skill, plus a ``replay`` share of the
    pretraining mixture.

    Replay is the only new-skill-free part: it keeps the specialist's behaviour on the *other* prompts where the
    base had it, so its delta changes what its own skill needs and little else. Such deltas add up under task
    arithmetic; without replay each specialist rewrites every prompt into its own skill and the deltas collide.
    """
    if not 0.0 <= replay < 1.0:
        raise ValueError(f"replay must be in [0, 1), got {replay}")
    mixture = {key: replay * weight / sum(PRETRAIN_MIXTURE.values()) for key, weight in PRETRAIN_MIXTURE.items()}
    mixture = {key: weight for key, weight in mixture.items() if weight > 0}
    mixture[(skill, "mid")] = 1.0 - replay
    return mixture
