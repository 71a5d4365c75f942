"""mergeopt: evolutionary search of DARE merge recipes for homologous language models."""

from optimizer.errors import MergeoptError
from optimizer.recipe import ModelSpec, Recipe

__all__ = ["MergeoptError", "ModelSpec", "Recipe", "Run", "load_run"]
__version__ = "0.1.0"
_LAZY = {"load_run": "optimizer.run", "Run": "optimizer.run"}  # pandas/optuna load only when asked for


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'optimizer' has no attribute {name!r}")
