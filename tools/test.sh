#!/usr/bin/env bash
# Install into .venv, then run the whole suite: unit tests, notebooks and solutions under nbval, exercise grading.
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/install.sh
unset MPLBACKEND
python -m pytest --nbval -q "$@"
