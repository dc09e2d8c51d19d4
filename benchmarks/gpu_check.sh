#!/usr/bin/env bash
# The cuda target on a GPU machine, in one go (issue 13 item 6): install what it needs, export
# the cuda bundle, answer "What is the capital of France?" with CUDAExecutionProvider reported,
# run the bench rows for cuda beside cpu in the same run, and write JSON + Markdown.
#
#   bash benchmarks/gpu_check.sh                 # everything, ~8 min budget on a fresh machine
#   BUNDLE=DIR bash benchmarks/gpu_check.sh      # skip the export: use this cuda (or cpu) bundle
#
# Without a usable NVIDIA GPU it stops at once, before installing anything (exit 2).
#
# Environment (all optional):
#   OUT           results folder (default benchmarks/results/gpu_check)
#   GPU_VENV      venv with onnxruntime-gpu (default $EDGE_LLM_CACHE/gpu-venv, ~/.cache/edge-llm/gpu-venv);
#                 reused when it already runs CUDAExecutionProvider. onnxruntime-gpu replaces the
#                 `onnxruntime` module, so it never goes into the export venv.
#   ORT_GPU       pip requirement (default 'onnxruntime-gpu[cuda,cudnn]': the CUDA 12 and cuDNN 9
#                 runtime libraries as pip wheels, so no system CUDA toolkit is needed)
#   EXPORT_PYTHON an interpreter with the export extra (torch, transformers, optimum); default
#                 .venv/bin/python, else a CPU-torch venv is made at $EXPORT_VENV by
#                 scripts/install_torch.py (the export runs on the CPU; only the runtime uses the GPU)
#   PIP_FIND_LINKS / PIP_NO_INDEX   pip's own variables: install from a local wheelhouse offline
#   BUDGET_S      stop with a clear message when a step would start after this many seconds (480)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE=${EDGE_LLM_CACHE:-$HOME/.cache/edge-llm}
OUT=${OUT:-benchmarks/results/gpu_check}
GPU_VENV=${GPU_VENV:-$CACHE/gpu-venv}
EXPORT_VENV=${EXPORT_VENV:-$CACHE/gpu-export-venv}
ORT_GPU=${ORT_GPU:-onnxruntime-gpu[cuda,cudnn]}
BUDGET_S=${BUDGET_S:-480}
PROMPT="What is the capital of France?"
export ORT_DISABLE_TELEMETRY=1 PYTHONPATH=$ROOT

say() { printf 'gpu_check [%3ds]: %s\n' "$SECONDS" "$*" >&2; }
die() { say "FAILED: $*"; exit 1; }
step() {  # step NAME: refuse to start past the budget (the whole run is meant to fit 8 minutes)
  if (( SECONDS > BUDGET_S )); then die "budget of ${BUDGET_S}s spent before '$1'"; fi
  say "$1"
}

# 1. A GPU, or stop now: no installs, no export, exit 2 (not "passed", not "failed to run").
if ! command -v nvidia-smi >/dev/null 2>&1; then
  say "no NVIDIA GPU here: nvidia-smi is not installed (no driver). Nothing was checked."
  exit 2
fi
if ! GPUS=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1) || [ -z "$GPUS" ]; then
  say "no NVIDIA GPU here: nvidia-smi found no device ($GPUS). Nothing was checked."
  exit 2
fi
say "GPU: $GPUS"
mkdir -p "$OUT"

pick_python() {  # the newest python3.x on PATH that onnxruntime-gpu has wheels for
  for v in 3.12 3.11 3.10; do command -v "python$v" >/dev/null 2>&1 && { echo "python$v"; return; }; done
  echo python3
}

# 2. The runtime venv: onnxruntime-gpu + the runtime's four dependencies.
cuda_ok() { "$GPU_VENV/bin/python" - <<'EOF' 2>/dev/null
import onnxruntime as ort
assert "CUDAExecutionProvider" in ort.get_available_providers()
EOF
}
if [ -x "$GPU_VENV/bin/python" ] && cuda_ok; then
  say "reusing $GPU_VENV"
else
  step "making $GPU_VENV with $ORT_GPU"
  "$(pick_python)" -m venv "$GPU_VENV"
  "$GPU_VENV/bin/python" -m pip install -q --upgrade pip
  "$GPU_VENV/bin/python" -m pip install -q "$ORT_GPU" numpy tokenizers paho-mqtt psutil
  cuda_ok || die "onnxruntime-gpu installed but CUDAExecutionProvider is not available: $("$GPU_VENV/bin/python" -c 'import onnxruntime as o; print(o.__version__, o.get_available_providers())')"
