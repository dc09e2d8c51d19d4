#!/usr/bin/env bash
# Set up (scripts/setup.sh), then lint and run the test suite. Extra args go to pytest
# (e.g. `bash scripts/test.sh -m slow` for the tests that use the real SmolLM2).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  echo "mosquitto is needed by the MQTT tests: apt-get install -y mosquitto mosquitto-clients" >&2
  exit 1
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .   # every file as ruff formats it (lint alone let 8 files drift)
.venv/bin/python -m pytest -q "$@"
