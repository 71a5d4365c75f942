"""Resident memory of a real ``mergeopt search`` on a bf16 family: bytes per parameter per model.

Writes (or reuses) the synthetic Llama family of ``bench_merge.py`` (``--size 0.84b``: 0.84B parameters per model,
bfloat16 safetensors, base + 3 fine-tunes), gives it the zoo's character tokenizer, and runs ``mergeopt search``
as a child process (hf backend, scoring in bfloat16, random optimiser, ``--trials`` candidates, one tiny generation
task). The child's ``/proc/PID/status`` is sampled every 0.2 s: VmRSS, RssAnon (the process's own memory) and
RssFile (pages of the memory-mapped checkpoints it has touched); the peak comes from ``os.wait4``.

Reported: peak RSS, and (peak - live scoring model) / (parameters x models): the engine's bytes per parameter per
model; the target is <= 2.2 for bf16 checkpoints (2.0 is the files themselves).

example:
  . .venv/bin/activate
  python benchmarks/bench_memory.py --size 0.84b --workdir /tmp/bench084 --trials 3
  python benchmarks/bench_memory.py --size small --trials 2          # a quick look, ~58M params/model
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# the package is imported as installed (pip install -e .); sibling benchmark modules are found because Python puts
# this script's folder first on sys.path

from bench_merge import SIZES, llama_config, other_cpu_load, write_family  # noqa: E402

FIELDS = ("VmRSS", "RssAnon", "RssFile")


def sample(pid: int, peaks: dict, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    key = line.split(":")[0]
                    if key in FIELDS:
                        peaks[key] = max(peaks.get(key, 0), int(line.split()[1]) * 1024)
        except OSError:
            return
        stop.wait(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=[s for s in SIZES if s != "tiny"], default="0.84b")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="passed to mergeopt search")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (a family there is reused)")
    args = parser.parse_args(argv)

    from optimizer.merge.checkpoint import tensor_shapes
    from optimizer.zoo.tokenizer import save_tokenizer

    tmp = tempfile.TemporaryDirectory(prefix="mergeopt-memory-") if args.workdir is None else None
    work = Path(tmp.name) if tmp else args.workdir
    family = work / f"synthetic-{args.size}"
    base, models = write_family(family, llama_config(args.size), 3, dtype="bfloat16")
    for folder in [base, *models]:
        save_tokenizer(folder)
    params = sum(int(__import__("math").prod(s)) for s in tensor_shapes(base).values())
    run = work / "memory-run"
    (work / "gen.jsonl").write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "target": str(2 * i)}) + "\n"
                                            for i in range(16)))
    (work / "tasks.yaml").write_text(f"tasks:\n  - {{name: gen, path: {work / 'gen.jsonl'}, max_new_tokens: 2}}\n")
    space = {"name": "memory", "base_model": str(base), "models": [str(m) for m in models],
             "merge_method": "dare_ties", "granularity": "per_model", "objectives": ["gen"],
             "optimizer": {"name": "random"}, "budget": {"trials": args.trials}, "tasks": str(work / "tasks.yaml"),
             "limit": 8, "dtype": "bfloat16", "backend": "hf", "seed": 0}
    (work / "space.yaml").write_text(yaml.safe_dump(space))
    import shutil

    shutil.rmtree(run, ignore_errors=True)
    mergeopt = Path(sys.executable).parent / "mergeopt"
    cmd = [str(mergeopt), "search", str(work / "space.yaml"), "--run-dir", str(run), "--quiet"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    print(f"load before: {other_cpu_load()}")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peaks: dict = {}
    stop = threading.Event()
    watcher = threading.Thread(target=sample, args=(proc.pid, peaks, stop), daemon=True)
    watcher.start()
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    stop.set()
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        print(stderr.decode()[-3000:], file=sys.stderr)
        return 1
    peak = usage.ru_maxrss * 1024
    live = params * 2  # the bf16 scoring model
    n_models = 1 + len(models)
    gib = 1024**3
    print(f"\n**mergeopt search, {args.size}: {params / 1e6:.1f}M params/model x {n_models} models (bf16 files, "
          f"{params * 2 * n_models / gib:.2f} GiB), hf backend scoring in bf16, {args.trials} trials, "
          f"wall {wall:.0f} s**\n")
    print("| measure | GiB | bytes / param / model |")
    print("|---|---:|---:|")
    print(f"| peak RSS (wait4) | {peak / gib:.2f} | {(peak - live) / params / n_models:.2f} (above the live model) |")
    for key in FIELDS:
        if key in peaks:
            print(f"| peak {key} (sampled) | {peaks[key] / gib:.2f} | {peaks[key] / params / n_models:.2f} |")
    print(f"| live model (bf16) | {live / gib:.2f} | |")
    print(f"\nload after: {other_cpu_load()}")
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
