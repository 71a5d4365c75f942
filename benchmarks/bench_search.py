"""Search quality on the zoo: optimisers, granularities, and the searched recipe against parents and a grid.

    python benchmarks/bench_search.py --trials 80 --seeds 0 1 2 [--out benchmarks/search-results.json]

Every search runs on the zoo's tasks with ``limit`` items per task (the *search split*); its best recipe (by the
mean of tasks) is then re-scored on the items that split leaves out (the *held-out split*), so the comparison with
the parents is not flattered by selecting on the same items. Parts:

1. optimisers: cma, tpe, nsga2 (multi-objective over add/reverse/sort) and random, ``--seeds`` each, per-model
   genes; best-so-far of the mean against evaluations, and the hypervolume of the per-task front (reference 0);
2. multi-objective: hypervolume against evaluations for NSGA-II, TPE and random at a larger budget;
3. granularity: per_model vs layer_groups 2 vs per_layer with CMA-ES at the same budget;
4. the demo space (``search_spaces/demo.yaml``) against the parents and the best global DARE merge of a small grid
   (one weight and one drop rate shared by all models), both on the held-out split.

Prints markdown tables; ``--out`` keeps the raw curves as JSON.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import yaml  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from optimizer.evaluate.scoring import evaluate_candidate, make_backend  # noqa: E402
from optimizer.evaluate.tasks import load_task_set  # noqa: E402
from optimizer.merge.engine import MergeEngine  # noqa: E402
from optimizer.recipe import Recipe  # noqa: E402
from optimizer.search.loop import run_search  # noqa: E402
from optimizer.pareto import hypervolume  # noqa: E402
from optimizer.space import parse_space  # noqa: E402

TASKS = ["add", "reverse", "sort"]
# CMA-ES as in the demo; NSGA-II with a population that fits the budget (Optuna's default, 50, would spend most
# of a 60-trial budget on its random first generation)
OPTIMIZER_SETTINGS = {"cma": {"popsize": 8, "sigma0": 0.25}, "nsga2": {"population_size": 12}}
BASE_SPACE = {
    "base_model": "zoo:base", "models": ["zoo:adder", "zoo:reverser", "zoo:sorter"], "merge_method": "dare_linear",
    "granularity": "per_model", "bounds": {"weight": [0.0, 1.0], "drop_rate": [0.0, 0.9]},
    "objectives": TASKS, "tasks": "zoo", "limit": 200,
}


def search(space_dict: dict, seed: int, trials: int, workdir: Path) -> dict:
    space_dict = copy.deepcopy(space_dict) | {"seed": seed, "budget": {"trials": trials}}
    space = parse_space(space_dict, source="bench", default_name=space_dict.get("name", "bench"))
    run_dir = workdir / f"{space.name}-{space.optimizer}-{seed}"
    start = time.perf_counter()
    result = run_search(space, run_dir, progress=False)
    seconds = time.perf_counter() - start
    trials_done = [t for t in result.study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE
                   and t.user_attrs.get("fidelity") == "full"]
    trials_done.sort(key=lambda t: t.number)
    means, points, curve, hv_curve, best = [], [], [], [], -1.0
    for t in trials_done:
        scores = {k: v["value"] for k, v in t.user_attrs["scores"].items()}
        mean = statistics.fmean(scores[k] for k in TASKS)
        best = max(best, mean)
        means.append(mean)
        curve.append(best)
        points.append([scores[k] for k in TASKS])
        hv_curve.append(hypervolume(points, [0.0] * len(TASKS)))
    top = max(trials_done, key=lambda t: statistics.fmean(t.user_attrs["scores"][k]["value"] for k in TASKS))
    return {"space": space.name, "optimizer": space.optimizer, "seed": seed, "curve": curve, "hv": hv_curve,
            "best_recipe": top.user_attrs["recipe"], "seconds": seconds, "dimension": space.dimension,
            "parents": result.parents}


class HeldOut:
    """Scores recipes and parents on the held-out split with one engine and one live model."""

    def __init__(self, limit: int, seed: int = 0):
        probe = Recipe.from_dict(yaml.safe_load(_grid_recipe(0.5, 0.0)))
        probe.resolve_paths(ROOT)
        self.engine = MergeEngine.for_recipe(probe, device="cpu")
        self.backend = make_backend("hf", self.engine.base_path, device="cpu")
        self.tasks = load_task_set("zoo", limit=limit, seed=seed, holdout=True)
        self.search_tasks = load_task_set("zoo", limit=limit, seed=seed)

    def recipe(self, text: str, search_split: bool = False) -> dict[str, float]:
        recipe = Recipe.from_dict(yaml.safe_load(text))
        recipe.resolve_paths(ROOT)
        result = evaluate_candidate(self.backend, self.search_tasks if search_split else self.tasks, self.engine, recipe)
        return {k: s.value for k, s in result.scores.items()}

    def model(self, folder: str) -> dict[str, float]:
        from optimizer.merge.checkpoint import load_state_dict

        self.backend.load_state(load_state_dict(folder).items())
        return {k: s.value for k, s in evaluate_candidate(self.backend, self.tasks).scores.items()}


def _grid_recipe(weight: float, drop_rate: float, seed: int = 0) -> str:
    models = [{"model": f"zoo:{m}", "parameters": {"weight": weight, "density": round(1 - drop_rate, 6)}}
              for m in ("adder", "reverser", "sorter")]
    return yaml.safe_dump({"merge_method": "dare_linear", "base_model": "zoo:base", "models": models,
                           "dtype": "float32", "mergeopt": {"seed": seed, "rescale": "dare"}}, sort_keys=False)


def mean(scores: dict[str, float]) -> float:
    return statistics.fmean(scores[k] for k in TASKS)


def evals_to_fraction(curve: list[float], target: float) -> int | None:
    return next((i + 1 for i, v in enumerate(curve) if v >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=80)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--optimizers", nargs="+", default=["cma", "tpe", "nsga2", "random"])
    parser.add_argument("--granularities", nargs="+", default=["per_model", "layer_groups:2", "per_layer"])
    parser.add_argument("--parts", nargs="+", default=["optimizers", "mo", "granularity", "demo"])
    parser.add_argument("--mo-trials", type=int, default=120, help="budget of the multi-objective comparison")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    raw: dict = {"args": vars(args) | {"out": str(args.out)}}
    work = Path(tempfile.mkdtemp(prefix="mergeopt-bench-search-"))
    held = HeldOut(BASE_SPACE["limit"])

    if "optimizers" in args.parts:
        runs = []
        for name in args.optimizers:
            for seed in args.seeds:
                settings = {"name": name} | OPTIMIZER_SETTINGS.get(name, {})
                runs.append(search(BASE_SPACE | {"name": "opt", "optimizer": settings}, seed, args.trials, work))
                print(f"# {name} seed {seed}: best {runs[-1]['curve'][-1]:.3f} in {runs[-1]['seconds']:.0f} s",
                      file=sys.stderr)
        raw["optimizers"] = runs
        best_known = max(r["curve"][-1] for r in runs)
        print(f"\n## Optimisers ({args.trials} trials, seeds {args.seeds}, per-model dare_linear, 6 genes; "
              f"search split 200 items/task)\n")
        print(f"Best known mean on the search split: {best_known:.3f}; 95% of it: {0.95 * best_known:.3f}.\n")
        checkpoints = [n for n in (10, 20, 40, 60, 80, 120, 200) if n <= args.trials]
        print("| optimiser | " + " | ".join(f"best@{n}" for n in checkpoints) + " | evals to 95% (per seed) | "
              f"hypervolume@{args.trials} | held-out mean of best |")
        print("|---|" + "---:|" * (len(checkpoints) + 3))
        for name in args.optimizers:
            mine = [r for r in runs if r["optimizer"] == name]
            cells = [statistics.fmean(r["curve"][min(n, len(r["curve"])) - 1] for r in mine) for n in checkpoints]
            to95 = [evals_to_fraction(r["curve"], 0.95 * best_known) for r in mine]
            hv = statistics.fmean(r["hv"][-1] for r in mine)
            held_means = [mean(held.recipe(r["best_recipe"])) for r in mine]
            for r, m in zip(mine, held_means):
                r["held_out_mean"] = m
            print(f"| {name} | " + " | ".join(f"{c:.3f}" for c in cells) + " | "
                  + ", ".join("-" if v is None else str(v) for v in to95)
                  + f" | {hv:.4f} | {statistics.fmean(held_means):.3f} |")

    if "mo" in args.parts:
        runs = []
        for name in ("nsga2", "tpe", "random"):
            for seed in args.seeds:
                settings = {"name": name} | OPTIMIZER_SETTINGS.get(name, {})
                runs.append(search(BASE_SPACE | {"name": "mo", "optimizer": settings}, seed, args.mo_trials, work))
                print(f"# mo {name} seed {seed}: hypervolume {runs[-1]['hv'][-1]:.4f}", file=sys.stderr)
        raw["multi_objective"] = runs
        marks = [n for n in (20, 40, 60, 90, 120, 200) if n <= args.mo_trials]
        print(f"\n## Multi-objective: hypervolume of the (add, reverse, sort) front against evaluations "
              f"(reference 0, per-model genes, seeds {args.seeds}; mean ± sd over seeds)\n")
        print("| optimiser | " + " | ".join(f"HV@{n}" for n in marks) + " |")
        print("|---|" + "---:|" * len(marks))
        for name in ("nsga2", "tpe", "random"):
            mine = [r for r in runs if r["optimizer"] == name]
            cells = []
            for n in marks:
                values = [r["hv"][min(n, len(r["hv"])) - 1] for r in mine]
                cells.append(f"{statistics.fmean(values):.4f} ± {statistics.pstdev(values):.4f}")
            print(f"| {name} | " + " | ".join(cells) + " |")

    if "granularity" in args.parts:
        runs = []
        for g in args.granularities:
            granularity = {"layer_groups": int(g.split(":")[1])} if g.startswith("layer_groups") else g
            for seed in args.seeds:
                space = BASE_SPACE | {"name": g.replace(":", ""), "granularity": granularity,
                                      "optimizer": {"name": "cma", "popsize": 8, "sigma0": 0.25}}
                runs.append(search(space, seed, args.trials, work) | {"granularity": g})
                runs[-1]["held_out_mean"] = mean(held.recipe(runs[-1]["best_recipe"]))
                print(f"# {g} seed {seed}: best {runs[-1]['curve'][-1]:.3f}", file=sys.stderr)
        raw["granularity"] = runs
        print(f"\n## Granularity (CMA-ES, {args.trials} trials, seeds {args.seeds})\n")
        print("| granularity | genes | best on search split (mean ± sd) | held-out mean of best (mean ± sd) |")
        print("|---|---:|---:|---:|")
        for g in args.granularities:
            mine = [r for r in runs if r["granularity"] == g]
            best = [r["curve"][-1] for r in mine]
            ho = [r["held_out_mean"] for r in mine]
            print(f"| {g} | {mine[0]['dimension']} | {statistics.fmean(best):.3f} ± {statistics.pstdev(best):.3f} | "
                  f"{statistics.fmean(ho):.3f} ± {statistics.pstdev(ho):.3f} |")

    if "demo" in args.parts:
        demo = yaml.safe_load((ROOT / "search_spaces" / "demo.yaml").read_text())
        runs = []
        for seed in args.seeds:
            runs.append(search(demo | {"name": "demo"}, seed, demo["budget"]["trials"], work))
            runs[-1]["held_out"] = held.recipe(runs[-1]["best_recipe"])
            print(f"# demo seed {seed}: held-out {mean(runs[-1]['held_out']):.3f}", file=sys.stderr)
        raw["demo"] = runs
        grid = []
        for weight, drop in itertools.product((0.2, 0.4, 0.6, 0.8, 1.0), (0.0, 0.3, 0.5, 0.7)):
            text = _grid_recipe(weight, drop)
            grid.append((mean(held.recipe(text, search_split=True)), weight, drop, text))
        grid_best = max(grid)
        grid_held = held.recipe(grid_best[3])
        parents = {name: held.model(info["path"]) for name, info in runs[0]["parents"].items()}
        raw["grid"] = [g[:3] for g in grid]
        print(f"\n## Demo (`search_spaces/demo.yaml`, {demo['budget']['trials']} trials, seeds {args.seeds}) "
              f"vs parents and the best global grid merge, on the held-out split\n")
        print("| model | " + " | ".join(TASKS) + " | mean |")
        print("|---|" + "---:|" * (len(TASKS) + 1))
        for name, scores in parents.items():
            print(f"| {name} | " + " | ".join(f"{scores[k]:.3f}" for k in TASKS) + f" | {mean(scores):.3f} |")
        print(f"| best global grid (w={grid_best[1]}, p={grid_best[2]}; chosen on the search split) | "
              + " | ".join(f"{grid_held[k]:.3f}" for k in TASKS) + f" | {mean(grid_held):.3f} |")
        for r in runs:
            s = r["held_out"]
            print(f"| demo best, seed {r['seed']} | " + " | ".join(f"{s[k]:.3f}" for k in TASKS)
                  + f" | {mean(s):.3f} |")
        demo_mean = statistics.fmean(mean(r["held_out"]) for r in runs)
        print(f"\nDemo best, mean over seeds: {demo_mean:.3f}; best parent {max(mean(s) for s in parents.values()):.3f}; "
              f"best grid {mean(grid_held):.3f}. Demo wall time per run: "
              + ", ".join(f"{r['seconds']:.0f} s" for r in runs) + ".")
    if args.out:
        args.out.write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
