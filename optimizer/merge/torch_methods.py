"""Merge methods that run in mergeopt's engine as plain torch functions on one flattened float32 tensor.

The methods marked ``engine="torch"`` in :data:`optimizer.methods.METHODS` (slerp, nuslerp, model_stock,
breadcrumbs, breadcrumbs_ties, della, della_linear) have no fused numba kernel: each tensor is merged here from the
float32 values of the base and the fine-tunes, with mergekit 0.1.5's meaning (tests/merge/test_torch_methods.py
compares each with mergekit's own implementation). They build straight into a live model like the fused methods,
so a search can score them without writing files.

Random choices (DELLA's drops) come from the same counter hash as DARE (:func:`sparsify.dare_ranks`): they depend
only on (seed, model position, tensor name), never on an RNG's state, so a recipe re-merges to the same bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from optimizer.errors import MergeoptError

if TYPE_CHECKING:
    from optimizer.recipe import Recipe


# ---- pure functions on flat float32 tensors --------------------------------------------------------------------------
def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995,
          eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation from ``v0`` (t = 0) to ``v1`` (t = 1) over the whole tensor; linear when the two
    are (anti)collinear (|cos| > dot_threshold), as mergekit does."""
    norm0, norm1 = float(torch.linalg.vector_norm(v0)), float(torch.linalg.vector_norm(v1))
    norm0, norm1 = (norm0 if norm0 > eps else 1.0), (norm1 if norm1 > eps else 1.0)
    dot = max(-1.0, min(1.0, float(((v0 / norm0) * (v1 / norm1)).sum())))
    if abs(dot) > dot_threshold:
        return (1 - t) * v0 + t * v1
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    return (math.sin((1 - t) * theta) / sin_theta) * v0 + (math.sin(t * theta) / sin_theta) * v1


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, shape: tuple[int, ...], row_wise: bool = False,
            flatten: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation of whole tensors (``flatten``), of each row (the last axis), or of each column
    (``row_wise``: the first axis); rows whose two vectors are collinear interpolate linearly."""
    a, b = v0.reshape(shape), v1.reshape(shape)
    if flatten:
        a, b = a.reshape(-1), b.reshape(-1)
    elif row_wise:
        a, b = a.transpose(0, -1), b.transpose(0, -1)
    a_unit = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp(min=1e-7)
    b_unit = b / torch.linalg.vector_norm(b, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (a_unit * b_unit).sum(dim=-1, keepdim=True).clamp(-1, 1)
    collinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(collinear, torch.zeros_like(cos), cos))
    spherical = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    out = torch.where(collinear, (1 - t) * a + t * b, spherical)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(-1)


def model_stock(base: torch.Tensor, models: list[torch.Tensor], shape: tuple[int, ...],
                filter_wise: bool = False) -> torch.Tensor:
    """Model Stock: the average of the fine-tunes pulled towards the base by t = N cos / (1 + (N - 1) cos), cos the
    mean pairwise cosine between their deltas (per row with ``filter_wise``); the base where that is singular."""
    rows = (base.reshape(shape).reshape(-1, shape[-1]) if filter_wise and len(shape) > 1
            else base.reshape(1, -1))
    tuned = [m.reshape(rows.shape) for m in models]
    offsets = [m - rows for m in tuned]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norms = (torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)).clamp(min=1e-6)
            cosines.append(((a * b).sum(dim=-1) / norms).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    count = len(tuned)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos),
                    count * cos / torch.where(singular, torch.ones_like(denominator), denominator))
    average = sum(tuned) / count
    return (t * average + (1 - t) * rows).reshape(-1)


def breadcrumbs_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Keep ``int(density * n)`` elements after dropping the ``int(gamma * n)`` largest magnitudes and as many of
    the smallest as needed (fewer outliers dropped when the density asks for more). Ties in magnitude keep the
    lower index (mergekit's order among ties is unspecified)."""
    n = delta.numel()
    if density >= 1:
        return torch.ones(n, dtype=torch.bool, device=delta.device)
    keep = int(density * n)
    bottom = max(0, n - keep - int(gamma * n))
    order = torch.sort(delta.abs(), stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool, device=delta.device)
    mask[order[bottom:bottom + keep]] = True
    return mask


def della_mask(delta: torch.Tensor, shape: tuple[int, ...], density: float, epsilon: float,
               uniforms: torch.Tensor) -> torch.Tensor:
    """DELLA's MagPrune: within each row, element of magnitude rank r (0 = smallest) is kept with probability
    ``density - epsilon + 2 * epsilon * r / (row length - 1)``; ``uniforms`` are the element's draws in [0, 1)."""
    if density >= 1:
        return torch.ones(delta.numel(), dtype=torch.bool, device=delta.device)
    if density <= 0:
        return torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise MergeoptError(f"della: density {density:g} +/- epsilon {epsilon:g} must stay within (0, 1); "
                            "lower epsilon")
    rows = delta.reshape(shape).reshape(-1, shape[-1]) if len(shape) > 1 else delta.reshape(1, -1)
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1, stable=True), dim=1).float()
    span = max(rows.shape[1] - 1, 1)
    probability = (density - epsilon) + (ranks / span).clamp(0, 1) * 2 * epsilon
    return (uniforms.reshape(rows.shape) < probability).reshape(-1)


