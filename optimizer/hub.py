"""Hugging Face hub ids in recipes: ``org/name`` and ``org/name@revision``, resolved from the local cache.

Offline first: a reference is looked up in the local Hugging Face cache (``huggingface_hub.snapshot_download`` with
``local_files_only=True``), never fetched while a recipe is read. A model that is not cached is one line saying how
to download it. The cache folder is huggingface_hub's own (``HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``),
or ``cache_dir`` when given.
"""

from __future__ import annotations

import re
from pathlib import Path

from optimizer.errors import MergeoptError

# org/name, optionally @revision (a branch, tag or commit); the hub's own character set.
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)"
                     r"(?:@(?P<revision>[A-Za-z0-9._/-]+))?$")


def looks_like_hub_id(reference: str) -> bool:
    """``org/name`` or ``org/name@revision`` (a relative path such as ``./a/b`` or ``a/b/c`` is not one)."""
    return bool(_HUB_ID.match(reference)) and not reference.startswith((".", "~"))


def split_reference(reference: str) -> tuple[str, str | None]:
    """``org/name@rev`` -> (``org/name``, ``rev``); no revision -> None (the cache's ``main``)."""
    match = _HUB_ID.match(reference)
    if match is None:
        raise MergeoptError(f"{reference!r} is not a Hugging Face id (org/name or org/name@revision)")
    return match.group("repo"), match.group("revision")


def resolve(reference: str, cache_dir: str | Path | None = None) -> str:
    """The local snapshot folder of a cached hub model, or one line saying it is neither a folder nor cached."""
    repo, revision = split_reference(reference)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        raise MergeoptError(f"{reference} is not a folder, and huggingface_hub is not installed to look it up "
                            "in the Hugging Face cache") from None
    try:
        folder = snapshot_download(repo, revision=revision, cache_dir=None if cache_dir is None else str(cache_dir),
                                   local_files_only=True)
    except Exception:  # huggingface_hub raises several types (not cached, bad revision, offline)
        at = f" at revision {revision}" if revision else ""
        fetch = f"huggingface-cli download {repo}" + (f" --revision {revision}" if revision else "")
        raise MergeoptError(f"{reference} is not a folder and not in the local Hugging Face cache{at}; "
                            f"download it first ({fetch}) or give a model folder") from None
    if not (Path(folder) / "config.json").is_file():
        raise MergeoptError(f"{reference}: the cached snapshot {folder} has no config.json; "
                            "download the whole model (huggingface-cli download " + repo + ")")
    return str(folder)
