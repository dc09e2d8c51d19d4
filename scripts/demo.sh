#!/usr/bin/env bash
# The main job on a fresh machine: set up, export SmolLM2-135M-Instruct to an INT8 bundle, serve
# it on a local socket and ask it a question through that socket. Usage: bash scripts/demo.sh ["question"]
#
# `edge-llm export --recipe R` (no --out) writes $EDGE_LLM_CACHE/bundles/<name>-<hash of R> (default
# cache ~/.cache/edge-llm), reuses it while the recipe is unchanged, and links it as
# bundles/default: the bundle every edge-llm command uses without --bundle, as in the README.
# EDGE_LLM_BUNDLE=DIR serves DIR instead.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
QUESTION=${1:-What is the capital of France?}
if [ -n "${EDGE_LLM_BUNDLE:-}" ]; then
  BUNDLE=(--bundle "$EDGE_LLM_BUNDLE")
else
  .venv/bin/edge-llm export --recipe configs/recipes/smollm2-int8.toml
  BUNDLE=()
fi
SOCK=$(mktemp -u "${TMPDIR:-/tmp}/edge-llm-XXXXXX.sock")
.venv/bin/edge-llm serve ${BUNDLE[@]+"${BUNDLE[@]}"} --socket "$SOCK" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do [ -S "$SOCK" ] && break; sleep 0.25; done
echo "> $QUESTION"
.venv/bin/edge-llm send --socket "$SOCK" --stats "$QUESTION"
