#!/usr/bin/env bash
# The test command: set up (idempotent), lint, then every test, the real-vLLM ones included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest -q "$@"
