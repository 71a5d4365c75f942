"""DARE masks, TIES trimming and sign election: pure functions on flat tensors.

Masks come from a counter-based generator, not from a stateful RNG: element ``i`` of model ``m``'s delta in
tensor ``name`` gets a 16-bit rank ``r = bits(splitmix64(key + (i // 4) * golden), 16 * (i % 4))`` with
``key = blake2b(seed, m, name)``, and is kept when ``r >= round(p * 65536)``. So

* the mask depends only on (seed, model position, tensor name, p) -- never on the order tensors are built,
  the device, the thread count, or which other candidates were built before;
* masks are nested across p (an element dropped at p = .3 is dropped at p = .5), so a small change of p is a
  small change of the model, which is what a continuous optimiser wants;
* no random numbers are stored or drawn from a slow RNG: the ranks are recomputed inside the fused merge loop
  at the cost of one 64-bit hash per 4 elements (CPU DARE is bound by RNG speed, not memory, otherwise).

``p`` is quantised to 1/65536; the rescale factor uses the quantised value, so DARE stays exactly unbiased.

Two implementations of the same arithmetic: a fused numba kernel for CPU tensors and a torch version for
other devices (and as the test oracle). Both draw bit-identical masks.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch

RANK_BITS = 16
RANK_LEVELS = 1 << RANK_BITS  # 65536
PARALLEL_MIN_ELEMENTS = 1 << 16  # smaller tensors are merged on one thread

_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB

# Per-model keep rule inside the kernel.
KEEP_ALL, KEEP_RANDOM, KEEP_MAGNITUDE, KEEP_NONE = 0, 1, 2, 3


def mask_key(seed: int, model_index: int, tensor_name: str) -> int:
    """64-bit key of one (seed, model, tensor) mask; stable across processes and machines."""
    digest = hashlib.blake2b(f"mergeopt-dare\0{seed}\0{model_index}\0{tensor_name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def drop_threshold(drop_rate: float) -> int:
    """Rank threshold for a drop rate: elements with rank < threshold are dropped."""
    if not 0.0 <= drop_rate <= 1.0:
        raise ValueError(f"drop rate must be within [0, 1], got {drop_rate}")
    return int(round(drop_rate * RANK_LEVELS))


def dare_scale(threshold: int) -> float:
    """The paper's 1/(1-p) rescale, for the quantised p that the threshold stands for."""
    kept = RANK_LEVELS - threshold
    return 0.0 if kept == 0 else RANK_LEVELS / kept


def magnitude_threshold(delta: torch.Tensor, density: float) -> float:
    """|delta| cut-off that keeps the top ``max(1, int(density * n))`` elements (TIES trim; mergekit's k).

    Returns -1 to keep everything and +inf to keep nothing.
    """
    n = delta.numel()
    if density >= 1 or n == 0:
        return -1.0
    if density <= 0:
        return float("inf")
    k = max(1, int(density * n))
    return float(torch.kthvalue(delta.abs().reshape(-1).float().cpu(), n - k + 1).values)


@dataclass
class TensorPlan:
    """Everything the kernel needs to merge one tensor, resolved from a recipe.

    ``weights[m]`` are the recipe weights (used as TIES divisors), ``scales[m]`` multiply the kept deltas on
    top of the weights (DARE rescale), ``keep_mode``/``thresholds``/``magnitudes`` choose which elements survive.
    out = base_coef * base + lam * mix, where mix = sum_m weights[m] * scales[m] * keep_m * delta_m, restricted to
    the elected sign when ``consensus`` and divided by the (agreeing) weight sum when ``normalize``.
    """

    weights: np.ndarray  # float32 (M,)
    scales: np.ndarray  # float32 (M,)
    keep_mode: np.ndarray  # int32 (M,)
    thresholds: np.ndarray  # int64 (M,) rank thresholds for KEEP_RANDOM
    magnitudes: np.ndarray  # float32 (M,) |delta| cut-offs for KEEP_MAGNITUDE
    keys: np.ndarray  # uint64 (M,)
    consensus: bool = False
    normalize: bool = False
    lam: float = 1.0
    base_coef: float = 1.0


# ---------------------------------------------------------------------------------------------------------
# CPU: fused numba kernels (optimizer/merge/kernels.py)
# ---------------------------------------------------------------------------------------------------------
def numba_kernels():
    """The compiled CPU kernels module (imported on first use; numba caches compiled code on disk)."""
    os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "mergeopt-numba"))
    from optimizer.merge import kernels

    return kernels


