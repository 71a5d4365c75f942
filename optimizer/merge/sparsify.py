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


def magnitude_cut(magnitudes: torch.Tensor, density: float) -> tuple[float, int]:
    """TIES trim of one delta's ``|delta|``: keep exactly ``k = max(1, int(density * n))`` elements (mergekit's k).

    Returns ``(cut, last_tie)``: an element is kept when ``|d| > cut``, or when ``|d| == cut`` and its index is at
    most ``last_tie`` (the lowest-index elements tied at the cut fill the quota, so exactly k survive even on bf16
    checkpoints, where ties are common). ``(-1, n)`` keeps everything, ``(inf, -1)`` nothing.
    """
    flat = magnitudes.reshape(-1)
    n = flat.numel()
    if density >= 1 or n == 0:
        return -1.0, n
    if density <= 0:
        return float("inf"), -1
    k = max(1, int(density * n))
    cut_value = torch.kthvalue(flat.float().cpu(), n - k + 1).values
    cut = float(cut_value)
    above = int((flat > cut_value).sum())
    ties = torch.nonzero(flat == cut_value).flatten()
    return cut, int(ties[k - above - 1])


def magnitude_threshold(delta: torch.Tensor, density: float) -> float:
    """The |delta| cut-off of :func:`magnitude_cut` (-1: keep everything; +inf: keep nothing)."""
    return magnitude_cut(delta.abs(), density)[0]


@dataclass
class TensorPlan:
    """Everything the kernel needs to merge one tensor, resolved from a recipe.

    ``weights[m]`` are the recipe weights (used as TIES divisors), ``scales[m]`` multiply the kept deltas on
    top of the weights (DARE rescale), ``keep_mode``/``thresholds``/``magnitudes``/``tie_limits`` choose which
    elements survive. out = base_coef * base + lam * mix, where mix = sum_m weights[m] * scales[m] * keep_m *
    delta_m, restricted to the elected sign when ``consensus`` and divided by the (agreeing) weight sum when
    ``normalize``.
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
    # int64 (M,): for KEEP_MAGNITUDE, elements tied at the cut are kept up to this index; None: all ties kept
    tie_limits: np.ndarray | None = None
    # the half-precision dtype float32 inputs are rounded to before merging (the engine passes the kernels rounded
    # copies, so both kernels see the same values); None: the stored values (see MergeEngine.input_rounding)
    round_inputs: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.tie_limits is None:
            self.tie_limits = np.full(len(self.weights), np.iinfo(np.int64).max, dtype=np.int64)

    @property
    def weight_sum(self) -> float:
        """The divisor of ``normalize`` without consensus (1 when the weights cancel)."""
        total = float(self.weights.sum())
        return total if abs(total) >= 1e-8 else 1.0


# ---------------------------------------------------------------------------------------------------------
# Stored tensors as the kernels read them
# ---------------------------------------------------------------------------------------------------------
# the kernels' input kinds (kernels.F32_HALVES, BF16, F16, F32), repeated here so that planning never loads numba
_HALF_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # as uint16 arrays (float32: two halves)
F32_NATIVE = 3  # a float32 array read as it is


def bits_view(tensor: torch.Tensor) -> tuple[np.ndarray, int]:
    """A flat stored CPU tensor's bytes as uint16 (no copy) and its kind code."""
    if tensor.dtype not in _HALF_KINDS:
        raise TypeError(f"the merge kernels read float32, bfloat16 and float16 tensors, not {tensor.dtype}")
    return tensor.reshape(-1).view(torch.int16).numpy().view(np.uint16), _HALF_KINDS[tensor.dtype]


def kernel_view(tensor: torch.Tensor) -> tuple[np.ndarray, int]:
    """A flat stored CPU tensor as the kernels read it (no copy): float32 as it is, half precision as bits."""
    if tensor.dtype == torch.float32:
        return tensor.reshape(-1).numpy(), F32_NATIVE
    return bits_view(tensor)


def kernel_views(tensors: list[torch.Tensor]) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """Several stored tensors as one homogeneous tuple for the kernels, and their kind codes."""
    if len({t.dtype == torch.float32 for t in tensors}) > 1:  # float32 beside half precision: all as uint16
        views = [bits_view(t) for t in tensors]
    else:
        views = [kernel_view(t) for t in tensors]
    return tuple(v[0] for v in views), np.array([v[1] for v in views], dtype=np.int32)


