#!/usr/bin/env bash
# Makes sure a headless-capable Chromium is installed (Debian's `chromium` package) and prints its binary path.
# Idempotent and quiet: when a browser is already on PATH (or named by $CHROMIUM) nothing is installed.
# The report test (tests/report/test_browser.py) finds the browser the same way; CI runs it with
# MERGEOPT_REQUIRE_CHROMIUM=1 so a missing browser fails instead of skipping.
set -euo pipefail
find_browser() {
  if [ -n "${CHROMIUM:-}" ] && [ -x "$CHROMIUM" ]; then echo "$CHROMIUM"; return 0; fi
  for name in chromium chromium-browser google-chrome-stable google-chrome; do
    if command -v "$name" >/dev/null 2>&1; then command -v "$name"; return 0; fi
  done
  return 1
}
if ! find_browser >/dev/null; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq >/dev/null
  $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi
find_browser || { echo "chromium.sh: no chromium after apt-get install" >&2; exit 1; }
