"""Scale-out: search throughput with 1, 2, 3 workers on one PostgreSQL study, and the coordination overhead.

    export MERGEOPT_TEST_POSTGRES=$(bash .ci/postgres.sh)
    python benchmarks/bench_workers.py --workers 1 2 3 --trials 24 --optimizer cma

Each configuration is a fresh study of the zoo space (``--limit`` items per task) searched by N worker processes
(``run_search`` with ``--storage``, as ``mergeopt search`` runs it); a first row runs one worker on the local SQLite
study for comparison. Reported per configuration:

* throughput: completed trials per minute between the first trial's start and the last trial's end (the workers'
  start-up and the parents' scoring are left out: they happen once per worker or per study); steady: the same
  over the window where every worker is scoring (after the last one started, before the first one ran dry);
* wall: the whole command, start-up included;
* coordination: the time the workers spent in the study lock (waiting for it, failing stale trials, counting the
  budget, asking and telling the optimiser, CMA's generation bookkeeping), per trial, and as a fraction of the time
  spent merging and scoring candidates; waiting: time idle because the rest of a CMA generation or of the budget was
  in other workers' hands.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import optuna  # noqa: E402
import yaml  # noqa: E402
from optuna.trial import TrialState  # noqa: E402


def space_dict(name: str, optimizer: str, trials: int, limit: int) -> dict:
    settings = {"name": optimizer, **({"popsize": 6} if optimizer == "cma" else {})}
    return {"name": name, "base_model": "zoo:base", "models": ["zoo:adder", "zoo:reverser", "zoo:sorter"],
            "merge_method": "dare_linear", "granularity": "per_model", "objectives": ["add", "reverse", "sort"],
            "tasks": "zoo", "limit": limit, "optimizer": settings, "budget": {"trials": trials}, "seed": 0}


def worker(space_path: str, storage: str | None, study: str, run_dir: str) -> None:
    """One worker (a subprocess of the benchmark): search, then print this worker's timings as JSON."""
    from optimizer.search.loop import run_search
    from optimizer.space import load_space

    result = run_search(load_space(space_path), Path(run_dir), storage=storage, study_name=study, device="cpu",
                        progress=False)
    print(json.dumps({"new_trials": result.new_trials, **result.seconds}))


def run_config(n: int, storage: str | None, args, tmp: Path) -> dict:
    name = f"bench-{args.optimizer}-{n}w-{uuid.uuid4().hex[:6]}"
    space_path = tmp / f"{name}.yaml"
    space_path.write_text(yaml.safe_dump(space_dict(name, args.optimizer, args.trials, args.limit)))
    run_dir = tmp / name
    cmd = [sys.executable, __file__, "--worker", str(space_path), storage or "", name, str(run_dir)]
    # the cores are shared out between the workers (as one worker per GPU would get its share of the CPU):
    # N processes with all-core OpenMP pools each oversubscribe the CPU and spin, which is far slower
    threads = str(max(1, (os.cpu_count() or 1) // n)) if args.split_threads else os.environ.get("OMP_NUM_THREADS", "")
    env = dict(os.environ, **({"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads} if threads else {}))
    start = time.perf_counter()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(n)]
    outs = [p.communicate() for p in procs]
    wall = time.perf_counter() - start
    for p, (_, err) in zip(procs, outs):
        if p.returncode:
            raise SystemExit(f"a worker failed:\n{err}")
    stats = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    url = storage or f"sqlite:///{run_dir / 'study.db'}"
    trials = optuna.load_study(study_name=name, storage=url).get_trials(states=(TrialState.COMPLETE,))
    span = (max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)).total_seconds()
    # steady state: from the moment every worker has started its first candidate to the moment the first worker
    # finishes its last (start-up skew and the tail where workers run out of budget are left out)
    by_worker: dict[str, list] = {}
    for t in trials:
        by_worker.setdefault(t.user_attrs.get("worker"), []).append(t)
    t0 = max(min(t.datetime_start for t in ts) for ts in by_worker.values())
    t1 = min(max(t.datetime_complete for t in ts) for ts in by_worker.values())
    inside = sum(1 for t in trials if t.datetime_start >= t0 and t.datetime_complete <= t1)
    steady = 60 * inside / (t1 - t0).total_seconds() if t1 > t0 and inside >= n else float("nan")
    total = {k: sum(s[k] for s in stats) for k in ("evaluating", "coordination", "waiting")}
    return {"workers": n, "storage": "postgresql" if storage else "sqlite (local)", "trials": len(trials),
            "per_worker": [s["new_trials"] for s in stats], "span_s": span, "wall_s": wall,
            "steady_trials_per_min": steady, "seconds_per_trial": total["evaluating"] / len(trials),
            "trials_per_min": 60 * len(trials) / span, "coordination_ms_per_trial": 1000 * total["coordination"] / len(trials),
            "coordination_fraction": total["coordination"] / total["evaluating"],
            "waiting_s": total["waiting"], "evaluating_s": total["evaluating"]}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        space_path, storage, study, run_dir = sys.argv[2:6]
        worker(space_path, storage or None, study, run_dir)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default=os.environ.get("MERGEOPT_TEST_POSTGRES"),
                        help="PostgreSQL URL (default: $MERGEOPT_TEST_POSTGRES)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--limit", type=int, default=20, help="items per task")
    parser.add_argument("--optimizer", default="cma", choices=("cma", "tpe", "random", "nsga2"))
    parser.add_argument("--no-local", action="store_true", help="skip the one-worker SQLite row")
    parser.add_argument("--no-split-threads", dest="split_threads", action="store_false",
                        help="let every worker use all cores (OMP_NUM_THREADS unset) instead of cores / workers")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args()
    if not args.storage:
        raise SystemExit("give --storage postgresql://... or export MERGEOPT_TEST_POSTGRES=$(bash .ci/postgres.sh)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        configs = ([] if args.no_local else [(1, None)]) + [(n, args.storage) for n in args.workers]
        for n, storage in configs:
            rows.append(run_config(n, storage, args, Path(tmp)))
            print(json.dumps(rows[-1]), file=sys.stderr)
    print(f"{args.optimizer}, {args.trials} trials, zoo limit {args.limit}, {os.cpu_count()} CPU cores "
          f"({'split between the workers' if args.split_threads else 'all for every worker'}), "
          f"load average at the end {os.getloadavg()[0]:.1f}\n")
    print("| workers | storage | trials/min | speed-up | steady trials/min | wall s | trials per worker "
          "| scoring s/trial | coordination ms/trial | coordination / scoring time | idle waiting s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    first = next((r for r in rows if r["storage"] == "postgresql" and r["workers"] == 1), rows[0])
    for r in rows:
        print(f"| {r['workers']} | {r['storage']} | {r['trials_per_min']:.1f} | "
              f"{r['trials_per_min'] / first['trials_per_min']:.2f}x | {r['steady_trials_per_min']:.1f} | "
              f"{r['wall_s']:.0f} | {'/'.join(map(str, r['per_worker']))} | {r['seconds_per_trial']:.2f} | "
              f"{r['coordination_ms_per_trial']:.0f} | "
              f"{100 * r['coordination_fraction']:.1f}% | {r['waiting_s']:.1f} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
