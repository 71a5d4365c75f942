"""Whole-process wall time: ``mergeopt merge RECIPE --out DIR`` vs ``mergekit-yaml RECIPE DIR``.

Both tools run as subprocesses on the same dare_ties recipe (a plain mergekit file, so mergeopt applies
mergekit's L1 rescale rule) over the same models, in interleaved rounds (the order alternates every round); the
table gives the median wall time, min-max, the median of per-round ratios (mergekit / mergeopt, > 1 means
mergeopt is faster) and each child's peak RSS (``os.wait4``). A third row runs mergeopt on the same recipe with
``mergeopt: {rescale: dare}`` (the paper's 1/(1-p) rescale; no extra pass over the deltas for the L1 norms).

Families:
  zoo        the embedded zoo (optimizer/zoo/models: base + adder, reverser, sorter) when it has been trained;
             otherwise a tiny synthetic Llama of the same order of size stands in (labelled as such);
             start-up dominates here.
  synthetic  a Llama-shaped family (base + 3 fine-tunes, bfloat16 safetensors, ``--size``, default medium
             ~134M params/model) where loading and merging dominate.

mergekit options (chosen so both tools do the same work): ``--no-copy-tokenizer`` (the synthetic models have no
tokenizer; mergeopt copies tokenizer files verbatim when present, a few KB), ``--random-seed 0``, ``--quiet``,
``--no-write-model-card`` (mergeopt writes none), default ``--out-shard-size 5B`` parameters vs mergeopt's default
``--shard-size 5GB`` bytes (one shard each at these sizes), no ``--lazy-unpickle`` (it only affects pickled .bin
inputs; the inputs are safetensors), CPU (``--no-cuda``), default thread count. Both compute and write float32
(``dtype: float32``).

example:
  . .venv/bin/activate
  python benchmarks/bench_vs_mergekit.py                        # zoo (or stand-in) + medium synthetic, 3 rounds
  python benchmarks/bench_vs_mergekit.py --families synthetic --size large --repeats 5
  python benchmarks/bench_vs_mergekit.py --families synthetic --size 0.84b --dtype bfloat16 --repeats 2 \
      --no-warm-up --no-dare-row --workdir /tmp/bench084   # the memory issue's family (~7 GB of files)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# the package is imported as installed (pip install -e .); sibling benchmark modules are found because Python puts
# this script's folder first on sys.path

from bench_merge import SIZES, llama_config, other_cpu_load, write_family  # noqa: E402

MERGEKIT_FLAGS = ["--no-copy-tokenizer", "--random-seed", "0", "--quiet", "--no-write-model-card", "--no-cuda"]
WEIGHTS = (0.5, 0.3, 0.2)
DENSITY = 0.5


def recipe_dict(base: Path, models: list[Path], dtype: str = "float32") -> dict:
    return {
        "merge_method": "dare_ties",
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": {"weight": w, "density": DENSITY}} for m, w in zip(models, WEIGHTS)],
        "dtype": dtype,
    }


def run_child(cmd: list[str], out_dir: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one subprocess; the output folder is removed before and after."""
    shutil.rmtree(out_dir, ignore_errors=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr.decode()[-2000:]}")
    if not any(out_dir.glob("*.safetensors")):
        raise SystemExit(f"{' '.join(cmd)} wrote no safetensors into {out_dir}")
    shutil.rmtree(out_dir, ignore_errors=True)
    return wall, usage.ru_maxrss / 1024


def bench_family(label: str, base: Path, models: list[Path], work: Path, repeats: int, warm_up: bool,
                 dtype: str = "float32", dare_row: bool = True) -> list[dict]:
    bin_dir = Path(sys.executable).parent
    mergeopt = str(bin_dir / "mergeopt") if (bin_dir / "mergeopt").exists() else "mergeopt"
    mergekit = str(bin_dir / "mergekit-yaml") if (bin_dir / "mergekit-yaml").exists() else "mergekit-yaml"
    plain = recipe_dict(base, models, dtype)
    plain_path = work / f"{label}-dare_ties.yaml"
    plain_path.write_text(yaml.safe_dump(plain, sort_keys=False))
    dare_path = work / f"{label}-dare_ties-rescale-dare.yaml"
    dare_path.write_text(yaml.safe_dump({**plain, "mergeopt": {"seed": 0, "rescale": "dare"}}, sort_keys=False))
    out = work / "out"
    tools = {
        "mergekit-yaml (L1 rescale)": [mergekit, str(plain_path), str(out), *MERGEKIT_FLAGS],
        "mergeopt merge (L1 rescale, same file)": [mergeopt, "merge", str(plain_path), "--out", str(out)],
        "mergeopt merge (rescale: dare)": [mergeopt, "merge", str(dare_path), "--out", str(out)],
    }
    if not dare_row:
        del tools["mergeopt merge (rescale: dare)"]
    names = list(tools)
    if warm_up:  # page cache, numba's on-disk cache, Python bytecode caches (the synthetic files are fresh in cache)
        for name in names:
            run_child(tools[name], out)
    walls = {n: [] for n in names}
    rss = {n: [] for n in names}
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            w, m = run_child(tools[name], out)
            walls[name].append(w)
            rss[name].append(m)
        print(f"{label}: round {r + 1}/{repeats} done", file=sys.stderr)
    ref = names[0]
    rows = []
    for name in names:
        rows.append(dict(tool=name, median=statistics.median(walls[name]), lo=min(walls[name]), hi=max(walls[name]),
                         ratio=statistics.median(k / s for s, k in zip(walls[name], walls[ref])),
                         rss=max(rss[name]), rss_rounds=rss[name], wall_rounds=walls[name]))
    return rows


