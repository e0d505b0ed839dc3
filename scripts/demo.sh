#!/usr/bin/env bash
# The main job on a fresh machine: set up (idempotent), then the side-by-side demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
