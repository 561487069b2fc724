#!/usr/bin/env bash
# Build (once) a separate venv holding llama-cpp-python (llama.cpp's Python binding, compiled here
# with the system C/C++ compiler and cmake; about 4 minutes on 2 cores), for
# benchmarks/gguf_llama_cpp.py. torch is not needed there; numpy is.
# Idempotent: an existing venv whose pinned version imports fine is reused as is.
# The last line printed on stdout is the venv's python (gguf_llama_cpp.py reads it).
#
#   bash benchmarks/peers/setup_llama_cpp.sh          # venv at /tmp/llama-cpp-venv
#   LLAMA_CPP_VENV=/some/where bash benchmarks/peers/setup_llama_cpp.sh
#
# Pins: llama-cpp-python==0.3.36 (the newest release; it vendors its own llama.cpp), built for the
# CPU only (GGML_NATIVE on: the build machine's own instruction set), numpy<3.
set -euo pipefail

VENV="${LLAMA_CPP_VENV:-/tmp/llama-cpp-venv}"
LLAMA_CPP_PYTHON_VERSION="0.3.36"
PY="$VENV/bin/python"

if [ -x "$PY" ] && "$PY" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$LLAMA_CPP_PYTHON_VERSION')" 2>/dev/null; then
    echo "$PY"
    exit 0
fi

python3 -m venv "$VENV" >&2
"$PY" -m pip install --quiet --upgrade pip >&2
"$PY" -m pip install --quiet "numpy<3" >&2
CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_CUDA=OFF -DLLAMA_CURL=OFF" CMAKE_BUILD_PARALLEL_LEVEL="${JOBS:-2}" \
    "$PY" -m pip install --no-cache-dir "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" >&2
"$PY" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)" >&2
echo "$PY"
