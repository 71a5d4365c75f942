"""mergeopt: evolutionary search of DARE merge recipes for homologous language models."""

from optimizer.errors import MergeoptError
from optimizer.recipe import ModelSpec, Recipe

__all__ = ["MergeoptError", "ModelSpec", "Recipe"]
__version__ = "0.1.0"
