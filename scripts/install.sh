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
echo "installed: $(.venv/bin/python -c 'import torch, deepspeed; print("torch", torch.__version__, "deepspeed", deepspeed.__version__)')"