# ---------------------------------------------------------------------------------------------------------
# CPU: fused numba kernels (optimizer/merge/kernels.py)
# ---------------------------------------------------------------------------------------------------------
def numba_kernels():
    """The compiled CPU kernels module (imported on first use; numba caches compiled code on disk)."""
    from optimizer.merge import kernels

    return kernels


def merge_range_cpu(out: torch.Tensor, offset: int, base: torch.Tensor, models: list[torch.Tensor],
                    plan: TensorPlan) -> None:
    """Merge elements ``offset .. offset + out.numel()`` of one tensor into ``out`` (a float32 CPU tensor that may
    be a live parameter). ``base`` and ``models`` are the flat stored tensors (float32, bfloat16 or float16, mapped
    or resident): the deltas are formed inside the kernel. ``offset`` is a multiple of the kernel's chunk."""
    kernels = numba_kernels()
    kernel = kernels.merge_parallel if out.numel() >= PARALLEL_MIN_ELEMENTS else kernels.merge_serial
    base_bits, base_kind = kernel_view(base)
    arrays, kinds = kernel_views(models)
    kernel(out.reshape(-1).numpy(), offset, base_bits, base_kind, arrays, kinds, kernels.F16_TABLE, plan.weights,
           plan.scales,
           plan.keep_mode, plan.thresholds, plan.magnitudes, plan.tie_limits, plan.keys, plan.consensus,
           plan.normalize, np.float32(plan.lam), np.float32(plan.base_coef), np.float32(plan.weight_sum))


def delta_l1_cpu(base: torch.Tensor, tuned: torch.Tensor, threshold: int, key: int) -> tuple[float, float]:
    """(dense, kept) L1 norms of ``tuned - base`` (mergekit's L1 rescale rule), one pass over the stored tensors."""
    kernels = numba_kernels()
    base_bits, base_kind = kernel_view(base)
    bits, kind = kernel_view(tuned)
    dense, kept = kernels.delta_l1(base_bits, base_kind, bits, kind, kernels.F16_TABLE, base.numel(), threshold,
                                   np.uint64(key))
    return float(dense), float(kept)


def count_nonfinite(tensor: torch.Tensor) -> int:
    """NaN and infinite elements of a stored tensor (read in place on CPU)."""
    if tensor.device.type != "cpu" or tensor.dtype not in _HALF_KINDS:
        return int((~torch.isfinite(tensor)).sum())
    bits, kind = bits_view(tensor)
    return int(numba_kernels().count_nonfinite(bits, kind, tensor.numel()))


