"""Delta sizes of the mix family: ||fine-tune - base|| over the trained (linear) layers, per model.

    python benchmarks/mix_deltas.py            # the built family in ~/.cache/mergeopt/mix ($MERGEOPT_CACHE moves it)
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reduced", action="store_true")
    args = parser.parse_args()
    from safetensors import safe_open

    from optimizer.builders.mix import FULL, REDUCED, delta_scale
    from optimizer.builders.smollm2 import is_trained
    from optimizer.zoo import mix, smollm2

    cache = os.environ.get("MERGEOPT_CACHE")
    smollm2.set_cache_root(Path(cache) if cache else None)
    models = mix.family_models(reduced=args.reduced)
    plan = REDUCED if args.reduced else FULL
    norms = {}
    with safe_open(models["base"] / "model.safetensors", "pt") as base:
        names = [n for n in base.keys() if is_trained(n)]
        base_norm = sum(float(base.get_tensor(n).double().pow(2).sum()) for n in names) ** 0.5
        for name in mix.SPECIALIST_TASK:
            with safe_open(models[name] / "model.safetensors", "pt") as tuned:
                norms[name] = sum(float((tuned.get_tensor(n).double() - base.get_tensor(n).double()).pow(2).sum())
                                  for n in names) ** 0.5
    print("| model | task | steps | lr | lr x steps | ||delta|| | ||delta|| / ||base|| |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name, task in mix.SPECIALIST_TASK.items():
        s = plan[name]
        print(f"| {name} | {task} | {s.steps} | {s.learning_rate:g} | {delta_scale(s):.1e} | {norms[name]:.3f} | "
              f"{norms[name] / base_norm:.2e} |")
    print(f"largest / smallest delta: {max(norms.values()) / min(norms.values()):.1f}x")


if __name__ == "__main__":
    main()
