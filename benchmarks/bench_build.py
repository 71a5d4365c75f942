"""Seconds per candidate build into a live model, with whichever mergeopt is on PYTHONPATH: compares two versions.

Uses only the engine's stable API (``MergeEngine(base, models).build_into(recipe, model)``), so an older checkout
runs it too. Prints one JSON line: median seconds per build over ``--builds`` builds of a dare_linear (per-layer
drop rates) and a dare_ties recipe, the engine's load time and the process's peak RSS.

example (two versions, interleaved, same machine state):
  git worktree add /tmp/old 931929c
  for i in 1 2 3; do
    PYTHONPATH=/tmp/old python benchmarks/bench_build.py --family zoo
    PYTHONPATH=$PWD python benchmarks/bench_build.py --family zoo
  done
  python benchmarks/bench_build.py --family /tmp/bench084/synthetic-small --builds 5   # a written family
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="zoo", help="'zoo' or a folder holding base/ and ft0.. (bench_merge)")
    parser.add_argument("--builds", type=int, default=20)
    parser.add_argument("--dtype", default="float32", help="dtype of the live model (default float32)")
    args = parser.parse_args(argv)

    import torch
    import transformers

    import optimizer
    from optimizer.merge.engine import MergeEngine
    from optimizer.recipe import ModelSpec, Recipe

    if args.family == "zoo":
        from optimizer.zoo import zoo_models

        zoo = zoo_models()
        base, models = zoo["base"], [v for k, v in zoo.items() if k != "base"]
    else:
        root = Path(args.family)
        base, models = str(root / "base"), [str(p) for p in sorted(root.glob("ft*"))]
    start = time.perf_counter()
    engine = MergeEngine(base, models, device="cpu")
    load = time.perf_counter() - start
    live = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, args.dtype)).eval()
    recipes = {
        "dare_linear": Recipe("dare_linear", [ModelSpec(m, {"weight": 0.4, "density": [0.9, 0.3]}) for m in models],
                              base_model=base, seed=0),
        "dare_ties": Recipe("dare_ties", [ModelSpec(m, {"weight": 0.4, "density": 0.5}) for m in models],
                            base_model=base, seed=0),
    }
    result = {"code": str(Path(optimizer.__file__).parent.parent), "family": args.family, "load_s": round(load, 3)}
    for name, recipe in recipes.items():
        engine.build_into(recipe, live)  # warm-up: compile / cache load, first touch
        times = []
        for _ in range(args.builds):
            t = time.perf_counter()
            engine.build_into(recipe, live)
            times.append(time.perf_counter() - t)
        result[f"{name}_s"] = round(statistics.median(times), 5)
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
