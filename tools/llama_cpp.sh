#!/usr/bin/env bash
# Install llama.cpp's Python binding (llama-cpp-python, pinned) into the active Python environment, so that the GGUF
# tests (tests/test_gguf.py) and chapter 15 check our exported files with llama.cpp itself.
#
# llama-cpp-python ships as a source distribution only: pip compiles llama.cpp. This script compiles it once, as a
# CPU-only, minimal build (no tests, examples, tools, server or multimodal library; no -march=native, so the same
# code runs on every x86-64 machine with AVX2), into a wheel cache outside the repository, and afterwards installs
# that cached wheel in seconds.
#
# Usage: bash tools/llama_cpp.sh            (with the venv active, or PYTHON=.venv/bin/python)
# Cache: $ZER02LLM_WHEELS, default ${XDG_CACHE_HOME:-$HOME/.cache}/zer02llm/wheels (delete it to rebuild).
set -euo pipefail

VERSION=0.3.36
PY=${PYTHON:-python}
CACHE=${ZER02LLM_WHEELS:-${XDG_CACHE_HOME:-$HOME/.cache}/zer02llm/wheels}

if "$PY" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
    echo "llama-cpp-python $VERSION is installed"
    exit 0
fi

mkdir -p "$CACHE"
wheel=$(ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n 1 || true)  # py3-none-<platform>
if [ -z "$wheel" ]; then
    echo "building llama-cpp-python $VERSION (CPU only, once; a few minutes) into $CACHE"
    start=$(date +%s)
    CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
        "$PY" -m pip wheel --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -w "$CACHE"
    echo "built in $(( $(date +%s) - start )) s"
    wheel=$(ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl | head -n 1)
fi
"$PY" -m pip install "$wheel"
