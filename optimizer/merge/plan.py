"""The kernel plan: a recipe resolved, for one tensor, into the fused kernel's per-model arrays (weights, DARE
thresholds and mask keys, TIES magnitude cuts, L1 rescales). The declarations it reads (which method does what)
are the registry in :mod:`optimizer.methods`, below the recipe; this is the merge machinery above it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from optimizer.errors import MergeoptError
from optimizer.merge import sparsify
from optimizer.methods import METHODS
from optimizer.recipe import Recipe, resolve_parameter


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
    if not spec.fused:
        raise MergeoptError(f"merge_method {spec.name} does not run in the fused engine; "
                            "'mergeopt merge' hands such a recipe to mergekit")
    n = len(model_positions)
    weights = np.zeros(n, dtype=np.float32)
    scales = np.ones(n, dtype=np.float32)
    modes = np.full(n, sparsify.KEEP_ALL, dtype=np.int32)
    thresholds = np.zeros(n, dtype=np.int64)
    magnitudes = np.zeros(n, dtype=np.float32)
    keys = np.zeros(n, dtype=np.uint64)
    tie_limits = np.zeros(n, dtype=np.int64)
    glob = recipe.parameters
    rescale_l1 = spec.sparsification == "magnitude" and bool(
        resolve_parameter("rescale", [glob], slot.name, slot.t, default=False))
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
                if rescale_l1:  # mergekit's rescale: the trimmed delta keeps the dense delta's L1 norm
                    scales[row] = _trimmed_l1_scale(delta_rows(row), density)
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
    lam = float(resolve_parameter("lambda", [glob], slot.name, slot.t, default=1.0)) if spec.has("lambda") else 1.0
    base_coef = 1.0
    if spec.whole_weights:
        # linear: out = sum_i w_i x_i (/ sum_i w_i). The engine holds x_m = base + delta_m, so the base's own
        # coefficient is the weight sum; a base_model outside `models` is one more input with delta 0, weighted
        # by the global weight (mergekit averages it in the same way).
        base_weight = 0.0
        if recipe.linear_base_is_input:
            base_weight = float(resolve_parameter("weight", [glob], slot.name, slot.t, default=0.0))
        total = float(weights.sum(dtype=np.float64)) + base_weight
        if normalize:
            if abs(total) < 1e-8:
                raise MergeoptError(f"linear weights sum to {total:g} for tensor {slot.name}; a normalized average "
                                    "needs a non-zero sum (set normalize: false or change the weights)")
            weights = (weights / np.float32(total)).astype(np.float32)
            normalize = False
        else:
            base_coef = total
    return sparsify.TensorPlan(weights=weights, scales=scales, keep_mode=modes, thresholds=thresholds,
                               magnitudes=magnitudes, keys=keys, tie_limits=tie_limits, consensus=spec.consensus, normalize=normalize,
                               lam=lam, base_coef=base_coef)


def _trimmed_l1_scale(delta, density: float) -> float:
    """dense L1 / L1 of the top-k elements, k = max(1, int(density * n)); 1 when either is below 1e-7."""
    import torch

    flat = delta.reshape(-1).abs().float()
    k = max(1, int(density * flat.numel()))
    before = float(flat.sum())
    after = float(torch.topk(flat, k, sorted=False).values.sum())
    return before / after if before >= 1e-7 and after >= 1e-7 else 1.0
