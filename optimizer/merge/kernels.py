"""Fused CPU merge kernels (numba). Imported lazily: compiling takes a second, then numba's disk cache serves.

Layout of the work: the flat tensor is cut into chunks of ``CHUNK`` elements, chunks run in parallel. Inside a
chunk, models are processed one after another over contiguous rows (so LLVM vectorises every loop):

1. the chunk's DARE ranks of one model are made by hashing block indices (one splitmix64 per 4 elements) into
   a small buffer that is then read as 16-bit ranks (little-endian: element 4b+j is bits 16j of hash b);
2. the model's contribution ``coef * delta * keep`` goes into an L1-resident row;
3. rows are summed (or, for TIES, a sign is elected and only agreeing rows are summed) and written to ``out``.

The masks are bit-identical to :func:`optimizer.merge.sparsify.dare_ranks` (the torch twin).
Every function is defined at module level with its own name so ``cache=True`` works across processes.
"""

from __future__ import annotations

import numba as nb
import numpy as np

CHUNK = 8192  # a multiple of 4: chunks start on hash-block boundaries
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


@nb.njit(inline="always", cache=True)
def _fill_hashes(hashes, key, first_block):
    for b in range(hashes.shape[0]):
        z = key + np.uint64(first_block + b) * _GOLDEN
        z = (z ^ (z >> _S30)) * _MIX1
        z = (z ^ (z >> _S27)) * _MIX2
        hashes[b] = z ^ (z >> _S31)


@nb.njit(inline="always", cache=True)
def _merge_chunk(out, base, deltas, weights, scales, modes, thresholds, magnitudes, keys, consensus, normalize,
                 lam, base_coef, weight_sum, start, stop):
    n_models = deltas.shape[0]
    length = stop - start
    hashes = np.empty(CHUNK // 4, dtype=np.uint64)
    ranks = hashes.view(np.uint16)
    rows = np.zeros((n_models, CHUNK), dtype=np.float32)
    for m in range(n_models):
        mode = modes[m]
        if mode == 3:  # nothing kept
            continue
        row = rows[m]
        delta = deltas[m, start:stop]
        coef = np.float32(weights[m] * scales[m])
        if mode == 0:
            for i in range(length):
                row[i] = coef * delta[i]
        elif mode == 1:  # DARE
            _fill_hashes(hashes, keys[m], start // 4)
            threshold = thresholds[m]
            for i in range(length):
                row[i] = coef * delta[i] * np.float32(ranks[i] >= threshold)
        else:  # TIES trim
            cut = magnitudes[m]
            for i in range(length):
                row[i] = coef * delta[i] * np.float32(abs(delta[i]) >= cut)
    mix = np.zeros(CHUNK, dtype=np.float32)
    if not consensus:
        for m in range(n_models):
            row = rows[m]
            for i in range(length):
                mix[i] += row[i]
        if normalize:
            for i in range(length):
                mix[i] = mix[i] / weight_sum
    else:
        total = np.zeros(CHUNK, dtype=np.float32)
        for m in range(n_models):
            row = rows[m]
            for i in range(length):
                total[i] += row[i]
        divisor = np.zeros(CHUNK, dtype=np.float32)
        for m in range(n_models):
            row = rows[m]
            w = weights[m]
            for i in range(length):
                v = row[i]
                agree = np.float32((v > 0 and total[i] >= 0) or (v < 0 and total[i] < 0))
                mix[i] += v * agree
                divisor[i] += w * agree
        if normalize:
            for i in range(length):
                d = divisor[i]
                mix[i] = mix[i] / (d if d != 0 else np.float32(1.0))
    target = out[start:stop]
    source = base[start:stop]
    for i in range(length):
        target[i] = base_coef * source[i] + lam * mix[i]


@nb.njit(parallel=True, cache=True)
def merge_parallel(out, base, deltas, weights, scales, modes, thresholds, magnitudes, keys, consensus, normalize,
                   lam, base_coef, weight_sum):
    n = base.shape[0]
    for c in nb.prange((n + CHUNK - 1) // CHUNK):
        _merge_chunk(out, base, deltas, weights, scales, modes, thresholds, magnitudes, keys, consensus, normalize,
                     lam, base_coef, weight_sum, c * CHUNK, min(n, (c + 1) * CHUNK))


@nb.njit(cache=True)
def merge_serial(out, base, deltas, weights, scales, modes, thresholds, magnitudes, keys, consensus, normalize,
                 lam, base_coef, weight_sum):
    n = base.shape[0]
    for c in range((n + CHUNK - 1) // CHUNK):
        _merge_chunk(out, base, deltas, weights, scales, modes, thresholds, magnitudes, keys, consensus, normalize,
                     lam, base_coef, weight_sum, c * CHUNK, min(n, (c + 1) * CHUNK))


@nb.njit(parallel=True, cache=True)
def kept_l1(delta, threshold, key):
    """Sum of |delta| over the elements a DARE mask keeps (for mergekit's L1 rescale rule)."""
    n = delta.shape[0]
    total = 0.0
    for c in nb.prange((n + CHUNK - 1) // CHUNK):
        start = c * CHUNK
        stop = min(n, start + CHUNK)
        hashes = np.empty(CHUNK // 4, dtype=np.uint64)
        ranks = hashes.view(np.uint16)
        _fill_hashes(hashes, key, start // 4)
        acc = 0.0
        for i in range(stop - start):
            acc += abs(delta[start + i]) * (ranks[i] >= threshold)
        total += acc
    return total


@nb.njit(parallel=True, cache=True)
def weighted_sum(out, base, deltas, weights):
    """Plain fused weighted sum of deltas (no masks): the speed baseline of the benchmarks."""
    n = base.shape[0]
    for i in nb.prange(n):
        acc = base[i]
        for m in range(deltas.shape[0]):
            acc += weights[m] * deltas[m, i]
        out[i] = acc