fi
RUN=$GPU_VENV/bin/python
# onnxruntime-gpu >= 1.19 finds the pip CUDA/cuDNN libraries only after preload_dlls(); edge_llm
# does not call it, so put them on the loader path for every command below.
NV_LIBS=$("$RUN" - <<'EOF'
import glob, os, site
print(":".join(sorted({os.path.dirname(p) for d in site.getsitepackages() for p in glob.glob(d + "/nvidia/*/lib/*.so*")})))
EOF
)
export LD_LIBRARY_PATH=${NV_LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
"$RUN" -m edge_llm.cli doctor --json > "$OUT/doctor.json" || die "edge-llm doctor failed under $RUN"

# 3. The cuda bundle: given, or exported on the CPU by the export venv.
if [ -n "${BUNDLE:-}" ]; then
  [ -f "$BUNDLE/bundle.json" ] || die "BUNDLE=$BUNDLE has no bundle.json"
  say "using BUNDLE=$BUNDLE"
else
  BUNDLE=$CACHE/bundles/gpu-check-cuda
  PY=${EXPORT_PYTHON:-}
  if [ -z "$PY" ] && [ -x .venv/bin/python ] && .venv/bin/python -c "import torch, optimum" 2>/dev/null; then
    PY=.venv/bin/python
  fi
  if [ -z "$PY" ]; then
    step "making $EXPORT_VENV (CPU torch: the export does not need the GPU)"
    [ -x "$EXPORT_VENV/bin/python" ] || "$(pick_python)" -m venv "$EXPORT_VENV"
    "$EXPORT_VENV/bin/python" -m pip install -q --upgrade pip
    "$EXPORT_VENV/bin/python" scripts/install_torch.py "torch==2.13.0"
    "$EXPORT_VENV/bin/python" -m pip install -q -e ".[export]"
    PY=$EXPORT_VENV/bin/python
  fi
  if [ -f "$BUNDLE/bundle.json" ]; then
    say "reusing $BUNDLE"
  else
    step "exporting SmolLM2 for --target cuda with $PY"
    # --model: the default recipe (fused graph, int8 block 64, int8 embeddings) without its
    # [evaluate], whose WikiText path a GPU machine may not have.
    "$PY" -m edge_llm.cli export --model smollm2 --target cuda --out "$BUNDLE" \
      2> "$OUT/export.log" || die "export failed (last lines of $OUT/export.log: $(tail -3 "$OUT/export.log"))"
  fi
fi

# 4. Paris, with the provider that ran the graph reported by --stats.
step "generate --provider cuda --stats"
"$RUN" -m edge_llm.cli generate --bundle "$BUNDLE" --provider cuda --stats --max-tokens 16 "$PROMPT" \
  > "$OUT/answer.txt" 2> "$OUT/generate.stderr" || die "generate failed: $(tail -3 "$OUT/generate.stderr")"
grep '^{' "$OUT/generate.stderr" | tail -1 > "$OUT/generate_stats.json" || die "no --stats line in $OUT/generate.stderr"
say "answer: $(tr '\n' ' ' < "$OUT/answer.txt")"

# 5. Bench rows: cuda beside cpu, interleaved in one run (ratios, not absolute claims).
step "bench --provider cuda,cpu"
"$RUN" -m edge_llm.cli bench --bundle "$BUNDLE" --provider cuda,cpu --runs 3 --new-tokens 64 \
  --batch-sizes 1,4,8 --json "$OUT/bench.json" --markdown "$OUT/bench.md" 2> "$OUT/bench.stderr" \
  || die "bench failed: $(tail -3 "$OUT/bench.stderr")"

# 6. One summary; exit 1 unless CUDA really ran the graph and the answer names Paris.
"$RUN" - "$OUT" "$BUNDLE" "$SECONDS" <<'EOF'
import json, sys
from pathlib import Path
out, bundle, seconds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
stats = json.loads((out / "generate_stats.json").read_text())
answer = (out / "answer.txt").read_text().strip()
doctor = json.loads((out / "doctor.json").read_text())
summary = {
    "bundle": bundle,
    "target": json.loads((Path(bundle) / "bundle.json").read_text()).get("requirements", {}).get("target"),
    "onnxruntime": doctor.get("onnxruntime"),
    "answer": answer,
    "paris": "paris" in answer.lower(),
    "provider": stats.get("provider"),
    "cpu_fallback_nodes": stats.get("cpu_fallback_nodes"),
    "stats": stats,
    "bench": json.loads((out / "bench.json").read_text()),
    "seconds": seconds,
}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
ok = summary["paris"] and summary["provider"] == "CUDAExecutionProvider"
print(json.dumps({k: summary[k] for k in ("provider", "cpu_fallback_nodes", "paris", "answer", "seconds")}))
sys.exit(0 if ok else 1)
EOF
say "done: $OUT/gpu_check.json, $OUT/bench.md"
