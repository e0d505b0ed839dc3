#!/usr/bin/env bash
# The main job on a fresh machine: set up (idempotent), then the side-by-side demo.
set -euo pipefail
cd "$(dirname "$0")/.."
PROXYCLIENT_SKIP_LLAMACPP=1 bash scripts/setup.sh  # the demo needs vLLM, not llama.cpp
exec .venv/bin/python scripts/demo.py "$@"
