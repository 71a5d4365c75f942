"""Merging the smollm2 family: parents, a small grid of four methods, and mergeopt searches, on held-out items.

    python benchmarks/smollm2_merges.py --search-items 40 --heldout-items 200 --seeds 0 1 2 \
        --parts parents grid search --search-trials 20 [--out benchmarks/smollm2-merges.json]

* parents: the base and each fine-tune;
* grid: task arithmetic (weight), TIES (weight x density), DARE-linear and DARE-TIES (weight x drop rate), one
  setting shared by the three fine-tunes; each method's best setting is chosen by the mean over the four tasks on
  the search split (``--search-items`` per task, mask seed 0), then scored on the held-out split with every mask
  seed (task arithmetic and TIES are deterministic: one score);
* search: mergeopt searches (CMA-ES per model and per layer group, NSGA-II per model), ``--search-trials`` each,
  one per seed, scored on the same search split; the best recipe by the mean goes to the held-out split.

Scores are exact match per task on the held-out split (``--heldout-items`` fixed items per task; the capitals task
has 32); a score on n items has a binomial standard error of about sqrt(p(1-p)/n). Results are saved after
every evaluation (``--out``; a rerun skips what is there) and printed as markdown tables.
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

from optimizer.evaluate.scoring import evaluate_candidate, make_backend  # noqa: E402
from optimizer.evaluate.tasks import load_task_set  # noqa: E402
from optimizer.merge.checkpoint import load_state_dict  # noqa: E402
from optimizer.merge.engine import MergeEngine  # noqa: E402
from optimizer.recipe import ModelSpec, Recipe  # noqa: E402
from optimizer.zoo import smollm2  # noqa: E402

TASKS = ["add", "mul", "letter", "capital"]
WEIGHTS = (0.5, 0.8, 1.0)
DENSITIES = (0.3, 0.5, 0.7)
GRID = {
    "task_arithmetic": [{"weight": w} for w in (0.3, 0.5, 0.7, 0.8, 0.9, 1.0, 1.2)],
    **{method: [{"weight": w, "density": d} for w, d in itertools.product(WEIGHTS, DENSITIES)]
       for method in ("ties", "dare_linear", "dare_ties")},
}
RANDOM_METHODS = ("dare_linear", "dare_ties")
SEARCHES = {
    "cma per_model": {"granularity": "per_model", "optimizer": {"name": "cma", "popsize": 6, "sigma0": 0.25}},
    "cma layer_groups 3": {"granularity": {"layer_groups": 3}, "optimizer": {"name": "cma", "popsize": 6, "sigma0": 0.25}},
    "nsga2 per_model": {"granularity": "per_model", "optimizer": {"name": "nsga2", "population_size": 8}},
}


def mean(scores: dict[str, float]) -> float:
    return statistics.fmean(scores[t] for t in TASKS)


class Scorer:
    """One engine over the family and one live model; scores recipes or parents on either split."""

    def __init__(self, folders: dict[str, Path], search_items: int, heldout_items: int):
        self.folders = folders
        self.engine = MergeEngine(folders["base"], [folders[m] for m in smollm2.SPECIALIST_TASK])
        self.backend = make_backend("hf", folders["base"], device="cpu", batch_size=64)
        self.splits = {"search": load_task_set("smollm2", limit=search_items, seed=0),
                       "heldout": load_task_set("smollm2-heldout", limit=heldout_items, seed=0)}

    def recipe(self, recipe: Recipe, split: str) -> dict[str, float]:
        result = evaluate_candidate(self.backend, self.splits[split], self.engine, recipe)
        return {k: s.value for k, s in result.scores.items()}

    def parent(self, name: str) -> dict[str, float]:
        self.backend.load_state(load_state_dict(self.folders[name]).items())
        return {k: s.value for k, s in evaluate_candidate(self.backend, self.splits["heldout"]).scores.items()}


def grid_recipe(folders: dict[str, Path], method: str, setting: dict, seed: int) -> Recipe:
    models = [ModelSpec(str(folders[m]), dict(setting)) for m in smollm2.SPECIALIST_TASK]
    return Recipe(merge_method=method, base_model=str(folders["base"]), models=models, seed=seed, rescale="dare")


def run_search_once(folders: dict[str, Path], label: str, seed: int, trials: int, search_items: int,
                    workdir: Path) -> dict:
    from optimizer.search.loop import run_search
    from optimizer.space import parse_space

    settings = SEARCHES[label]
    space_dict = {"name": label.replace(" ", "-"), "base_model": str(folders["base"]),
                  "models": [str(folders[m]) for m in smollm2.SPECIALIST_TASK], "merge_method": "dare_ties",
                  "bounds": {"weight": [0.0, 1.2], "drop_rate": [0.0, 0.9]}, "objectives": TASKS,
                  "tasks": "smollm2", "limit": search_items, "seed": seed, "budget": {"trials": trials},
                  **copy.deepcopy(settings)}
    space = parse_space(space_dict, source="bench", default_name=space_dict["name"])
    start = time.perf_counter()
    result = run_search(space, workdir / f"{space.name}-{seed}", progress=False)
    done = [t for t in result.study.trials if t.user_attrs.get("scores") and t.user_attrs.get("fidelity") == "full"]
    top = max(done, key=lambda t: mean({k: v["value"] for k, v in t.user_attrs["scores"].items()}))
    return {"seed": seed, "trials": len(done), "seconds": time.perf_counter() - start,
            "search_scores": {k: v["value"] for k, v in top.user_attrs["scores"].items()},
            "recipe": top.user_attrs["recipe"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--search-items", type=int, default=40)
    parser.add_argument("--heldout-items", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--parts", nargs="+", default=["parents", "grid", "search"])
    parser.add_argument("--searches", nargs="+", default=list(SEARCHES))
    parser.add_argument("--search-trials", type=int, default=20)
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--reduced", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "smollm2-merges.json")
    args = parser.parse_args()
    folders = smollm2.family_models(args.cache, reduced=args.reduced)
    scorer = Scorer(folders, args.search_items, args.heldout_items)
    raw = json.loads(args.out.read_text()) if args.out.is_file() else {}
    raw["args"] = {k: str(v) for k, v in vars(args).items()}
    save = lambda: args.out.write_text(json.dumps(raw, indent=1))  # noqa: E731
    start = time.perf_counter()

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f}s] {text}", file=sys.stderr, flush=True)

    if "parents" in args.parts:
        parents = raw.setdefault("parents", {})
        for name in folders:
            if name not in parents:
                parents[name] = scorer.parent(name)
                save()
                log(f"parent {name}: {parents[name]}")
    if "grid" in args.parts:
        grid = raw.setdefault("grid", {})
        for method, settings in GRID.items():
            entry = grid.setdefault(method, {"search": [], "heldout": {}})
            for setting in settings[len(entry["search"]):]:
                scores = scorer.recipe(grid_recipe(folders, method, setting, 0), "search")
                entry["search"].append({"setting": setting, "scores": scores})
                save()
                log(f"grid {method} {setting}: search mean {mean(scores):.3f}")
            best = max(entry["search"], key=lambda e: mean(e["scores"]))
            entry["best"] = best["setting"]
            for seed in (args.seeds if method in RANDOM_METHODS else [0]):
                if str(seed) not in entry["heldout"]:
                    entry["heldout"][str(seed)] = scorer.recipe(grid_recipe(folders, method, best["setting"], seed),
                                                                "heldout")
                    save()
                    log(f"grid {method} best {best['setting']} seed {seed}: held-out mean "
                        f"{mean(entry['heldout'][str(seed)]):.3f}")
    if "search" in args.parts:
        searches = raw.setdefault("search", {})
        work = Path(tempfile.mkdtemp(prefix="mergeopt-smollm2-"))
        for seed, label in itertools.product(args.seeds, args.searches):  # seed-major: a cut run has every search
            runs = searches.setdefault(label, [])
            if any(run["seed"] == seed for run in runs):
                continue
            run = run_search_once(folders, label, seed, args.search_trials, args.search_items, work)
            recipe = Recipe.from_dict(run["recipe"]) if isinstance(run["recipe"], dict) else None
            if recipe is None:
                import yaml

                recipe = Recipe.from_dict(yaml.safe_load(run["recipe"]))
            run["heldout"] = scorer.recipe(recipe, "heldout")
            runs.append(run)
            save()
            log(f"search {label} seed {seed}: {run['trials']} trials in {run['seconds']:.0f}s, "
                f"held-out mean {mean(run['heldout']):.3f}")
    print(tables(raw))


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} +- {statistics.stdev(values) / len(values) ** 0.5:.3f}"


def tables(raw: dict) -> str:
    lines = ["| model / merge | " + " | ".join(TASKS) + " | mean | seeds |", "|---" * (len(TASKS) + 3) + "|"]
    for name, scores in raw.get("parents", {}).items():
        lines.append(f"| {name} | " + " | ".join(f"{scores[t]:.3f}" for t in TASKS) + f" | {mean(scores):.3f} | - |")
    for method, entry in raw.get("grid", {}).items():
        runs = list(entry.get("heldout", {}).values())
        if runs:
            lines.append(f"| {method} {entry['best']} | " + " | ".join(_cell([r[t] for r in runs]) for t in TASKS)
                         + f" | {_cell([mean(r) for r in runs])} | {len(runs)} |")
    for label, runs in raw.get("search", {}).items():
        if runs:
            held = [r["heldout"] for r in runs]
            lines.append(f"| mergeopt {label} ({runs[0]['trials']} trials) | "
                         + " | ".join(_cell([r[t] for r in held]) for t in TASKS)
                         + f" | {_cell([mean(r) for r in held])} | {len(runs)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
