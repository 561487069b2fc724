#!/usr/bin/env bash
# Build (once) llama.cpp's own command-line quantizer and importance-matrix tool (llama-quantize,
# llama-imatrix) from the llama.cpp that llama-cpp-python 0.3.36 vendors — the same llama.cpp
# benchmarks/peers/setup_llama_cpp.sh builds the binding from — for the "llama.cpp with an
# importance matrix" rows of benchmarks/gguf_llama_cpp.py (--imatrix-tools). CPU only, the build
# machine's instruction set, no network client; about 10 minutes on 2 cores.
# Idempotent: existing binaries are reused. The last line printed on stdout is the folder holding
# them.
#
#   bash benchmarks/peers/setup_llama_cpp_tools.sh       # in /tmp/llama-cpp-tools
#   LLAMA_CPP_TOOLS=/some/where bash benchmarks/peers/setup_llama_cpp_tools.sh
set -euo pipefail

DEST="${LLAMA_CPP_TOOLS:-/tmp/llama-cpp-tools}"
VERSION="0.3.36"
BIN="$DEST/build/bin"

if [ -x "$BIN/llama-quantize" ] && [ -x "$BIN/llama-imatrix" ]; then
    echo "$BIN"
    exit 0
fi

mkdir -p "$DEST"
if [ ! -d "$DEST/llama_cpp_python-$VERSION" ]; then
    python3 -m pip download --quiet --no-deps --no-binary :all: \
        "llama-cpp-python==$VERSION" -d "$DEST" >&2
    tar xzf "$DEST/llama_cpp_python-$VERSION.tar.gz" -C "$DEST"
fi
SRC="$DEST/llama_cpp_python-$VERSION/vendor/llama.cpp"
cmake -S "$SRC" -B "$DEST/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DGGML_CUDA=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_TOOLS=ON >&2
cmake --build "$DEST/build" --target llama-quantize llama-imatrix -j "${JOBS:-2}" >&2
echo "$BIN"
