"""DARE's drop-rate experiment (Yu et al. 2024, Fig. 2-3) on the smollm2 family.

    python benchmarks/dare_droprate.py --items 40 --seeds 0 1 2 [--cache DIR] [--out benchmarks/dare-droprate.json]

For each fine-tune of the family, its own skill (held-out split, ``--items`` fixed items) is scored with its
delta sparsified at drop rate p in {0, .1, .3, .5, .7, .9, .95, .99}:

* DARE with the 1/(1-p) rescale (``dare_linear``, one model, weight 1, ``rescale: dare``), one mask per seed;
* DARE without rescale (``rescale: none``), the same masks;
* magnitude pruning at the same density: the largest |delta| elements of each tensor kept, no rescale
  (deterministic, so one "seed").

Each point is the mean over seeds of the exact match, with the standard error over the items of one score
(binomial; the items are the same for every seed) and, with several seeds, the standard deviation over the seeds
(the mask's own noise). Prints a markdown table, writes the raw
numbers as JSON and a small PNG plot (``--plot``). The family must be built first
(``mergeopt zoo --family smollm2 --build``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

from optimizer.evaluate.scoring import evaluate_candidate, make_backend  # noqa: E402
from optimizer.evaluate.tasks import TaskSet, load_task_set  # noqa: E402
from optimizer.merge.engine import MergeEngine  # noqa: E402
from optimizer.recipe import ModelSpec, Recipe  # noqa: E402
from optimizer.zoo import smollm2  # noqa: E402

DROP_RATES = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.99)
VARIANTS = ("dare_rescale", "dare_no_rescale", "magnitude")


def skill_task(task: str, items: int) -> TaskSet:
    held = load_task_set("smollm2-heldout", limit=items, seed=0)
    return TaskSet([t for t in held.tasks if t.spec.name == task], seed=0, source="smollm2-heldout")


def dare_recipe(base: Path, model: Path, drop_rate: float, rescale: str, seed: int) -> Recipe:
    return Recipe(merge_method="dare_linear", base_model=str(base),
                  models=[ModelSpec(str(model), {"weight": 1.0, "density": 1.0 - drop_rate})],
                  seed=seed, rescale=rescale)


def magnitude_pruned(base: Path, model: Path, density: float):
    """(name, tensor) of base + the top ``density`` fraction of each tensor's delta by magnitude."""
    from safetensors import safe_open

    with safe_open(base / "model.safetensors", "pt") as b, safe_open(model / "model.safetensors", "pt") as m:
        for name in b.keys():
            base_tensor = b.get_tensor(name).float()
            delta = m.get_tensor(name).float() - base_tensor
            if density < 1.0 and delta.abs().max() > 0:
                keep = max(1, round(density * delta.numel()))
                threshold = delta.abs().flatten().kthvalue(delta.numel() - keep + 1).values
                delta = torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))
            yield name, base_tensor + delta


def score_one(backend, tasks: TaskSet, engine=None, recipe=None) -> tuple[float, float]:
    result = evaluate_candidate(backend, tasks, engine, recipe)
    if result.failed:
        raise RuntimeError(result.error)
    (s,) = result.scores.values()
    return s.value, s.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=40, help="held-out items of each skill (fixed subset)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="DARE mask seeds")
    parser.add_argument("--drop-rates", type=float, nargs="+", default=list(DROP_RATES))
    parser.add_argument("--models", nargs="+", default=list(smollm2.SPECIALIST_TASK))
    parser.add_argument("--cache", type=Path, default=None, help="cache folder (default ~/.cache/mergeopt)")
    parser.add_argument("--reduced", action="store_true", help="the reduced (CI) family")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "dare-droprate.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "benchmarks" / "dare-droprate.png")
    args = parser.parse_args()
    torch.manual_seed(0)
    folders = smollm2.family_models(args.cache, reduced=args.reduced)
    base = folders["base"]
    backend = make_backend("hf", base, device="cpu", batch_size=64)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}  # resumable, point by point
    start = time.perf_counter()
    for name in args.models:
        task = smollm2.SPECIALIST_TASK[name]
        tasks = skill_task(task, args.items)
        engine = MergeEngine(base, [folders[name]])
        per_model = results.setdefault(name, {"task": task, "items": args.items, "points": {}})
        key_base = "base"
        if key_base not in per_model["points"]:
            backend.load_state(magnitude_pruned(base, base, 1.0))
            per_model["points"][key_base] = [score_one(backend, tasks)]
        for p in args.drop_rates:
            for variant in VARIANTS:
                key = f"{variant}@{p:g}"
                done = per_model["points"].setdefault(key, [])
                seeds = [0] if (variant == "magnitude" or p == 0.0) else args.seeds
                for seed in seeds[len(done):]:
                    if variant == "magnitude":
                        backend.load_state(magnitude_pruned(base, folders[name], 1.0 - p))
                        done.append(score_one(backend, tasks))
                    else:
                        recipe = dare_recipe(base, folders[name], p, "dare" if variant == "dare_rescale" else "none", seed)
                        done.append(score_one(backend, tasks, engine, recipe))
                    args.out.write_text(json.dumps(results, indent=1))
                    print(f"[{time.perf_counter() - start:6.0f}s] {name} {key} seed {seed}: {done[-1][0]:.3f}",
                          file=sys.stderr, flush=True)
        del engine
    print(table(results))
    plot(results, args.plot)


def summary(points: list) -> tuple[float, float, int, float]:
    """Mean over seeds, the items' standard error of one score (binomial, averaged over seeds: the items are the
    same for every seed), the seed count, and the standard deviation over seeds (the mask's own noise)."""
    values = [v for v, _ in points]
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), statistics.fmean(se for _, se in points), len(values), spread


def table(results: dict) -> str:
    lines = []
    for name, data in results.items():
        rates = sorted({float(k.split("@")[1]) for k in data["points"] if "@" in k})
        base_mean, base_se, _, _ = summary(data["points"]["base"])
        lines += [f"\n{name} on {data['task']} ({data['items']} held-out items; base {base_mean:.3f} +- {base_se:.3f})\n",
                  "| p | " + " | ".join(VARIANTS) + " |", "|---" * (len(VARIANTS) + 1) + "|"]
        for p in rates:
            cells = []
            for variant in VARIANTS:
                points = data["points"].get(f"{variant}@{p:g}")
                if not points:
                    cells.append("")
                    continue
                mean, se, n, spread = summary(points)
                cells.append(f"{mean:.3f} +- {se:.3f}" + (f" ({n} seeds, sd {spread:.3f})" if n > 1 else ""))
            lines.append(f"| {p:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(3.4 * len(results), 3.0), sharey=True, squeeze=False)
    for ax, (name, data) in zip(axes[0], results.items()):
        for variant, style in zip(VARIANTS, ("o-", "s--", "^:")):
            rates = sorted(float(k.split("@")[1]) for k in data["points"] if k.startswith(variant + "@"))
            stats = [summary(data["points"][f"{variant}@{p:g}"]) for p in rates]
            ax.errorbar(rates, [m for m, _, _, _ in stats], yerr=[s for _, s, _, _ in stats], fmt=style, ms=3,
                        capsize=2, label=variant.replace("_", " "))
        ax.axhline(summary(data["points"]["base"])[0], color="gray", lw=0.8, label="base")
        ax.set_title(f"{name} ({data['task']})", fontsize=9)
        ax.set_xlabel("drop rate p", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("exact match (held-out)", fontsize=8)
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    main()
