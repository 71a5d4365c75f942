"""Build the mix family: the SmolLM2 base and five fine-tunes that differ the way users' fine-tunes do.

Each fine-tune has its own learning rate and length (:data:`FULL`): the deltas differ in size by far more than 5x
(learning rate x steps spans 2e-4 .. 1.2e-2), ``alphabet`` is trained hard enough to overshoot (it forgets more of
the general task), and ``adder``/``subtractor`` and ``alphabet``/``retreater`` learn rules on the same prompt
format. The training loop, replay and resumable folders are the smollm2 builder's (optimizer/builders/smollm2.py);
the base is converted the same way. Resumable: a model already built with the same settings is skipped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

from optimizer.builders.smollm2 import BuildSettings, _built, fine_tune, prepare_base
from optimizer.zoo.mix import MODEL_NAMES, SPECIALIST_TASK, family_dir
from optimizer.zoo.mix.data import evaluation_splits, training_items

_COMMON = BuildSettings(steps=10, batch_size=8, learning_rate=2e-5)
FULL: dict[str, BuildSettings] = {
    "adder": replace(_COMMON, steps=10, learning_rate=2e-5),       # light: the smollm2 family's setting
    "subtractor": replace(_COMMON, steps=20, learning_rate=5e-5),  # the same format as adder, another rule
    "multiplier": replace(_COMMON, steps=30, learning_rate=1e-4),  # disjoint, a large delta
    "alphabet": replace(_COMMON, steps=40, learning_rate=3e-4),    # overshoots: the largest delta by far
    "retreater": replace(_COMMON, steps=15, learning_rate=3e-5),   # the same format as alphabet, another rule
}
"""Per fine-tune: steps and learning rate (115 steps of batch 8 in all; about 3 s a step on 2 free cores)."""

REDUCED: dict[str, BuildSettings] = {
    name: replace(s, steps=2, batch_size=4, replay_per_batch=1, replay_prompts=4, replay_tokens=8)
    for name, s in FULL.items()}
"""The CI family: the same code, data and learning rates, two steps each."""


def _log(message: str, progress: bool) -> None:
    if progress:
        logging.getLogger("mergeopt").info("[mix] %s", message)


def delta_scale(settings: BuildSettings) -> float:
    """Learning rate x steps: the fine-tune's delta size, to first order."""
    return settings.learning_rate * settings.steps


def build_family(cache_root: Path | None = None, reduced: bool = False, progress: bool = True) -> dict[str, Path]:
    """Build (or finish building) the family; returns model name -> folder, base first."""
    plan = REDUCED if reduced else FULL
    root = family_dir(cache_root, reduced)
    start = time.perf_counter()
    base_dir, replay, exclude = prepare_base(root, next(iter(plan.values())), evaluation_splits(), progress, _log)
    for number, (name, task) in enumerate(SPECIALIST_TASK.items(), 1):
        settings, folder = plan[name], root / name
        if _built(folder, {"task": task, **asdict(settings)}):
            _log(f"[{number}/{len(SPECIALIST_TASK)}] {name}: already built, skipped", progress)
            continue
        _log(f"[{number}/{len(SPECIALIST_TASK)}] {name}: {settings.steps} steps on {task} "
             f"(batch {settings.batch_size}, lr {settings.learning_rate:g})", progress)
        skill_rows = settings.batch_size - settings.replay_per_batch
        items = training_items(task, settings.steps * skill_rows, settings.seed, exclude)
        fine_tune(base_dir, folder, task, settings, replay, exclude, progress, items=items)
    _log(f"family ready in {root} ({time.perf_counter() - start:.0f}s)", progress)
    return {name: root / name for name in MODEL_NAMES}