def l1_rescaled(delta: torch.Tensor, mask: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """The masked delta scaled back to the dense delta's L1 norm (mergekit's ``rescale: true``)."""
    kept = delta * mask
    before, after = float(delta.abs().sum()), float(kept.abs().sum())
    return kept if before < eps or after < eps else kept * (before / after)


def task_arithmetic(base: torch.Tensor, deltas: list[torch.Tensor], weights: list[float], consensus: bool,
                    normalize: bool, lam: float) -> torch.Tensor:
    """base + lam * mix of weighted (already sparsified) deltas; TIES sign election when ``consensus``."""
    w = torch.tensor(weights, dtype=torch.float32, device=base.device).unsqueeze(1)
    stacked = torch.stack(deltas) * w
    if consensus:
        elected = torch.where(stacked.sum(dim=0) >= 0, 1.0, -1.0)
        agree = torch.sign(stacked) == elected
        mix = (stacked * agree).sum(dim=0)
        agreeing = (w * agree).sum(dim=0)
        if normalize:
            mix = mix / torch.where(agreeing == 0, torch.ones_like(agreeing), agreeing)
    else:
        mix = stacked.sum(dim=0)
        total = float(w.sum())
        if normalize:
            mix = mix / (total if abs(total) >= 1e-8 else 1.0)
    return base + lam * mix


def uniforms(n: int, seed: int, position: int, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """Per-element draws in [0, 1) from the DARE counter hash: a function of (seed, model position, tensor) only,
    the same on every device."""
    from optimizer.merge import sparsify

    ranks = sparsify.dare_ranks(n, sparsify.mask_key(seed, position, f"della\0{name}"), device)
    return (ranks.float() + 0.5) / sparsify.RANK_LEVELS


# ---- a recipe's plan for one tensor ----------------------------------------------------------------------------------
@dataclass
class TorchPlan:
    """What the engine needs to merge one tensor with a torch method: the recipe, the tensor and the engine rows."""

    recipe: Recipe
    name: str
    t: float
    shape: tuple[int, ...]
    positions: list[int | None]  # per engine row, the model's position in the recipe (None: left out)

    def merge(self, base: torch.Tensor, rows: list[torch.Tensor]) -> torch.Tensor:
        """The merged tensor (flat float32) from the stored base and engine rows."""
        from optimizer.methods import METHODS
        from optimizer.recipe import resolve_parameter

        recipe, spec = self.recipe, METHODS[self.recipe.merge_method]
        base = base.reshape(-1).float()
        used = [(pos, row.reshape(-1).float()) for pos, row in zip(self.positions, rows, strict=True)
                if pos is not None]
        used.sort(key=lambda item: item[0])  # recipe order: slerp/nuslerp read their models in it

        def shared(key: str):
            return resolve_parameter(key, [recipe.parameters], self.name, self.t,
                                     default=spec.parameter(key).default)

        def own(key: str, pos: int):
            value = resolve_parameter(key, [recipe.models[pos].parameters, recipe.parameters], self.name, self.t,
                                      default=spec.parameter(key).default)
            if value is None or value is _required():
                raise MergeoptError(f"model {recipe.models[pos].model} has no {key!r} for tensor {self.name}")
            return float(value)

        method = spec.name
        if method == "slerp":
            t = shared("t")
            if t is None or t is _required():
                raise MergeoptError(f"slerp has no 't' for tensor {self.name}; set parameters.t")
            return slerp(float(t), base, used[0][1])
        if method == "nuslerp":
            weights = [own("weight", pos) for pos, _ in used]
            total = sum(weights)
            t = 0.5 if abs(total) < 1e-6 else weights[1] / total
            row_wise, flatten = bool(shared("nuslerp_row_wise")), bool(shared("nuslerp_flatten"))
            if recipe.base_model is None:
                return nuslerp(t, used[0][1], used[1][1], self.shape, row_wise, flatten)
            return base + nuslerp(t, used[0][1] - base, used[1][1] - base, self.shape, row_wise, flatten)
        if method == "model_stock":
            return model_stock(base, [tensor for _, tensor in used], self.shape, bool(shared("filter_wise")))
        # the task-arithmetic family with breadcrumbs or DELLA sparsification
        rescale = bool(shared("rescale"))
        deltas, weights = [], []
        for pos, tensor in used:
            delta = tensor - base
            density = own("density", pos)
            if method.startswith("breadcrumbs"):
                mask = breadcrumbs_mask(delta, density, own("gamma", pos))
            else:
                mask = della_mask(delta, self.shape, density, own("epsilon", pos),
                                  uniforms(delta.numel(), recipe.seed, pos, self.name, delta.device))
            deltas.append(l1_rescaled(delta, mask) if rescale else delta * mask)
            weights.append(own("weight", pos))
        if not deltas:
            return base.clone()
        return task_arithmetic(base, deltas, weights, consensus=method in ("breadcrumbs_ties", "della"),
                               normalize=bool(shared("normalize")), lam=float(shared("lambda")))


def _required():
    from optimizer.methods import REQUIRED

    return REQUIRED
