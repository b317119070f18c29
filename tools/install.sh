#!/usr/bin/env bash
# Create .venv (if missing) and install the course into it. Sourced by tools/main.sh and tools/test.sh.
# torch is installed first and pinned, because an unpinned torch on Linux pulls a multi-GB CUDA build;
# TORCH_SPEC picks another version; TORCH_INDEX_URL a wheel index (e.g. PyTorch's CPU-only index on a laptop
# without a GPU, which avoids downloading CUDA libraries).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
python -m pip install -q -e ".[${EXTRAS:-dev}]"
python -m ipykernel install --sys-prefix --name python3 >/dev/null
