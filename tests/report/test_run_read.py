"""Reading a run (optimizer.run) is light: no torch, no change to the process's logging."""

import subprocess
import sys


def test_reading_a_run_imports_no_torch_and_leaves_logging_alone(report_run):
    code = f"""
import logging, sys
import optuna
before = (optuna.logging.get_verbosity(), logging.getLogger().level, list(logging.getLogger().handlers))
import optimizer
run = optimizer.load_run({str(report_run)!r})
from optimizer.report import summarize
summarize(run)
assert len(run.trials) == 10 and len(run.front)
after = (optuna.logging.get_verbosity(), logging.getLogger().level, list(logging.getLogger().handlers))
assert before == after, (before, after)
assert "torch" not in sys.modules, "reading a run imported torch"
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
