"""Fused CPU merge kernels (numba). Imported lazily: compiling takes a few seconds, then numba's disk cache serves.

Inputs are the checkpoints' own bytes, never copies: a bf16/fp16 tensor arrives as a flat ``uint16`` array, a
float32 tensor as a float32 array, each with a *kind* code. Inside a chunk each input is widened to float32
bit-exactly (bf16: a 16-bit shift; fp16: a 65536-entry table built by numpy's exact conversion), the delta
``fine-tune - base`` is formed in float32, and all arithmetic stays in float32. The fine-tunes travel as one
homogeneous tuple; in the rare family that mixes float32 and half-precision fine-tunes, the float32 ones are
passed as twice as many ``uint16`` halves (kind ``F32_HALVES``) and joined again here.

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
from numba.extending import overload

CHUNK = 8192  # a multiple of 4: chunks start on hash-block boundaries
F32_HALVES, BF16, F16, F32 = 0, 1, 2, 3  # input kinds (F32: a float32 array; the others: uint16 arrays)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)

# float32 bit patterns of all 65536 fp16 values (numpy's conversion is exact: every fp16 is a float32)
F16_TABLE = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32).view(np.uint32)


@nb.njit(inline="always", cache=True)
def _fill_hashes(hashes, key, first_block):
    for b in range(hashes.shape[0]):
        z = key + np.uint64(first_block + b) * _GOLDEN
        z = (z ^ (z >> _S30)) * _MIX1
        z = (z ^ (z >> _S27)) * _MIX2
        hashes[b] = z ^ (z >> _S31)


def _widen(src, kind, start, length, bits, table):
    """Elements start..start+length of one stored tensor as float32, into ``bits`` (a uint32 view of a float32
    buffer). Compiled per array type (see the overload below)."""
    raise NotImplementedError("only callable from numba-compiled code")


@overload(_widen, inline="always")
def _widen_typed(src, kind, start, length, bits, table):
    if isinstance(src, nb.types.Array) and src.dtype == nb.types.float32:
        def read_float32(src, kind, start, length, bits, table):
            values = bits.view(np.float32)
            part = src[start:start + length]  # a slice, not src[start + i]: the loop then vectorises
            for i in range(length):
                values[i] = part[i]
        return read_float32

    def read_bits(src, kind, start, length, bits, table):
        if kind == 1:  # bfloat16: the high half of a float32
            part = src[start:start + length]
            for i in range(length):
                bits[i] = np.uint32(part[i]) << np.uint32(16)
        elif kind == 2:  # float16
            part = src[start:start + length]
            for i in range(length):
                bits[i] = table[part[i]]
        else:  # float32 as two little-endian halves
            part = src[2 * start:2 * (start + length)]
            for i in range(length):
                bits[i] = np.uint32(part[2 * i]) | (np.uint32(part[2 * i + 1]) << np.uint32(16))
    return read_bits


@nb.njit(inline="always", cache=True)
def _merge_chunk(out, out_offset, base, base_kind, models, kinds, table, weights, scales, modes, thresholds,
                 magnitudes, tie_limits, keys, consensus, normalize, lam, base_coef, weight_sum, start, stop):
    n_models = len(models)
    length = stop - start
    hashes = np.empty(CHUNK // 4, dtype=np.uint64)
    ranks = hashes.view(np.uint16)
    base_bits = np.empty(CHUNK, dtype=np.uint32)
    source = base_bits.view(np.float32)
    _widen(base, base_kind, start, length, base_bits, table)
    tuned_bits = np.empty(CHUNK, dtype=np.uint32)
    tuned = tuned_bits.view(np.float32)
    rows = np.zeros((n_models, CHUNK), dtype=np.float32)
    for m in range(n_models):
        mode = modes[m]
        if mode == 3:  # nothing kept
            continue
        row = rows[m]
        _widen(models[m], kinds[m], start, length, tuned_bits, table)
        coef = np.float32(weights[m] * scales[m])
        # each loop forms the delta (fine-tune - base, float32) and applies the model's keep rule in one pass
        if mode == 0:
            for i in range(length):
                row[i] = coef * (tuned[i] - source[i])
        elif mode == 1:  # DARE
            _fill_hashes(hashes, keys[m], start // 4)
            threshold = thresholds[m]
            for i in range(length):
                row[i] = coef * (tuned[i] - source[i]) * np.float32(ranks[i] >= threshold)
        else:  # TIES trim: above the cut, plus the lowest-index elements tied at it (exactly k kept)
            cut = magnitudes[m]
            last_tie = tie_limits[m]
            for i in range(length):
                d = tuned[i] - source[i]
                a = abs(d)
                row[i] = coef * d * np.float32(a > cut or (a == cut and start + i <= last_tie))
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
    target = out[start - out_offset:stop - out_offset]
    for i in range(length):
        target[i] = base_coef * source[i] + lam * mix[i]


@nb.njit(parallel=True, cache=True)
def merge_parallel(out, out_offset, base, base_kind, models, kinds, table, weights, scales, modes, thresholds,
                   magnitudes, tie_limits, keys, consensus, normalize, lam, base_coef, weight_sum):
    """Merge elements ``out_offset .. out_offset + len(out)`` of one tensor into ``out`` (float32)."""
    n_chunks = (out.shape[0] + CHUNK - 1) // CHUNK
    for c in nb.prange(n_chunks):
        start = out_offset + c * CHUNK
        stop = min(out_offset + out.shape[0], start + CHUNK)
        _merge_chunk(out, out_offset, base, base_kind, models, kinds, table, weights, scales, modes, thresholds,
                     magnitudes, tie_limits, keys, consensus, normalize, lam, base_coef, weight_sum, start, stop)


@nb.njit(cache=True)
def merge_serial(out, out_offset, base, base_kind, models, kinds, table, weights, scales, modes, thresholds,
                 magnitudes, tie_limits, keys, consensus, normalize, lam, base_coef, weight_sum):
    n_chunks = (out.shape[0] + CHUNK - 1) // CHUNK
    for c in range(n_chunks):
        start = out_offset + c * CHUNK
        stop = min(out_offset + out.shape[0], start + CHUNK)
        _merge_chunk(out, out_offset, base, base_kind, models, kinds, table, weights, scales, modes, thresholds,
                     magnitudes, tie_limits, keys, consensus, normalize, lam, base_coef, weight_sum, start, stop)


@nb.njit(parallel=True, cache=True)
def delta_l1(base, base_kind, tuned, kind, table, n, threshold, key):
    """(dense, kept) L1 norms of ``tuned - base``: over every element, and over the elements a DARE mask keeps.

    One pass over the stored tensors; per-chunk float64 sums added in chunk order, so the result is the same for
    any thread count.
    """
    n_chunks = (n + CHUNK - 1) // CHUNK
    dense = np.zeros(n_chunks, dtype=np.float64)
    kept = np.zeros(n_chunks, dtype=np.float64)
    for c in nb.prange(n_chunks):
        start = c * CHUNK
        length = min(n, start + CHUNK) - start
        base_bits = np.empty(CHUNK, dtype=np.uint32)
        tuned_bits = np.empty(CHUNK, dtype=np.uint32)
        _widen(base, base_kind, start, length, base_bits, table)
        _widen(tuned, kind, start, length, tuned_bits, table)
        source = base_bits.view(np.float32)
        values = tuned_bits.view(np.float32)
        hashes = np.empty(CHUNK // 4, dtype=np.uint64)
        ranks = hashes.view(np.uint16)
        _fill_hashes(hashes, key, start // 4)
        d_acc = 0.0
        k_acc = 0.0
        for i in range(length):
            a = abs(np.float32(values[i] - source[i]))
            d_acc += a
            k_acc += a * (ranks[i] >= threshold)
        dense[c] = d_acc
        kept[c] = k_acc
    dense_total = 0.0
    kept_total = 0.0
    for c in range(n_chunks):
        dense_total += dense[c]
        kept_total += kept[c]
    return dense_total, kept_total


@nb.njit(parallel=True, cache=True)
def count_nonfinite(src, kind, n):
    """How many of a stored tensor's n elements are NaN or infinite (exponent bits all set), without widening."""
    n_chunks = (n + CHUNK - 1) // CHUNK
    counts = np.zeros(n_chunks, dtype=np.int64)
    for c in nb.prange(n_chunks):
        start = c * CHUNK
        stop = min(n, start + CHUNK)
        bad = 0
        if kind == 1:
            part = src[start:stop]
            for i in range(stop - start):
                bad += (part[i] & 0x7F80) == 0x7F80
        elif kind == 2:
            part = src[start:stop]
            for i in range(stop - start):
                bad += (part[i] & 0x7C00) == 0x7C00
        else:
            part = src[2 * start:2 * stop]
            for i in range(stop - start):
                bad += (part[2 * i + 1] & 0x7F80) == 0x7F80
        counts[c] = bad
    return counts.sum()


