#!/usr/bin/env bash
# The main job on a fresh machine: set up, export SmolLM2-135M-Instruct to an INT8 bundle
# (cached under ~/.cache/edge-llm; rebuilt only if missing), serve it on a local socket and
# ask it a question through that socket. Usage: bash scripts/demo.sh ["your question"]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
CACHE=${EDGE_LLM_CACHE:-$HOME/.cache/edge-llm}
RECIPE=configs/recipes/smollm2-int8.toml
# Keyed by the recipe's content: editing the recipe builds a new bundle, an unchanged one is reused.
BUNDLE=${EDGE_LLM_BUNDLE:-$CACHE/bundles/smollm2-int8-$(sha256sum "$RECIPE" | cut -c1-12)}
QUESTION=${1:-What is the capital of France?}
if [ ! -f "$BUNDLE/bundle.json" ]; then
  .venv/bin/edge-llm export --recipe "$RECIPE" --out "$BUNDLE"
fi
SOCK=$(mktemp -u "${TMPDIR:-/tmp}/edge-llm-XXXXXX.sock")
.venv/bin/edge-llm serve --bundle "$BUNDLE" --socket "$SOCK" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do [ -S "$SOCK" ] && break; sleep 0.25; done
echo "> $QUESTION"
.venv/bin/edge-llm send --socket "$SOCK" --stats "$QUESTION"
