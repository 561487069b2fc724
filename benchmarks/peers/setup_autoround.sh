#!/usr/bin/env bash
# Build (once) a separate venv holding Intel's auto-round package, for
# benchmarks/peers/autoround_peer.py.
# Idempotent: an existing venv whose pinned versions import fine is reused as is.
# The last line printed on stdout is the venv's python (benchmarks/tuned_vs_autoround.py reads it).
#
#   bash benchmarks/peers/setup_autoround.sh          # venv at /tmp/autoround-venv
#   PEER_VENV=/somewhere/else bash benchmarks/peers/setup_autoround.sh
#
# Pins:
#   torch==2.13.0 is installed first and kept by a constraints file: the local CPU wheel. A bare
#     `torch` requirement pulled by another package could otherwise fetch a multi-GB CUDA build.
#   auto-round==0.16.1 is the newest release. Its own requirements are light (accelerate,
#     datasets, numpy, py-cpuinfo, torch, tqdm, transformers>=4.38, pydantic, requests); its `cpu`
#     extra (numba, tbb, auto-round-lib kernels) only serves inference of packed models, which the
#     peer does not do, so it is not installed.
#   transformers==5.23.0 and accelerate==1.16.0: the versions mpq's venv uses, so that both tools
#     load SmolLM2 through the same model code.
set -euo pipefail

VENV="${PEER_VENV:-/tmp/autoround-venv}"
TORCH_VERSION="2.13.0"
AUTOROUND_VERSION="0.16.1"
TRANSFORMERS_VERSION="5.23.0"
ACCELERATE_VERSION="1.16.0"
PY="${PYTHON:-python3.11}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

# Reuse the venv when it already has the pinned versions (nothing is downloaded then).
check() {
    "$VENV/bin/python" - "$TORCH_VERSION" "$AUTOROUND_VERSION" "$TRANSFORMERS_VERSION" <<'EOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
import torch, auto_round  # noqa: F401  (import must work, not just be installed)
assert torch.__version__.split("+")[0] == sys.argv[1], torch.__version__
assert version("auto-round") == sys.argv[2], version("auto-round")
assert version("transformers") == sys.argv[3], version("transformers")
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
    "$VENV/bin/python" -m pip install --quiet -c "$CONSTRAINTS" "auto-round==$AUTOROUND_VERSION" \
        "transformers==$TRANSFORMERS_VERSION" "accelerate==$ACCELERATE_VERSION" >&2
    check || { echo "auto-round venv at $VENV does not import" >&2; exit 1; }
fi

cd "$VENV" && echo "$(pwd)/bin/python"