@nb.njit(parallel=True, cache=True)
def weighted_sum(out, base, base_kind, models, kinds, table, weights):
    """Plain fused weighted sum of deltas read from the stored tensors (no masks): the benchmarks' baseline."""
    n = out.shape[0]
    n_chunks = (n + CHUNK - 1) // CHUNK
    for c in nb.prange(n_chunks):
        start = c * CHUNK
        length = min(n, start + CHUNK) - start
        base_bits = np.empty(CHUNK, dtype=np.uint32)
        tuned_bits = np.empty(CHUNK, dtype=np.uint32)
        _widen(base, base_kind, start, length, base_bits, table)
        source = base_bits.view(np.float32)
        values = tuned_bits.view(np.float32)
        acc = np.zeros(CHUNK, dtype=np.float32)
        for m in range(len(models)):
            _widen(models[m], kinds[m], start, length, tuned_bits, table)
            w = weights[m]
            for i in range(length):
                acc[i] += w * (values[i] - source[i])
        target = out[start:start + length]
        for i in range(length):
            target[i] = source[i] + acc[i]


@nb.njit(inline="always", cache=True)
def _lora_row(acc, x, y, p):
    """acc[q] = sum_k x[k, p] * y[k, q] for one row p, the terms added in k order (each product and sum rounded)."""
    acc[:] = 0.0
    for k in range(x.shape[0]):
        xk = x[k, p]
        yk = y[k]
        for q in range(acc.shape[0]):
            acc[q] += xk * yk[q]