# ---------------------------------------------------------------------------------------------------------
# torch implementation (GPU, and the oracle the CPU kernel is tested against)
# ---------------------------------------------------------------------------------------------------------
def _signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def _lsr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def dare_ranks(n: int, key: int, device: torch.device | str = "cpu", start: int = 0) -> torch.Tensor:
    """The 16-bit ranks (as int32) of elements start..start+n-1 for one mask key; identical to the CPU kernel's.

    ``start`` is a multiple of 4 (a hash block holds the ranks of 4 elements)."""
    blocks = torch.arange(start // 4, (start + n + 3) // 4, dtype=torch.int64, device=device)
    z = blocks * _signed(_GOLDEN) + _signed(key)
    z = (z ^ _lsr(z, 30)) * _signed(_MIX1)
    z = (z ^ _lsr(z, 27)) * _signed(_MIX2)
    z = z ^ _lsr(z, 31)
    shifts = torch.arange(4, dtype=torch.int64, device=device) * 16
    ranks = (z.unsqueeze(1) >> shifts) & 0xFFFF  # an arithmetic shift is fine once masked to 16 bits
    return ranks.reshape(-1)[:n].to(torch.int32)


def keep_mask(n: int, key: int, threshold: int, device: torch.device | str = "cpu", start: int = 0) -> torch.Tensor:
    return dare_ranks(n, key, device, start) >= threshold


def merge_range_torch(base: torch.Tensor, models: list[torch.Tensor], plan: TensorPlan, start: int,
                      stop: int) -> torch.Tensor:
    """Elements ``start .. stop`` of the merged tensor, with torch ops on the inputs' device (float32 result).

    The same float32 arithmetic, in the same order, as the CPU kernel: the two agree bit for bit. Callers keep
    ``stop - start`` bounded (the rank hashing needs int64 temporaries of the range's size)."""
    device = base.device
    n = stop - start
    source = base[start:stop].float()
    rows = []
    for m, tuned in enumerate(models):
        mode = int(plan.keep_mode[m])
        if mode == KEEP_NONE:
            rows.append(torch.zeros(n, dtype=torch.float32, device=device))
            continue
        delta = tuned[start:stop].float() - source
        coef = float(np.float32(plan.weights[m] * plan.scales[m]))
        row = coef * delta
        if mode == KEEP_RANDOM:
            row = row * keep_mask(n, int(plan.keys[m]), int(plan.thresholds[m]), device, start).float()
        elif mode == KEEP_MAGNITUDE:
            cut = float(plan.magnitudes[m])
            index = torch.arange(start, stop, device=device)
            last_tie = int(plan.tie_limits[m]) if plan.tie_limits is not None else stop
            kept = (delta.abs() > cut) | ((delta.abs() == cut) & (index <= last_tie))
            row = row * kept.float()
        rows.append(row)
    mix = torch.zeros(n, dtype=torch.float32, device=device)
    if not plan.consensus:
        for row in rows:
            mix += row
        if plan.normalize:
            mix = mix / float(np.float32(plan.weight_sum))
    else:
        total = torch.zeros(n, dtype=torch.float32, device=device)
        for row in rows:
            total += row
        divisor = torch.zeros(n, dtype=torch.float32, device=device)
        for m, row in enumerate(rows):
            agree = (((row > 0) & (total >= 0)) | ((row < 0) & (total < 0))).float()
            mix += row * agree
            divisor += float(plan.weights[m]) * agree
        if plan.normalize:
            mix = mix / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return float(np.float32(plan.base_coef)) * source + float(np.float32(plan.lam)) * mix


def unchanged_tail(plan: TensorPlan) -> float | None:
    """What the kernels add to ``base_coef * base`` when every model the plan keeps anything of stores exactly the
    base's values: a signed zero. None where skipping the kernel would not be exact (a non-finite coefficient,
    whose product with a zero delta is NaN).

    Why a signed zero: each kept row is a finite coefficient times a delta of +0 (x - x), so a signed zero; the
    kernels' mix starts at +0 and +0 plus a signed zero is +0; only the non-consensus normalisation can turn it
    into -0 (a negative weight sum), and lambda may flip that sign once more. Adding it matters: -0 + +0 is +0."""
    kept = plan.keep_mode != KEEP_NONE
    coefs = plan.weights[kept].astype(np.float32) * plan.scales[kept].astype(np.float32)
    if not np.all(np.isfinite(coefs)):
        return None
    mix = np.float32(0.0)
    if plan.normalize and not plan.consensus:
        mix = mix / np.float32(plan.weight_sum)
    return float(np.float32(plan.lam) * mix)


def merge_range_unchanged(out: torch.Tensor, base: torch.Tensor, plan: TensorPlan, tail: float, start: int,
                          stop: int) -> None:
    """Write elements ``start:stop`` of such a merge into ``out`` (any float dtype): ``base_coef * base + tail``
    in float32, as the kernels compute it, bit for bit, without reading the models or drawing a mask (one pass
    over the base where its coefficient is 1, the usual case: frozen embeddings and norms of fine-tunes)."""
    source = base[start:stop]
    if source.dtype != torch.float32:
        source = source.float()
    coef = float(np.float32(plan.base_coef))
    if coef != 1.0:
        source = coef * source
    torch.add(source, torch.tensor(tail, dtype=torch.float32, device=source.device), out=out)


def delta_l1_torch(base: torch.Tensor, tuned: torch.Tensor, threshold: int, key: int,
                   chunk: int = 1 << 22) -> tuple[float, float]:
    """(dense, kept) L1 norms of ``tuned - base`` on any device, in bounded chunks (float64 sums)."""
    dense = kept = 0.0
    n = base.numel()
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        magnitude = (tuned[start:stop].float() - base[start:stop].float()).abs()
        dense += float(magnitude.double().sum())
        kept += float((magnitude * keep_mask(stop - start, key, threshold, base.device, start)).double().sum())
    return dense, kept
