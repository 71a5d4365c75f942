"""Candidate turnaround on the zoo: in-memory swap vs the disk round trip, and where a candidate's time goes.

    python benchmarks/bench_scoring.py --candidates 6 --limit 200                 # transformers backend
    PYTHONPATH=. $(bash .ci/vllm-venv.sh)/bin/python benchmarks/bench_scoring.py --backend vllm --candidates 4

For the same DARE recipes (random per-model weights and drop rates, fixed seed) it times:

* in memory (mergeopt): the engine builds each candidate into the live engine's weights, then the task set is
  scored (``evaluate_candidate``);
* disk round trip, mergeopt writer: write the merged model folder, load it in a fresh engine, score it;
* disk round trip, mergekit (hf only): ``mergekit-yaml`` writes the merged model, then load and score, which is
  what mergekit-evolve and Mergenetic do per candidate.

It also reports merge + swap as a share of a candidate's wall time, and the scoring overhead: the part of the
scoring time spent outside the model's forward passes (building batches, the decoding loop's bookkeeping,
detokenising, metrics), measured with forward hooks on the live model (hf backend).
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from optimizer.evaluate.scoring import evaluate_candidate, make_backend  # noqa: E402
from optimizer.evaluate.tasks import load_task_set  # noqa: E402
from optimizer.merge.engine import MergeEngine  # noqa: E402
from optimizer.recipe import ModelSpec, Recipe  # noqa: E402
from optimizer.zoo import zoo_models  # noqa: E402


def candidates(n: int, base: str, specialists: list[str]) -> list[Recipe]:
    rng = random.Random(0)
    return [Recipe("dare_linear", [ModelSpec(m, {"weight": round(rng.uniform(0.2, 0.8), 3),
                                                 "density": round(rng.uniform(0.3, 1.0), 3)}) for m in specialists],
                   base_model=base, seed=i) for i in range(n)]


class ForwardClock:
    """Seconds spent inside the model's forward passes (hooks on the top-level module)."""

    def __init__(self, model):
        self.total = 0.0
        self._start = 0.0
        model.register_forward_pre_hook(self._pre)
        model.register_forward_hook(self._post)

    def _pre(self, *_):
        self._start = time.perf_counter()

    def _post(self, *_):
        self.total += time.perf_counter() - self._start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("hf", "vllm"), default="hf")
    parser.add_argument("--candidates", type=int, default=6)
    parser.add_argument("--limit", type=int, default=200, help="items per zoo task (a search's subset)")
    parser.add_argument("--disk-candidates", type=int, default=None, help="disk round trips (default: --candidates)")
    parser.add_argument("--no-mergekit", action="store_true")
    args = parser.parse_args()

    models = zoo_models()
    base = str(models.pop("base"))
    specialists = [str(p) for p in models.values()]
    recipes = candidates(args.candidates, base, specialists)
    task_set = load_task_set("zoo", limit=args.limit)
    engine = MergeEngine(base, specialists, device="cpu")
    backend = make_backend(args.backend, base, device="cpu")
    clock = ForwardClock(backend.model) if args.backend == "hf" else None
    evaluate_candidate(backend, task_set, engine, recipes[0])  # warm-up (numba compile, allocator)

    swap, score, forward, means = [], [], [], []
    for recipe in recipes:
        if clock:
            clock.total = 0.0
        result = evaluate_candidate(backend, task_set, engine, recipe)
        assert not result.failed, result.error
        swap.append(result.seconds["swap"])
        score.append(result.seconds["score"])
        forward.append(clock.total if clock else float("nan"))
        means.append(statistics.fmean(s.value for s in result.scores.values()))
    memory = [a + b for a, b in zip(swap, score)]

    def round_trip(write) -> list[float]:
        times = []
        for recipe in recipes[: args.disk_candidates or args.candidates]:
            folder = Path(tempfile.mkdtemp(prefix="mergeopt-disk-", dir=str(ROOT / "runs")))
            try:
                start = time.perf_counter()
                write(recipe, folder)
                fresh = make_backend(args.backend, folder, device="cpu")
                result = evaluate_candidate(fresh, task_set)
                times.append(time.perf_counter() - start)
                assert not result.failed, result.error
                if hasattr(fresh, "close"):
                    fresh.close()
                del fresh
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        return times

    def mergeopt_write(recipe, folder):
        engine.save(recipe, folder)

    def mergekit_write(recipe, folder):
        recipe_path = folder.with_suffix(".yaml")
        recipe_path.write_text(recipe.to_yaml())
        try:
            subprocess.run(["mergekit-yaml", str(recipe_path), str(folder), "--copy-tokenizer"], check=True,
                           capture_output=True)
        finally:
            recipe_path.unlink(missing_ok=True)

    disk_mergeopt = round_trip(mergeopt_write)
    disk_mergekit = [] if (args.no_mergekit or args.backend != "hf" or not shutil.which("mergekit-yaml")) \
        else round_trip(mergekit_write)

    med = statistics.median
    print(f"## Candidate turnaround ({args.backend} backend, zoo, {args.limit} items x 3 tasks, "
          f"{args.candidates} DARE candidates)\n")
    print("| path | median s/candidate | vs in memory |")
    print("|---|---:|---:|")
    print(f"| in memory: build into the live model + score | {med(memory):.3f} | 1.00 |")
    print(f"| disk round trip, mergeopt writer (write, load, score) | {med(disk_mergeopt):.3f} | "
          f"{med(disk_mergeopt) / med(memory):.2f}x slower |")
    if disk_mergekit:
        print(f"| disk round trip, mergekit-yaml (write, load, score) | {med(disk_mergekit):.3f} | "
              f"{med(disk_mergekit) / med(memory):.2f}x slower |")
    share = [s / m for s, m in zip(swap, memory)]
    print(f"\nSplit of an in-memory candidate: merge + swap {med(swap):.3f} s ({100 * med(share):.1f}% of wall time), "
          f"score {med(score):.3f} s.")
    if clock:
        overhead = [(s - f) / s for s, f in zip(score, forward)]
        print(f"Scoring overhead outside the model's forward passes: {100 * med(overhead):.1f}% of scoring time "
              f"(forward {med(forward):.3f} s of {med(score):.3f} s).")
    print(f"Mean score of the candidates: {statistics.fmean(means):.3f} (sanity: the candidates differ: "
          f"{len(set(round(m, 4) for m in means))} distinct means).")
    if hasattr(backend, "close"):
        backend.close()


if __name__ == "__main__":
    main()
