#!/usr/bin/env bash
# Create .venv (if missing) and install the course into it. Sourced by tools/main.sh and tools/test.sh.
# torch is installed first and pinned, because an unpinned torch on Linux pulls a multi-GB CUDA build;
# set TORCH_SPEC to choose another (e.g. TORCH_SPEC="torch==2.13.0" with your platform's CPU/CUDA index).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -c "import torch" 2>/dev/null || python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install -q -e ".[${EXTRAS:-dev}]"
python -m ipykernel install --sys-prefix --name python3 >/dev/null
