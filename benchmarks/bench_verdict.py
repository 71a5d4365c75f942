"""Does the search pay? Searches against their baselines, judged on the test range (items no run looks at).

For each searcher (per-model CMA-ES, layer-group CMA-ES, TPE) and seed: run ``mergeopt search`` on a space (its
baselines scored first, its finalists validated at the end), then score the validated best (``best.yaml``) and the
best baseline (by search score) on the test range and compare them paired, item by item. Prints one table row per
run and writes the JSON.

    python benchmarks/bench_verdict.py --space search_spaces/demo.yaml --trials 60 --seeds 0 1 2 \
        --out benchmarks/verdict-zoo.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import yaml

SEARCHERS = {
    "cma per model": {"optimizer": {"name": "cma", "popsize": 8, "sigma0": 0.25}, "granularity": "per_model"},
    "cma 2 layer groups": {"optimizer": {"name": "cma", "popsize": 8, "sigma0": 0.25},
                           "granularity": {"layer_groups": 2}},
    "tpe per model": {"optimizer": {"name": "tpe", "n_startup_trials": 10}, "granularity": "per_model"},
}


def test_comparison(run_dir: Path) -> dict:
    """The validated best and the best baseline, scored on the test range and compared item by item."""
    from optimizer.evaluate import stats
    from optimizer.evaluate.scoring import evaluate_candidate, make_backend
    from optimizer.evaluate.tasks import load_task_set
    from optimizer.merge.engine import MergeEngine
    from optimizer.recipe import Recipe
    from optimizer.run import open_run
    from optimizer.search.baselines import best_baseline
    from optimizer.search.validation import coefficients
    from optimizer.study_store import Attr

    space, study = open_run(run_dir)
    test = load_task_set(space.tasks, limit=space.limit, seed=space.seed, holdout=True)
    engine = MergeEngine(space.base_model, space.models)
    label, info = best_baseline(space, study.user_attrs.get(Attr.BASELINES) or {})
    with contextlib.closing(make_backend(space.backend, space.base_model, dtype=space.dtype)) as backend:
        mine = evaluate_candidate(backend, test, engine, Recipe.load(run_dir / "best.yaml")).items()
        if info.get("kind") == "parent":
            backend.load_parent(engine, int(info["parent"]))
            theirs = evaluate_candidate(backend, test).items()
        else:
            theirs = evaluate_candidate(backend, test, engine,
                                        Recipe.from_dict(yaml.safe_load(info["recipe"]))).items()
    coefs = coefficients(space)
    comparison = stats.compare(mine, theirs, coefs)
    return {"baseline": label, "best_test": comparison.a.value, "best_test_se": comparison.a.se,
            "baseline_test": comparison.b.value, "difference": comparison.difference.value,
            "difference_se": comparison.difference.se, "z": comparison.difference.z, "words": comparison.words(),
            "test_items": comparison.difference.n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", type=Path, required=True)
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--minutes", type=float, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--searchers", nargs="+", default=list(SEARCHERS), choices=list(SEARCHERS))
    parser.add_argument("--runs", type=Path, default=Path("/tmp/bench-verdict"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from optimizer.cli import configure_threads
    from optimizer.export import export_run
    from optimizer.run import load_run
    from optimizer.search.loop import run_search
    from optimizer.search.validation import finalist_table
    from optimizer.space import load_space

    configure_threads(None)  # as the command line does: torch, numba and BLAS on the free cores
    data = yaml.safe_load(args.space.read_text())
    rows = []
    for searcher in args.searchers:
        for seed in args.seeds:
            name = f"{data.get('name', args.space.stem)}-{searcher.replace(' ', '-')}-s{seed}"
            budget = {"trials": args.trials, **({"minutes": args.minutes} if args.minutes else {})}
            space_data = {**data, **SEARCHERS[searcher], "name": name, "seed": seed, "budget": budget}
            path = args.runs / f"{name}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            space_data["base_model"] = data["base_model"]
            path.write_text(yaml.safe_dump(space_data, sort_keys=False))
            run_dir = args.runs / name
            start = time.perf_counter()
            space = load_space(path)
            run_search(space, run_dir, progress=False)
            seconds = time.perf_counter() - start
            exported = export_run(run_dir)
            run = load_run(run_dir)
            best = next(f for f in finalist_table(run.space, run.study, run.records) if f.trial == exported.best.trial)
            row = {"searcher": searcher, "seed": seed, "trials": len(run.records), "seconds": round(seconds, 1),
                   "search": best.search, "validation": best.validation, "line": exported.line,
                   **test_comparison(run_dir)}
            rows.append(row)
            print(f"| {searcher} | {seed} | {row['trials']} | {row['seconds']:.0f} | {row['search']:.3f} | "
                  f"{row['validation']:.3f} | {row['best_test']:.3f} | {row['baseline']} {row['baseline_test']:.3f} | "
                  f"{row['difference']:+.3f} +- {row['difference_se']:.3f} | {row['words']} |", flush=True)
            print(f"    {row['line']}", flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
