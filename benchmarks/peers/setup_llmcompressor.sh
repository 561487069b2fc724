#!/usr/bin/env bash
# Build (once) a separate venv holding llm-compressor, for benchmarks/peers/llmcompressor_gptq.py.
# Idempotent: an existing venv whose pinned versions import fine is reused as is.
# The last line printed on stdout is the venv's python (benchmarks/gptq_vs_llmcompressor.py reads it).
#
#   bash benchmarks/peers/setup_llmcompressor.sh          # venv at benchmarks/.peer-venv
#   PEER_VENV=/tmp/llmc-venv bash benchmarks/peers/setup_llmcompressor.sh
#
# Pins:
#   torch==2.13.0 is installed first and kept by a constraints file: the local CPU wheel. A bare
#     `torch` requirement pulled by another package could otherwise fetch a multi-GB CUDA build.
#   llmcompressor==0.14.0.1 is the newest release; it accepts torch>=2.10,<=2.14.0 (so 2.13.0 works
#     unchanged) and itself pins compressed-tensors==0.19.0 and transformers>=5.15,<=5.17, which is
#     why it lives in its own venv (mpq's venv has transformers 5.23 and compressed-tensors 0.20).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${PEER_VENV:-$HERE/../.peer-venv}"
TORCH_VERSION="2.13.0"
LLMC_VERSION="0.14.0.1"
PY="${PYTHON:-python3.11}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

# Reuse the venv when it already has the pinned versions (nothing is downloaded then).
check() {
    "$VENV/bin/python" - "$TORCH_VERSION" "$LLMC_VERSION" <<'EOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
import torch, llmcompressor  # noqa: F401  (import must work, not just be installed)
assert torch.__version__.split("+")[0] == sys.argv[1], torch.__version__
assert version("llmcompressor") == sys.argv[2], version("llmcompressor")
EOF
}

if [ -x "$VENV/bin/python" ] && check; then
    echo "reusing $VENV" >&2
else
    echo "building $VENV" >&2
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    CONSTRAINTS="$VENV/torch-constraints.txt"
    echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"
    # pip's progress goes to stderr so stdout stays the one python path.
    "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
    "$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION" >&2
    "$VENV/bin/python" -m pip install --quiet -c "$CONSTRAINTS" "llmcompressor==$LLMC_VERSION" >&2
    check || { echo "llm-compressor venv at $VENV does not import" >&2; exit 1; }
fi

cd "$VENV" && echo "$(pwd)/bin/python"
