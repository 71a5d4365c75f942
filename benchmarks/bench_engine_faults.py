"""Engine faults survived by the vllm backend: its worker process killed (SIGKILL) or stopped (SIGSTOP: a hang) at a
random moment while candidates are scored, again and again; for each, the time until a new engine holds the candidate
in flight, whether its scores equal the ones before the fault, and whether any process of the failed engine is left.

Run in the vLLM venv (README, "The vLLM backend"):

    VLLM_VENV=$(bash .ci/vllm-venv.sh)
    VLLM_CONFIGURE_LOGGING=0 PYTHONPATH=$PWD "$VLLM_VENV/bin/python" benchmarks/bench_engine_faults.py --kills 3 --hangs 2

Uses the tiny tied Llama family of the tests (written to a scratch folder).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--hangs", type=int, default=2)
    parser.add_argument("--hang-floor", type=float, default=10.0, help="the hang timeout's floor, seconds")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from helpers import write_search_setup

    from optimizer.evaluate.recovery import EngineRecovery, pid_running
    from optimizer.evaluate.scoring import evaluate_candidate
    from optimizer.evaluate.tasks import load_task_set
    from optimizer.evaluate.vllm import VLLMBackend
    from optimizer.merge.engine import MergeEngine
    from optimizer.recipe import ModelSpec, Recipe

    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="mergeopt-engine-faults-"))
    write_search_setup(root, tied=True)
    base, models = root / "models" / "m0", [root / "models" / f"m{i}" for i in (1, 2, 3)]
    recovery = EngineRecovery(restarts_per_hour=args.kills + args.hangs, backoff_seconds=1.0,
                              hang_floor_seconds=args.hang_floor)
    start = time.perf_counter()
    backend = VLLMBackend(base, engine_device="cpu", recovery=recovery)
    first_start = time.perf_counter() - start
    engine = MergeEngine(base, models, device="cpu")
    task_set = load_task_set(str(root / "tasks.yaml"), limit=10)
    recipes = [Recipe("dare_ties", [ModelSpec(str(m), {"weight": w, "density": 0.7}) for m in models],
                      base_model=str(base), seed=1) for w in (0.3, 0.5, 0.7)]
    reference = [evaluate_candidate(backend, task_set, engine, r).to_dict() for r in recipes]
    per_candidate = []
    for r in recipes:
        t = time.perf_counter()
        evaluate_candidate(backend, task_set, engine, r)
        per_candidate.append(time.perf_counter() - t)
    print(f"engine start {first_start:.1f} s; a candidate {sorted(per_candidate)[1]:.2f} s (median of 3); "
          f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    rows = []
    faults = ["kill"] * args.kills + ["hang"] * args.hangs
    for n, kind in enumerate(faults):
        old = dict(backend.processes.names)
        worker = next(pid for pid, name in old.items() if "Worker" in name)
        delay = rng.uniform(0.0, max(per_candidate))
        sig = signal.SIGKILL if kind == "kill" else signal.SIGSTOP
        timer = threading.Timer(delay, os.kill, args=(worker, sig))
        events_before = len(backend.engine_events)
        timer.start()
        t = time.perf_counter()
        same = True
        while len(backend.engine_events) == events_before:  # candidates until the fault has been met and survived
            index = rng.randrange(len(recipes))
            result = evaluate_candidate(backend, task_set, engine, recipes[index])
            same &= result.to_dict() == reference[index]
        seconds = time.perf_counter() - t
        timer.join()
        event = backend.engine_events[-1]
        left = [pid for pid in old if pid_running(pid)]
        rows.append((kind, delay, event.cause, seconds, event.recovery_seconds, same, len(left)))
        print(f"{n}: {kind} after {delay:.2f} s -> {event.cause}; the candidate in flight back after {seconds:.1f} s "
              f"(new engine + rebuild {event.recovery_seconds:.1f} s); scores equal: {same}; old processes left: "
              f"{len(left)}", flush=True)
    backend.close()
    print("\n| fault | injected | survived | scores equal | processes left | candidate back after (s): median, max |")
    print("|---|---:|---:|---:|---:|---|")
    for kind in ("kill", "hang"):
        mine = [r for r in rows if r[0] == kind]
        if not mine:
            continue
        times = sorted(r[3] for r in mine)
        label = "vLLM worker SIGKILL (dead)" if kind == "kill" else "vLLM worker SIGSTOP (hung)"
        print(f"| {label} | {len(mine)} | {sum(r[2] == ('dead' if kind == 'kill' else 'hung') for r in mine)} | "
              f"{sum(r[5] for r in mine)}/{len(mine)} | {sum(r[6] for r in mine)} | "
              f"{times[len(times) // 2]:.1f}, {times[-1]:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
