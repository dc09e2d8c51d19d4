#!/usr/bin/env bash
# Create the venv that holds the *peer* runtimes of the speed benchmark
# (llama.cpp via llama-cpp-python, onnxruntime-genai + its model builder,
# transformers 5). Kept apart from the project venv because the ort-genai
# builder needs transformers 5 while the export pipeline pins 4.57.
#
# Idempotent: re-running only installs what is missing.
#
#   bash benchmarks/setup_peers.sh            # venv at ${EDGE_LLM_CACHE:-~/.cache/edge-llm}/peers-venv
#   PEERS_VENV=/some/dir bash benchmarks/setup_peers.sh
#   LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF" bash benchmarks/setup_peers.sh   # custom llama.cpp build
#
# llama-cpp-python has no CPU wheel on PyPI: it is compiled from the sdist
# (gcc + cmake, ~10-20 min on 2 cores). The built wheel is kept by pip's cache,
# so a second venv builds in seconds.
set -euo pipefail

CACHE="${EDGE_LLM_CACHE:-$HOME/.cache/edge-llm}"
VENV="${PEERS_VENV:-$CACHE/peers-venv}"
PY="${PYTHON:-python3.11}"

LLAMA_CPP_PYTHON_VERSION="0.3.36"
ORT_GENAI_SPEC="onnxruntime-genai==0.18.*"
TORCH_SPEC="torch==2.13.0"        # pinned: an unpinned torch pulls multi-GB CUDA wheels
TRANSFORMERS_SPEC="transformers>=5,<6"

mkdir -p "$CACHE"
if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup_peers] creating venv $VENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip wheel
fi
VPY="$VENV/bin/python"

have() {  # have DIST SPEC -> 0 if installed version satisfies SPEC
    "$VPY" - "$1" "$2" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
from packaging.specifiers import SpecifierSet
try:
    v = version(sys.argv[1])
except PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if SpecifierSet(sys.argv[2]).contains(v, prereleases=True) else 1)
EOF
}

"$VPY" -m pip install -q packaging >/dev/null

need=()
have torch "==2.13.0" || need+=("$TORCH_SPEC")
have transformers ">=5,<6" || need+=("$TRANSFORMERS_SPEC")
have onnxruntime-genai "==0.18.*" || need+=("$ORT_GENAI_SPEC")
for p in tokenizers psutil numpy onnx onnx-ir safetensors sentencepiece protobuf accelerate gguf; do
    have "$p" ">=0" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    echo "[setup_peers] installing: ${need[*]}"
    # torch first and alone so that nothing can drag a CUDA build in.
    if [[ " ${need[*]} " == *" $TORCH_SPEC "* ]]; then
        "$VPY" -m pip install -q --only-binary=:all: "$TORCH_SPEC"
    fi
    "$VPY" -m pip install -q --only-binary=:all: "$TORCH_SPEC" "${need[@]}"
fi

if ! have llama-cpp-python "==$LLAMA_CPP_PYTHON_VERSION"; then
    echo "[setup_peers] building llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION from source (slow)"
    CMAKE_ARGS="${LLAMA_CMAKE_ARGS:-${CMAKE_ARGS:-}}" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        "$VPY" -m pip install -v "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
fi

"$VPY" - <<'EOF'
from importlib.metadata import version
for d in ("llama-cpp-python", "onnxruntime-genai", "onnxruntime", "transformers", "torch",
          "tokenizers", "psutil"):
    try:
        print(f"  {d:20s} {version(d)}")
    except Exception as e:  # noqa: BLE001
        print(f"  {d:20s} MISSING ({e})")
EOF
echo "[setup_peers] ok: $VPY"
