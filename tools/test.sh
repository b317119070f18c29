#!/usr/bin/env bash
# Install into .venv, then run the whole suite: unit tests, notebooks and solutions under nbval, exercise grading.
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/install.sh
bash tools/browser.sh                  # chromium for tests/test_web_chat.py (apt-get, as root; once)
PYTHON=python bash tools/llama_cpp.sh  # llama.cpp for tests/test_gguf.py and chapter 15: built once (~6.5 min), cached
unset MPLBACKEND
python -m pytest --nbval -q "$@"