def print_table(title: str, rows: list[dict], commands_note: str) -> None:
    print(f"\n**{title}**{commands_note}\n")
    print("| tool | median wall s | min-max s | mergekit / this (x faster) | peak RSS MiB | RSS MiB per round |")
    print("|---|---:|---:|---:|---:|---|")
    for row in rows:
        print(f"| {row['tool']} | {row['median']:.2f} | {row['lo']:.2f}-{row['hi']:.2f} | {row['ratio']:.2f} | "
              f"{row['rss']:.0f} | {', '.join(f'{m:.0f}' for m in row['rss_rounds'])} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", choices=("zoo", "synthetic"), default=["zoo", "synthetic"])
    parser.add_argument("--size", choices=[s for s in SIZES if s != "tiny"], default="medium",
                        help="synthetic family size: small (~58M params), medium (~134M, default), large (~219M), "
                             "0.84b")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per family (default 3)")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary folder)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the recipe's dtype, computed and written (default float32)")
    parser.add_argument("--no-warm-up", action="store_true", help="no untimed first run (large families)")
    parser.add_argument("--no-dare-row", action="store_true", help="skip the mergeopt 'rescale: dare' row")
    args = parser.parse_args(argv)

    tmp = tempfile.TemporaryDirectory(prefix="mergeopt-vs-mergekit-") if args.workdir is None else None
    work = Path(tmp.name) if tmp else args.workdir
    work.mkdir(parents=True, exist_ok=True)
    print(f"load before: {other_cpu_load()}")
    import torch

    print(f"machine: {os.cpu_count()} cores; torch {torch.__version__}; mergekit "
          f"{__import__('importlib.metadata').metadata.version('mergekit')}")
    print(f"mergekit flags: {' '.join(MERGEKIT_FLAGS)}; recipe: dare_ties, weights {WEIGHTS}, density {DENSITY}, "
          f"dtype {args.dtype}")
    if "zoo" in args.families:
        from optimizer.zoo import zoo_models

        zoo = zoo_models()
        if all((p / "config.json").is_file() and any(p.glob("*.safetensors")) for p in zoo.values()):
            folders = list(zoo.values())
            label, title = "zoo", "zoo (optimizer/zoo/models: base + adder, reverser, sorter)"
        else:
            folders_base, folders_ft = write_family(work / "zoo-standin", llama_config("tiny"), 3)
            folders = [folders_base, *folders_ft]
            label = "zoo-standin"
            title = "zoo stand-in (zoo not trained yet): tiny synthetic Llama, ~0.7M params/model, 3 fine-tunes"
        rows = bench_family(label, folders[0], folders[1:], work, args.repeats, warm_up=True)
        print_table(title, rows, f", {args.repeats} interleaved rounds")
    if "synthetic" in args.families:
        t = time.perf_counter()
        config = llama_config(args.size)
        base, models = write_family(work / f"synthetic-{args.size}", config, 3, dtype="bfloat16")
        from optimizer.merge.checkpoint import tensor_shapes

        n_params = sum(int(torch.Size(s).numel()) for s in tensor_shapes(base).values())
        print(f"synthetic {args.size}: {n_params / 1e6:.1f}M params/model written in {time.perf_counter() - t:.1f}s",
              file=sys.stderr)
        rows = bench_family(f"synthetic-{args.size}", base, models, work, args.repeats,
                            warm_up="zoo" not in args.families and not args.no_warm_up, dtype=args.dtype,
                            dare_row=not args.no_dare_row)
        size = 4 if args.dtype == "float32" else 2
        print_table(f"synthetic {args.size}: {n_params / 1e6:.1f}M params/model, bfloat16 on disk, 3 fine-tunes",
                    rows, f", {args.repeats} interleaved rounds, output {args.dtype} "
                          f"({n_params * size / 1e9:.2f} GB)")
    print(f"\nload after: {other_cpu_load()}")
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
