"""Scratch profile of the CPU merge kernel: the engine's kernels vs proposed rewrites, on one big flat tensor.

Times, interleaved over ``--repeats`` rounds, on ``--numel`` float32 elements x ``--models`` deltas:

  engine dare_linear / dare_ties / task_arithmetic   ``sparsify.merge_flat_cpu`` as the engine calls it
  engine wsum                                        ``weighted_sum_kernel`` (the benchmark baseline)
  torch wsum                                         unfused torch, in place with add_(alpha=)
  new dare_linear / dare_ties / task_arithmetic      the rewrite proposed in benchmarks/RESULTS.md (below)
  new wsum                                           a chunked, vectorisable weighted sum

and checks that every "new" kernel gives bit-identical output to the engine's (the masks are the same
counter-based ranks; only the loop structure changes). Nothing in optimizer/ is modified: the rewrite lives here.

What the rewrite changes (same arithmetic, same order of float operations):
  * DARE fill: whole 4-element hash blocks without the per-element ``if i >= stop: break`` (only a chunk's
    ragged tail takes the careful path), and a select instead of a branch, so LLVM unrolls and vectorises
    the splitmix hash (AVX-512 has 64-bit multiplies) and the masked multiply;
  * no consensus: accumulate straight into an L1-sized float32 buffer per chunk, model by model (the same
    0 + c0 + c1 + ... order), instead of filling an (M, chunk) block and re-reading it element by element;
  * consensus: branch-free sign election (adding +0.0 for a disagreeing model is exact here);
  * weighted sum baseline: per chunk, one vectorisable pass per model instead of an inner loop over models.

example:
  python benchmarks/profile_merge_kernel.py                     # 32M elements x 3 models, 5 rounds
  python benchmarks/profile_merge_kernel.py --threads 1 --numel 16000000
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def build_new_kernels(chunk: int):
    import numba as nb
    import numpy as np

    from optimizer.merge import sparsify

    u64 = nb.uint64
    golden, mix1, mix2 = u64(sparsify._GOLDEN), u64(sparsify._MIX1), u64(sparsify._MIX2)
    s30, s27, s31 = u64(30), u64(27), u64(31)
    mask16 = u64(0xFFFF)
    zero = np.float32(0.0)

    @nb.njit(inline="always")
    def splitmix(x):
        z = x
        z = (z ^ (z >> s30)) * mix1
        z = (z ^ (z >> s27)) * mix2
        return z ^ (z >> s31)

    @nb.njit(inline="always")
    def dare_term(h, j, thr, v):
        return v if ((h >> u64(16 * j)) & mask16) >= thr else zero

    @nb.njit(inline="always")
    def fill(buf, delta, start, stop, coef, mode, threshold, magnitude, key, accumulate):
        """buf[k] (+)= kept(coef * delta[start + k]); start is a multiple of 4."""
        n = stop - start
        if mode == 0:
            for k in range(n):
                v = coef * delta[start + k]
                buf[k] = buf[k] + v if accumulate else v
        elif mode == 1:
            thr = u64(threshold)
            b0 = start // 4
            full = n // 4
            for b in range(full):  # whole blocks: fixed trip count, no early exit
                h = splitmix(key + u64(b0 + b) * golden)
                k = 4 * b
                for j in range(4):
                    v = dare_term(h, j, thr, coef * delta[start + k + j])
                    buf[k + j] = buf[k + j] + v if accumulate else v
            if full * 4 < n:  # ragged tail of the last chunk
                h = splitmix(key + u64(b0 + full) * golden)
                for j in range(n - full * 4):
                    k = full * 4 + j
                    v = dare_term(h, j, thr, coef * delta[start + k])
                    buf[k] = buf[k] + v if accumulate else v
        elif mode == 2:
            for k in range(n):
                d = delta[start + k]
                v = coef * d if abs(d) >= magnitude else zero
                buf[k] = buf[k] + v if accumulate else v
        else:
            for k in range(n):
                buf[k] = buf[k] + zero if accumulate else zero

    def merge_kernel(out, base, deltas, weights, scales, modes, thresholds, magnitudes, keys,
                     consensus, normalize, lam, base_coef, weight_sum):
        n = base.shape[0]
        n_models = deltas.shape[0]
        n_chunks = (n + chunk - 1) // chunk
        for c in nb.prange(n_chunks):
            start = c * chunk
            stop = min(n, start + chunk)
            size = stop - start
            if not consensus:
                acc = np.zeros(size, dtype=np.float32)
                for m in range(n_models):
                    fill(acc, deltas[m], start, stop, np.float32(weights[m] * scales[m]), modes[m],
                         thresholds[m], magnitudes[m], keys[m], True)
                if normalize:
                    for k in range(size):
                        out[start + k] = base_coef * base[start + k] + lam * (acc[k] / weight_sum)
                else:
                    for k in range(size):
                        out[start + k] = base_coef * base[start + k] + lam * acc[k]
            else:
                contrib = np.empty((n_models, size), dtype=np.float32)
                for m in range(n_models):
                    fill(contrib[m], deltas[m], start, stop, np.float32(weights[m] * scales[m]), modes[m],
                         thresholds[m], magnitudes[m], keys[m], False)
                total = np.zeros(size, dtype=np.float32)
                for m in range(n_models):
                    for k in range(size):
                        total[k] += contrib[m, k]
                mix = np.zeros(size, dtype=np.float32)
                divisor = np.zeros(size, dtype=np.float32)
                for m in range(n_models):
                    w = weights[m]
                    for k in range(size):
                        v = contrib[m, k]
                        agree = (v > 0) if total[k] >= 0 else (v < 0)
                        mix[k] += v if agree else zero
                        divisor[k] += w if agree else zero
                for k in range(size):
                    x = mix[k]
                    if normalize:
                        d = divisor[k]
                        x = x / (d if d != 0 else np.float32(1.0))
                    out[start + k] = base_coef * base[start + k] + lam * x

    merge_parallel = nb.njit(parallel=True)(merge_kernel)

    @nb.njit(parallel=True)
    def wsum_chunked(out, base, deltas, weights):
        n = base.shape[0]
        n_models = deltas.shape[0]
        n_chunks = (n + chunk - 1) // chunk
        for c in nb.prange(n_chunks):
            start = c * chunk
            stop = min(n, start + chunk)
            for i in range(start, stop):
                out[i] = base[i]
            for m in range(n_models):
                w = weights[m]
                d = deltas[m]
                for i in range(start, stop):
                    out[i] += w * d[i]

    return merge_parallel, wsum_chunked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=int, default=32_000_000, help="elements of the flat tensor (default 32M)")
    parser.add_argument("--models", type=int, default=3, help="deltas (default 3)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="numba and torch threads (default: all cores)")
    parser.add_argument("--chunk", type=int, default=8192, help="elements per work item of the new kernels")
    args = parser.parse_args(argv)
    if args.threads is not None:
        os.environ["NUMBA_NUM_THREADS"] = str(args.threads)
    import numba
    import numpy as np
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from optimizer.merge import sparsify
    from optimizer.merge.methods import METHODS  # noqa: F401  (import check)

    n, M = args.numel, args.models
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(n, generator=gen) * 0.02
    deltas = torch.randn((M, n), generator=gen) * 0.01
    out = torch.empty(n)
    weights = np.asarray([0.5, 0.3, 0.2, 0.1, 0.1][:M], dtype=np.float32)

    def plan(method: str) -> sparsify.TensorPlan:
        dare = method.startswith("dare")
        thr = sparsify.drop_threshold(0.5)
        return sparsify.TensorPlan(
            weights=weights.copy(),
            scales=np.full(M, sparsify.dare_scale(thr) if dare else 1.0, dtype=np.float32),
            keep_mode=np.full(M, sparsify.KEEP_RANDOM if dare else sparsify.KEEP_ALL, dtype=np.int32),
            thresholds=np.full(M, thr if dare else 0, dtype=np.int64),
            magnitudes=np.zeros(M, dtype=np.float32),
            keys=np.asarray([sparsify.mask_key(0, m, "t") for m in range(M)], dtype=np.uint64),
            consensus=method == "dare_ties", normalize=False)

    plans = {m: plan(m) for m in ("dare_linear", "dare_ties", "task_arithmetic")}
    new_merge, new_wsum = build_new_kernels(args.chunk)
    _, _, _, old_wsum = sparsify.numba_kernels()

    def new_call(p: sparsify.TensorPlan):
        new_merge(out.numpy(), base.numpy(), deltas.numpy(), p.weights, p.scales, p.keep_mode, p.thresholds,
                  p.magnitudes, p.keys, p.consensus, p.normalize, np.float32(p.lam), np.float32(p.base_coef),
                  np.float32(p.weights.sum()))

    @torch.no_grad()
    def torch_wsum():
        torch.add(base, deltas[0], alpha=float(weights[0]), out=out)
        for m in range(1, M):
            out.add_(deltas[m], alpha=float(weights[m]))

    variants = {"engine wsum [baseline]": lambda: old_wsum(out.numpy(), base.numpy(), deltas.numpy(), weights),
                "torch wsum (unfused)": torch_wsum,
                "new wsum (chunked)": lambda: new_wsum(out.numpy(), base.numpy(), deltas.numpy(), weights)}
    for method, p in plans.items():
        variants[f"engine {method}"] = (lambda p=p: sparsify.merge_flat_cpu(out, base, deltas, p))
        variants[f"new {method}"] = (lambda p=p: new_call(p))

    # correctness: bit-identical to the engine's kernel
    for method, p in plans.items():
        sparsify.merge_flat_cpu(out, base, deltas, p)
        ref = out.clone()
        new_call(p)
        same = torch.equal(out, ref)
        print(f"new {method} bit-identical to engine: {same}", file=sys.stderr)
        if not same:
            print(f"  max |diff| {float((out - ref).abs().max()):.3e}", file=sys.stderr)
    old_wsum(out.numpy(), base.numpy(), deltas.numpy(), weights)
    ref = out.clone()
    new_wsum(out.numpy(), base.numpy(), deltas.numpy(), weights)
    print(f"new wsum bit-identical to engine wsum: {torch.equal(out, ref)}", file=sys.stderr)

    names = list(variants)
    times = {k: [] for k in names}
    for fn in variants.values():
        fn()
    for r in range(args.repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for k in order:
            t = time.perf_counter()
            variants[k]()
            times[k].append(time.perf_counter() - t)
    base_key = "engine wsum [baseline]"
    delta_bytes = M * n * 4
    print(f"\n{n / 1e6:.0f}M elements x {M} deltas, {args.repeats} rounds, numba {numba.get_num_threads()} threads "
          f"({numba.threading_layer()}), torch {torch.get_num_threads()} threads, chunk {args.chunk}; "
          f"loadavg {os.getloadavg()[0]:.2f}\n")
    print("| kernel | median ms | delta GB/s | speed vs engine wsum |")
    print("|---|---:|---:|---:|")
    for k in names:
        med = statistics.median(times[k])
        ratio = statistics.median(b / s for s, b in zip(times[k], times[base_key]))
        print(f"| {k} | {med * 1e3:.1f} | {delta_bytes / med / 1e9:.2f} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
