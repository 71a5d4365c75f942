"""The merge methods: one generic delta-merge routine configured into named methods.

Every method computes ``out = base_coef * base + lambda * mix(deltas)``; they differ only in how each delta is
sparsified (none / DARE random drop / TIES magnitude trim), whether a sign consensus is elected (TIES), and
whether the mix is divided by the weight sum. Defaults follow mergekit 0.1.5 so a recipe means the same thing
to both tools.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from optimizer.errors import MergeoptError
from optimizer.merge import sparsify
from optimizer.recipe import Recipe, resolve_parameter


@dataclass(frozen=True)
class MethodSpec:
    name: str
    sparsification: str | None  # None | "random" (DARE) | "magnitude" (TIES trim)
    consensus: bool
    default_normalize: bool
    whole_weights: bool = False  # linear: merge full weights, not deltas against a base


METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in (
        MethodSpec("linear", None, False, default_normalize=True, whole_weights=True),
        MethodSpec("task_arithmetic", None, False, default_normalize=False),
        MethodSpec("ties", "magnitude", True, default_normalize=True),
        MethodSpec("dare_linear", "random", False, default_normalize=False),
        MethodSpec("dare_ties", "random", True, default_normalize=False),
    )
}


@dataclass(frozen=True)
class TensorSlot:
    """What the engine knows about one tensor: its name, relative depth and, per model, its delta."""

    name: str
    t: float  # relative depth in [0, 1]; 0 outside the layer stack (mergekit's convention)


def tensor_plan(recipe: Recipe, slot: TensorSlot, model_positions: list[int], delta_rows=None,
                l1_norms=None) -> sparsify.TensorPlan:
    """Resolve a recipe into the kernel's per-model arrays for one tensor.

    ``model_positions`` are the recipe positions of the models the engine holds, in the engine's row order;
    ``delta_rows(m)`` returns the float32 delta of row ``m`` (made on demand: TIES magnitude cuts) and
    ``l1_norms(m, threshold, key)`` the (dense, kept) L1 norms of that delta under a DARE mask (L1 rescale).
    """
    spec = METHODS[recipe.merge_method]
    n = len(model_positions)
    weights = np.zeros(n, dtype=np.float32)
    scales = np.ones(n, dtype=np.float32)
    modes = np.full(n, sparsify.KEEP_ALL, dtype=np.int32)
    thresholds = np.zeros(n, dtype=np.int64)
    magnitudes = np.zeros(n, dtype=np.float32)
    keys = np.zeros(n, dtype=np.uint64)
    tie_limits = np.zeros(n, dtype=np.int64)
    glob = recipe.parameters
    for row, pos in enumerate(model_positions):
        scopes = [recipe.models[pos].parameters, glob]
        weight = resolve_parameter("weight", scopes, slot.name, slot.t)
        if weight is None:
            raise MergeoptError(f"model {recipe.models[pos].model} has no 'weight' for tensor {slot.name}; "
                                "give it a weight in its parameters or in the recipe's parameters")
        weights[row] = float(weight)
        if spec.sparsification is None:
            continue
        density = float(resolve_parameter("density", scopes, slot.name, slot.t, default=1.0))
        if not 0.0 <= density <= 1.0:
            raise MergeoptError(f"density of {recipe.models[pos].model} for {slot.name} is {density}; it must be within [0, 1]")
        if spec.sparsification == "magnitude":
            if density < 1.0:
                modes[row] = sparsify.KEEP_MAGNITUDE
                magnitudes[row], tie_limits[row] = sparsify.magnitude_cut(delta_rows(row).abs(), density)
            continue
        # DARE
        if density >= 1.0:
            continue
        threshold = sparsify.drop_threshold(1.0 - density)
        key = sparsify.mask_key(recipe.seed, pos, slot.name)
        modes[row] = sparsify.KEEP_RANDOM if threshold < sparsify.RANK_LEVELS else sparsify.KEEP_NONE
        thresholds[row] = threshold
        keys[row] = np.uint64(key)
        if recipe.rescale == "dare":
            scales[row] = sparsify.dare_scale(threshold)
        elif recipe.rescale == "l1" and threshold < sparsify.RANK_LEVELS:
            before, after = l1_norms(row, threshold, key)
            if before >= 1e-7 and after >= 1e-7:
                scales[row] = before / after
    normalize = bool(resolve_parameter("normalize", [glob], slot.name, slot.t, default=spec.default_normalize))
    lam = float(resolve_parameter("lambda", [glob], slot.name, slot.t, default=1.0))
    base_coef = 1.0
    if spec.whole_weights and not normalize:
        # sum_m w_m * (base + delta_m) = (sum_m w_m) * base + sum_m w_m * delta_m
        base_coef = float(weights.sum())
    return sparsify.TensorPlan(weights=weights, scales=scales, keep_mode=modes, thresholds=thresholds,
                               magnitudes=magnitudes, keys=keys, tie_limits=tie_limits, consensus=spec.consensus, normalize=normalize,
                               lam=lam, base_coef=base_coef)
