"""A family of models built into the cache folder (``zoo:FAMILY/NAME``): where it lives, its models, how a reference
resolves, and its task files. The smollm2 and mix families are instances; their builders are in optimizer/builders/.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

_cache_root: Path | None = None  # set once by the CLI from $MERGEOPT_CACHE (library code reads no environment)


def set_cache_root(path: Path | None) -> None:
    """Where ``zoo:FAMILY/NAME`` references and the builders look (None: ``~/.cache/mergeopt``)."""
    global _cache_root
    _cache_root = None if path is None else Path(path)


def default_cache_root() -> Path:
    """Where built families live unless the caller says otherwise."""
    return _cache_root if _cache_root is not None else Path.home() / ".cache" / "mergeopt"


@dataclass(frozen=True)
class Family:
    name: str
    model_names: tuple[str, ...]  # the base first
    tasks_dir: Path

    def folder(self, cache_root: Path | None = None, reduced: bool = False) -> Path:
        root = default_cache_root() if cache_root is None else Path(cache_root)
        return root / (f"{self.name}-reduced" if reduced else self.name)

    def models(self, cache_root: Path | None = None, reduced: bool = False) -> dict[str, Path]:
        """Model name -> transformers folder (built or not), base first."""
        folder = self.folder(cache_root, reduced)
        return {name: folder / name for name in self.model_names}

    def resolve(self, reference: str) -> Path:
        """``FAMILY/NAME`` (or ``FAMILY-reduced/NAME``, the CI variant) -> its folder in the cache."""
        from optimizer.errors import MergeoptError

        family, _, name = reference.partition("/")
        if family not in (self.name, f"{self.name}-reduced") or name not in self.model_names:
            raise MergeoptError(f"zoo:{reference} is not a family model; use zoo:{self.name}/NAME with NAME one of "
                                f"{', '.join(self.model_names)} (or zoo:{self.name}-reduced/NAME)")
        folder = self.models(reduced=family.endswith("-reduced"))[name]
        if not (folder / "config.json").is_file():
            flag = " --reduced" if family.endswith("-reduced") else ""
            raise MergeoptError(f"zoo:{reference} is not built yet ({folder}); run 'mergeopt zoo --family "
                                f"{self.name} --build{flag}'")
        return folder

    def task_set_path(self, split: str = "search") -> Path:
        """The task-set YAML of a split: ``search`` (the search and validation ranges; test = the held-out split)
        or ``heldout``."""
        return self.tasks_dir / f"{split}.yaml"


def task_set_yaml(family: str, split: str, tasks: list[str], options: dict[str, dict], header: Iterable[str] = ()
                  ) -> str:
    """One split's task-set YAML: a generation task per skill, reading ``NAME-SPLIT.jsonl``; the search split names
    the held-out file as its test range."""
    lines = [f"# The {family} family's {split} split (written by optimizer.zoo.{family}.data.write_tasks).",
             *(f"# {line}" for line in header), "tasks:"]
    for name in tasks:
        entry = {"name": name, "path": f"{name}-{split}.jsonl", "kind": "generate", **options[name]}
        if split == "search":
            entry["test_path"] = f"{name}-heldout.jsonl"
        lines.append("  - " + json.dumps(entry))
    return "\n".join(lines) + "\n"


def write_task_files(folder: Path, splits: dict[str, dict[str, list[dict]]], split_names: Iterable[str],
                     yaml_of: Callable[[str, list[str]], str]) -> dict[str, Path]:
    """Every task's splits as JSONL (ids ``NAME-SPLIT-NNNN``) plus one task-set YAML per split; split -> YAML path."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, by_split in splits.items():
        for split, items in by_split.items():
            with (folder / f"{name}-{split}.jsonl").open("w") as handle:
                for number, item in enumerate(items):
                    handle.write(json.dumps({"id": f"{name}-{split}-{number:04d}", **item}) + "\n")
    paths = {}
    for split in split_names:
        paths[split] = folder / f"{split}.yaml"
        paths[split].write_text(yaml_of(split, list(splits)))
    return paths
