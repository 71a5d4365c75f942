"""Score the zoo's models and a small grid of merges of them on the held-out zoo tasks; print a markdown table.

    OMP_NUM_THREADS=1 python benchmarks/zoo_table.py [--zoo DIR] [--n 200] [--threads 1]

Rows: each zoo model (base and the specialists) on each task plus the mean; the best task-arithmetic merge over
the grid ``{weights}^3`` (one weight per specialist); and DARE (``dare_linear``, kept elements rescaled by
1/(1-p)) at those best weights for each drop rate ``p``, averaged over mask seeds. Merges are built with
mergeopt's MergeEngine straight into one live model; if the engine cannot be imported the script falls back to
plain torch task arithmetic (and DARE with torch masks) and says so in the table's notes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as transformers_logging

ROOT = Path(__file__).resolve().parents[1]

from optimizer.evaluate.generation import exact_match_score  # noqa: E402
from optimizer.zoo import SPECIALIST_TASK, TASK_MAX_NEW_TOKENS, zoo_models, zoo_tasks  # noqa: E402

Weights = tuple[float, ...]
Builder = Callable[[Weights, float, int], None]  # (weights, drop_rate, mask seed) -> writes into the live model


def _torch_builder(model: torch.nn.Module, folders: dict[str, Path]) -> Builder:
    """Fallback: base + sum_i w_i * DARE(delta_i) with torch's own random masks."""
    states = {name: AutoModelForCausalLM.from_pretrained(path).state_dict() for name, path in folders.items()}
    base = states.pop("base")
    deltas = [{k: state[k] - base[k] for k in base} for state in states.values()]

    @torch.no_grad()
    def build(weights: Weights, drop_rate: float, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        merged = {}
        for key, value in base.items():
            total = value.clone()
            for weight, delta in zip(weights, deltas):
                part = delta[key]
                if drop_rate > 0:
                    keep = torch.rand(part.shape, generator=generator) >= drop_rate
                    part = part * keep / (1.0 - drop_rate)
                total += weight * part
            merged[key] = total
        model.load_state_dict(merged)

    return build


def _engine_builder(model: torch.nn.Module, folders: dict[str, Path]) -> Builder:
    from optimizer.merge.engine import MergeEngine
    from optimizer.recipe import ModelSpec, Recipe

    specialists = [str(path) for name, path in folders.items() if name != "base"]
    engine = MergeEngine(base=str(folders["base"]), models=specialists, device="cpu")

    def build(weights: Weights, drop_rate: float, seed: int) -> None:
        method = "dare_linear" if drop_rate > 0 else "task_arithmetic"
        parameters = [{"weight": w, **({"density": 1.0 - drop_rate} if drop_rate > 0 else {})} for w in weights]
        recipe = Recipe(
            merge_method=method,
            base_model=str(folders["base"]),
            models=[ModelSpec(path, params) for path, params in zip(specialists, parameters)],
            seed=seed,
            rescale="dare",
        )
        engine.build_into(recipe, model)

    return build


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=None, help="zoo folder (default: the shipped one)")
    parser.add_argument("--n", type=int, default=200, help="items per task")
    parser.add_argument("--grid", default="0.3,0.5,0.7,1.0", help="task-arithmetic weights per specialist")
    parser.add_argument("--drop-rates", default="0.3,0.5", help="DARE drop rates tried at the best weights")
    parser.add_argument("--mask-seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--torch-merge", action="store_true", help="skip the merge engine, use plain torch")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers_logging.disable_progress_bar()
    started = time.perf_counter()

    folders = zoo_models(args.zoo)
    tasks = {name: [json.loads(line) for line in path.read_text().splitlines()[: args.n]]
             for name, path in zoo_tasks(args.zoo).items()}
    tokenizer = AutoTokenizer.from_pretrained(folders["base"])

    def score(model: torch.nn.Module) -> dict[str, float]:
        row = {task: exact_match_score(model, tokenizer, items, TASK_MAX_NEW_TOKENS[task])[0]
               for task, items in tasks.items()}
        row["mean"] = sum(row.values()) / len(tasks)
        return row

    rows: list[tuple[str, dict[str, float]]] = []
    for name, path in folders.items():
        rows.append((name, score(AutoModelForCausalLM.from_pretrained(path).eval())))

    live = AutoModelForCausalLM.from_pretrained(folders["base"]).eval()
    merge_note = "merges built with optimizer.merge.engine.MergeEngine (task_arithmetic / dare_linear, rescale dare)"
    build: Builder
    if args.torch_merge:
        build, merge_note = _torch_builder(live, folders), "merges built with plain torch (--torch-merge)"
    else:
        try:
            build = _engine_builder(live, folders)
        except Exception as error:  # the engine is optional here: the table must still come out
            build = _torch_builder(live, folders)
            merge_note = f"merge engine unavailable ({type(error).__name__}: {error}); merges built with plain torch"

    grid = [float(w) for w in args.grid.split(",")]
    best_weights: Weights | None = None
    best_row: dict[str, float] = {}
    for weights in itertools.product(grid, repeat=len(SPECIALIST_TASK)):
        build(weights, 0.0, 0)
        row = score(live)
        if best_weights is None or row["mean"] > best_row["mean"]:
            best_weights, best_row = weights, row
    assert best_weights is not None
    label = "/".join(f"{w:g}" for w in best_weights)
    rows.append((f"task arithmetic, best of {len(grid)}^{len(SPECIALIST_TASK)} grid (w={label})", best_row))

    for drop_rate in [float(p) for p in args.drop_rates.split(",") if p.strip()]:
        per_seed = []
        for seed in range(args.mask_seeds):
            build(best_weights, drop_rate, seed)
            per_seed.append(score(live))
        mean_row = {key: sum(r[key] for r in per_seed) / len(per_seed) for key in per_seed[0]}
        spread = max(r["mean"] for r in per_seed) - min(r["mean"] for r in per_seed)
        rows.append((f"DARE p={drop_rate:g}, w={label}, mean of {args.mask_seeds} seeds "
                     f"(seed range {spread:.3f})", mean_row))

    columns = [*tasks, "mean"]
    print("| model | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for name, row in rows:
        print(f"| {name} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")
    parents_best = max(row["mean"] for name, row in rows if name in folders)
    print()
    print(f"- exact match on {args.n} held-out items per task (standard error of one task ~0.035 at n=200)")
    print(f"- best merge minus best parent (mean of tasks): {best_row['mean'] - parents_best:+.3f}")
    print(f"- {merge_note}")
    print(f"- {time.perf_counter() - started:.0f}s with {args.threads} thread(s)")


if __name__ == "__main__":
    main()
