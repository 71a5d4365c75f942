"""Reliability figures: run the fault-injection suite (tests/reliability) and print what it injected and survived.

    python benchmarks/reliability_figures.py            # a markdown table for benchmarks/RESULTS.md

Every fault is real where it can be: kill -9 and SIGINT of `mergeopt search` processes at random moments (fixed
seed), NaN logits from a model whose weights are 1e38, ENOSPC from a full tmpfs and from /dev/full, a read-only bind mount;
out-of-memory and exceptions come from the MERGEOPT_FAULT testing hook (optimizer/search/faults.py). "Trials lost"
counts trials that were COMPLETE before a fault and were not COMPLETE with the same values after it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "figures.json"
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/reliability"],
                              cwd=ROOT, env=dict(os.environ, MERGEOPT_FIGURES_JSON=str(target)),
                              capture_output=True, text=True)
        seconds = time.perf_counter() - start
        summary = [line for line in proc.stdout.splitlines() if " passed" in line or " failed" in line]
        if not target.is_file():
            print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
            return 1
        figures = json.loads(target.read_text())
    print("| fault | injected | survived | completed trials lost |")
    print("|---|---:|---:|---:|")
    for name, row in figures.items():
        print(f"| {name} | {row['injected']} | {row['survived']} | {row['trials_lost']} |")
    total = {k: sum(r[k] for r in figures.values()) for k in ("injected", "survived", "trials_lost")}
    print(f"| **total** | **{total['injected']}** | **{total['survived']}** | **{total['trials_lost']}** |")
    print(f"\n{summary[-1] if summary else 'pytest: no summary'} (tests/reliability, {seconds:.0f}s wall, "
          f"{os.cpu_count()} cores)")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