@nb.njit(parallel=True, cache=True)
def form_lora_f32(out, base, x, y, scale):
    """A float32 tensor adapted by a LoRA: ``out[p, q] = base[p, q] + (sum_k x[k, p] * y[k, q]) * scale`` (flat,
    row-major, ``cols = y.shape[1]``): ``x = B^T`` and ``y = A`` for ``B @ A``, ``x = A`` and ``y = B^T`` for its
    transpose. Row by row in parallel; nothing but one row of float32 scratch per thread."""
    cols = y.shape[1]
    for p in nb.prange(x.shape[1]):
        acc = np.empty(cols, dtype=np.float32)
        _lora_row(acc, x, y, p)
        row = base[p * cols:(p + 1) * cols]
        target = out[p * cols:(p + 1) * cols]
        for q in range(cols):
            target[q] = row[q] + acc[q] * scale


@nb.njit(parallel=True, cache=True)
def form_lora_bf16(out, base, x, y, scale):
    """The same for a bfloat16 tensor (``base`` and ``out`` as uint16 bits): the sum in float32, rounded once to
    bfloat16 (to nearest, ties to even), as a float32 -> bfloat16 cast rounds."""
    cols = y.shape[1]
    for p in nb.prange(x.shape[1]):
        acc = np.empty(cols, dtype=np.float32)
        _lora_row(acc, x, y, p)
        wide = np.empty(cols, dtype=np.uint32)
        values = wide.view(np.float32)
        row = base[p * cols:(p + 1) * cols]
        for q in range(cols):
            wide[q] = np.uint32(row[q]) << np.uint32(16)
        for q in range(cols):
            values[q] = values[q] + acc[q] * scale
        target = out[p * cols:(p + 1) * cols]
        for q in range(cols):
            bits = wide[q]
            bits = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
            target[q] = np.uint16(bits >> np.uint32(16))
