#!/usr/bin/env bash
# The GPU check: one table from a CUDA machine (merge time against the card's copy bandwidth, bit-identity with
# the CPU engine, ten vLLM candidates when vLLM is there). Meant to finish in <= 8 minutes on one GPU.
#   bash benchmarks/gpu_check.sh              # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --dry-run    # the same code on the CPU with a tiny family (tested in CI)
# Uses the active Python (the project's venv, or a CUDA torch with `pip install -e .`).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
if ! "$PYTHON" -c "import optimizer" 2>/dev/null; then
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PYTHON" benchmarks/gpu_check.py "$@"