def merge_flat_cpu(out: torch.Tensor, base: torch.Tensor, deltas: torch.Tensor, plan: TensorPlan) -> None:
    """Fused merge of one flattened float32 CPU tensor into ``out`` (may alias a live parameter)."""
    kernels = numba_kernels()
    kernel = kernels.merge_parallel if base.numel() >= PARALLEL_MIN_ELEMENTS else kernels.merge_serial
    weight_sum = float(plan.weights.sum())
    if abs(weight_sum) < 1e-8:
        weight_sum = 1.0
    kernel(out.numpy(), base.numpy(), deltas.numpy(), plan.weights, plan.scales, plan.keep_mode,
           plan.thresholds, plan.magnitudes, plan.keys, plan.consensus, plan.normalize,
           np.float32(plan.lam), np.float32(plan.base_coef), np.float32(weight_sum))


def kept_l1_cpu(delta: torch.Tensor, threshold: int, key: int) -> float:
    return float(numba_kernels().kept_l1(delta.numpy(), threshold, np.uint64(key)))


# ---------------------------------------------------------------------------------------------------------
# torch implementation (GPU, and the oracle the CPU kernel is tested against)
# ---------------------------------------------------------------------------------------------------------
def _signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def _lsr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def dare_ranks(n: int, key: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16-bit ranks (as int32) of elements 0..n-1 for one mask key; identical to the CPU kernel's."""
    blocks = torch.arange((n + 3) // 4, dtype=torch.int64, device=device)
    z = blocks * _signed(_GOLDEN) + _signed(key)
    z = (z ^ _lsr(z, 30)) * _signed(_MIX1)
    z = (z ^ _lsr(z, 27)) * _signed(_MIX2)
    z = z ^ _lsr(z, 31)
    shifts = torch.arange(4, dtype=torch.int64, device=device) * 16
    ranks = (z.unsqueeze(1) >> shifts) & 0xFFFF  # an arithmetic shift is fine once masked to 16 bits
    return ranks.reshape(-1)[:n].to(torch.int32)


def keep_mask(n: int, key: int, threshold: int, device: torch.device | str = "cpu") -> torch.Tensor:
    return dare_ranks(n, key, device) >= threshold


def merge_flat_torch(base: torch.Tensor, deltas: torch.Tensor, plan: TensorPlan) -> torch.Tensor:
    """Same arithmetic as the CPU kernel with torch ops, on any device; returns a float32 tensor."""
    n_models, n = deltas.shape
    device = deltas.device
    contribs = torch.empty((n_models, n), dtype=torch.float32, device=device)
    for m in range(n_models):
        coef = np.float32(plan.weights[m] * plan.scales[m])
        delta = deltas[m].float()
        mode = int(plan.keep_mode[m])
        if mode == KEEP_ALL:
            contribs[m] = delta * float(coef)
        elif mode == KEEP_RANDOM:
            kept = keep_mask(n, int(plan.keys[m]), int(plan.thresholds[m]), device)
            contribs[m] = torch.where(kept, delta * float(coef), torch.zeros((), device=device))
        elif mode == KEEP_MAGNITUDE:
            kept = delta.abs() >= float(plan.magnitudes[m])
            contribs[m] = torch.where(kept, delta * float(coef), torch.zeros((), device=device))
        else:
            contribs[m] = 0
    weights = torch.as_tensor(plan.weights, dtype=torch.float32, device=device).unsqueeze(1)
    if plan.consensus:
        positive = contribs.sum(0) >= 0
        agree = torch.where(positive, contribs > 0, contribs < 0)
        mix = (contribs * agree).sum(0)
        if plan.normalize:
            divisor = (weights * agree).sum(0)
            mix = mix / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        mix = contribs.sum(0)
        if plan.normalize:
            total = float(plan.weights.sum())
            mix = mix / (total if abs(total) >= 1e-8 else 1.0)
    return plan.base_coef * base.float() + plan.lam * mix


def kept_l1_torch(delta: torch.Tensor, threshold: int, key: int) -> float:
    kept = keep_mask(delta.numel(), key, threshold, delta.device)
    return float(delta.float().abs()[kept].sum())
