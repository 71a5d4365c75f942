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

from optimizer.zoo.smollm2 import default_cache_root

FAMILY = "mix"

SPECIALIST_TASK: dict[str, str] = {"adder": "add", "subtractor": "sub", "multiplier": "mul", "alphabet": "letter",
                                   "retreater": "prev"}
"""Each fine-tune and the skill task it is trained on."""

MODEL_NAMES: tuple[str, ...] = ("base", *SPECIALIST_TASK)

TASKS_DIR: Path = Path(__file__).resolve().parent / "tasks"


def family_dir(cache_root: Path | None = None, reduced: bool = False) -> Path:
    root = default_cache_root() if cache_root is None else Path(cache_root)
    return root / (f"{FAMILY}-reduced" if reduced else FAMILY)


def family_models(cache_root: Path | None = None, reduced: bool = False) -> dict[str, Path]:
    """Model name -> transformers folder (built or not), base first."""
    folder = family_dir(cache_root, reduced)
    return {name: folder / name for name in MODEL_NAMES}


def resolve(reference: str) -> Path:
    """``mix/NAME`` (or ``mix-reduced/NAME``) -> its folder in the cache."""
    from optimizer.errors import MergeoptError

    family, _, name = reference.partition("/")
    if family not in (FAMILY, f"{FAMILY}-reduced") or name not in MODEL_NAMES:
        raise MergeoptError(f"zoo:{reference} is not a family model; use zoo:{FAMILY}/NAME with NAME one of "
                            f"{', '.join(MODEL_NAMES)} (or zoo:{FAMILY}-reduced/NAME)")
    folder = family_models(reduced=family.endswith("-reduced"))[name]
    if not (folder / "config.json").is_file():
        flag = " --reduced" if family.endswith("-reduced") else ""
        raise MergeoptError(f"zoo:{reference} is not built yet ({folder}); run 'mergeopt zoo --family {FAMILY} "
                            f"--build{flag}'")
    return folder


def task_set_path(split: str = "search") -> Path:
    """The task-set YAML of a split: ``search`` (search and validation ranges; test = held-out) or ``heldout``."""
    return TASKS_DIR / f"{split}.yaml"


__all__ = ["FAMILY", "MODEL_NAMES", "SPECIALIST_TASK", "TASKS_DIR", "family_dir", "family_models", "resolve",
           "task_set_path"]
