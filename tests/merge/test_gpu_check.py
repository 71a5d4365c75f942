"""benchmarks/gpu_check.sh runs its whole path on the CPU in --dry-run (the GPU machine runs the same code)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_dry_run_prints_one_table_with_every_sample_identical(tmp_path):
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--builds", "2",
                             "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=600,
                            env={"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "HOME": str(tmp_path),
                                 "PYTHON": sys.executable})
    assert result.returncode == 0, result.stderr[-2000:]
    rows = dict(line.strip("|").split("|")[:2] for line in result.stdout.splitlines()[2:])
    rows = {k.strip(): v.strip() for k, v in rows.items()}
    n, total = rows["bit-identical to CPU"].split()[0].split("/")
    assert n == total and int(total) > 10
    assert rows["build (dare_ties)"].endswith("median of 2")
    assert "GB/s" in rows["copy bandwidth"]
    assert rows["vLLM, 10 candidates"].startswith("skipped")
    # the engine-fault checks run on a GPU only (a killed vLLM worker, a poisoned CUDA context)
    assert rows["vLLM worker killed mid-candidate"].startswith("skipped")
    assert rows["CUDA fault -> process restarted"] == "skipped: the dry run has no CUDA context to poison"
