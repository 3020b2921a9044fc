#!/usr/bin/env bash
# One-step set-up on a fresh machine: creates .venv and installs the project with every pin from
# constraints.txt. torch goes first (the pinned build), then everything else under the same constraints
# so nothing can upgrade it. Usage: bash scripts/install.sh [extras, default "dev,bench"]
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-dev,bench}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q -c constraints.txt)
"${PIP[@]}" --upgrade pip setuptools wheel
"${PIP[@]}" torch==2.13.0
# DeepSpeed's CUDA ops are JIT/optional: never build them at install time (CPU machines have no CUDA).
DS_BUILD_OPS=0 "${PIP[@]}" -e ".[${EXTRAS}]"
.venv/bin/python -m pip check
# The dev extra's browser test (tests/integration/test_browser_ui.py) drives the system's Chromium: install
# the distribution package when we can (root + apt-get); otherwise say how, and the test skips with a reason.
if [[ ",${EXTRAS}," == *",dev,"* ]] && ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "installing chromium (system package) for the browser test"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } >/dev/null; then
      echo "note: apt-get could not install chromium: the browser test will be skipped" >&2
    fi
  else
    echo "note: no chromium: install your system's chromium package to run the browser test (it is skipped without)" >&2
  fi
fi
echo "installed: $(.venv/bin/python -c 'import torch, deepspeed; print("torch", torch.__version__, "deepspeed", deepspeed.__version__)')"
