#!/usr/bin/env bash
# Build (once) a separate venv holding GPTQModel + optimum, the independent GPTQ v1 loader used by
# benchmarks/peers/gptq_loader_check.py (transformers' AutoModelForCausalLM.from_pretrained on a
# GPTQ folder goes through optimum and GPTQModel's CPU kernels).
# Idempotent: an existing venv whose pinned versions import fine is reused as is.
# The last line printed on stdout is the venv's python (gptq_loader_check.py reads it).
#
#   bash benchmarks/peers/setup_gptq_loader.sh          # venv at .cache/gptq-loader-venv (ignored)
#   GPTQ_VENV=/tmp/gptq-venv bash benchmarks/peers/setup_gptq_loader.sh
#
# Pins:
#   torch==2.13.0 is installed first and kept by a constraints file: the local CPU wheel. A bare
#     `torch` requirement pulled by another package could otherwise fetch a multi-GB CUDA build.
#   GPTQModel==7.7.0 is an sdist whose setup.py is pure Python (its C++/CUDA kernels are built
#     just in time, and only for the GPU backends), so it installs without a compiler or CUDA. Its
#     requirements.txt asks for torch>=2.14.1, which would mean a CUDA wheel here, so it is
#     installed with --no-deps and the runtime dependencies that loading needs are listed below
#     (its quantization-only extras, datasets/pyarrow/torchao/maturin, are left out). Its CPU
#     kernels (TorchLinear, TorchCpuAvx512Linear, TorchFusedLinear) work on torch 2.13.
#   optimum==2.3.0: transformers' GPTQ quantizer requires it to load a GPTQ checkpoint.
#   transformers==5.23.0, the same as mpq's venv.
#   pypcre (a GPTQModel dependency) is an sdist with a C extension: a C compiler must be present.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${GPTQ_VENV:-$HERE/../../.cache/gptq-loader-venv}"
TORCH_VERSION="2.13.0"
GPTQMODEL_VERSION="7.7.0"
OPTIMUM_VERSION="2.3.0"
TRANSFORMERS_VERSION="5.23.0"
PY="${PYTHON:-python3.11}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
# One compile job at a time (pypcre's C extension); nothing else is compiled.
export MAX_JOBS="${MAX_JOBS:-1}"

# GPTQModel 7.7.0's runtime requirements (its requirements.txt), minus torch and the
# quantization-only packages; versions are the ones this script was checked with.
DEPS=(
    "transformers==$TRANSFORMERS_VERSION" "optimum==$OPTIMUM_VERSION"
    "accelerate==1.15.0" "safetensors==0.8.0" "numpy==2.4.6" "threadpoolctl==3.8.0"
    "packaging==26.3" "device-smi==0.5.7" "protobuf==7.36.2" "pillow==13.0.0"
    "requests==2.34.2" "pypcre==0.6.4" "tokenicer==0.0.14" "logbar==0.4.15" "jinja2==3.1.6"
    "dill==0.4.1" "defuser==0.0.28" "filelock>=4.2.4"
)

# Reuse the venv when it already has the pinned versions (nothing is downloaded then).
check() {
    "$VENV/bin/python" - "$TORCH_VERSION" "$GPTQMODEL_VERSION" "$OPTIMUM_VERSION" \
        "$TRANSFORMERS_VERSION" <<'EOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
import torch, gptqmodel, optimum.gptq, transformers  # noqa: F401  (imports must work)
assert torch.__version__.split("+")[0] == sys.argv[1], torch.__version__
assert version("gptqmodel") == sys.argv[2], version("gptqmodel")
assert version("optimum") == sys.argv[3], version("optimum")
assert version("transformers") == sys.argv[4], version("transformers")
EOF
}

if [ -x "$VENV/bin/python" ] && check; then
    echo "reusing $VENV" >&2
else
    echo "building $VENV" >&2
    mkdir -p "$(dirname "$VENV")"
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    CONSTRAINTS="$VENV/torch-constraints.txt"
    echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"
    # pip's progress goes to stderr so stdout stays the one python path.
    "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
    "$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION" >&2
    "$VENV/bin/python" -m pip install --quiet -c "$CONSTRAINTS" "${DEPS[@]}" >&2
    "$VENV/bin/python" -m pip install --quiet -c "$CONSTRAINTS" --no-deps \
        "gptqmodel==$GPTQMODEL_VERSION" >&2
    check || { echo "GPTQModel venv at $VENV does not import" >&2; exit 1; }
fi

cd "$VENV" && echo "$(pwd)/bin/python"
