"""Task arithmetic at shared weights below the default sweep, on a mix run's search, validation and test ranges,
against the run's validated best (paired, item by item).

    python benchmarks/mix_ta_low.py /tmp/w20/bv-mix/mix-cma-per-model-s0 benchmarks/verdict-mix-ta-low.json
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path


def main() -> None:
    from optimizer.cli import configure_threads

    configure_threads(None)
    from optimizer.evaluate import stats
    from optimizer.evaluate.scoring import evaluate_candidate, make_backend
    from optimizer.evaluate.tasks import load_task_set
    from optimizer.merge.engine import MergeEngine
    from optimizer.recipe import Recipe
    from optimizer.run import open_run
    from optimizer.search.baselines import _shared_weight_recipe
    from optimizer.search.validation import coefficients

    run_dir, out_path = Path(sys.argv[1]), Path(sys.argv[2])
    space, _ = open_run(run_dir)
    coefs = coefficients(space)
    engine = MergeEngine(space.base_model, space.models)
    best = Recipe.load(run_dir / "best.yaml")
    out = {}
    with contextlib.closing(make_backend(space.backend, space.base_model, dtype=space.dtype)) as backend:
        for split in ("search", "validation", "test"):
            task_set = load_task_set(space.tasks, limit=space.limit, seed=space.seed, split=split)
            mine = evaluate_candidate(backend, task_set, engine, best).items()
            for weight in (0.1, 0.2, 0.3):
                recipe = _shared_weight_recipe(space, "task_arithmetic", weight)
                theirs = evaluate_candidate(backend, task_set, engine, recipe).items()
                c = stats.compare(mine, theirs, coefs)
                out[f"{split} w={weight}"] = {"best": c.a.value, "ta": c.b.value, "diff": c.difference.value,
                                              "se": c.difference.se, "words": c.words(), "n": c.difference.n}
                print(split, weight, json.dumps(out[f"{split} w={weight}"]), flush=True)
    out_path.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
