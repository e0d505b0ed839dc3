from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from tests.support.constants import API_KEY, BASE_NAME, REPO

# The client shares this machine's 2 cores with the vLLM server: with 2 torch threads the OpenMP
# spin-waits of both processes fight over them (a tiny forward took ~250 ms instead of ~2 ms).
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The on-disk vocabulary-bridge cache (proxyclient.bridge_cache): a fresh folder per test session,
# set before any test runs, so no test loads a map written by older code (or by another checkout);
# the CLI tests' subprocesses inherit it.
_BRIDGE_CACHE = tempfile.mkdtemp(prefix="proxyclient-test-cache-")
os.environ["PROXYCLIENT_CACHE_DIR"] = _BRIDGE_CACHE
atexit.register(shutil.rmtree, _BRIDGE_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    """Tiny tokenizer + base/expert/anti-expert models, built offline once and cached."""
    from scripts.make_tiny_models import build_tiny_models

    out = Path(os.environ.get("PROXYCLIENT_TINY_MODELS", REPO / ".cache" / "tiny-models"))
    return build_tiny_models(out)


@pytest.fixture(scope="session")
def hf_models(tiny_models):
    """The tiny models loaded with transformers (fp32, CPU), for references."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = {
        name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        for name, path in tiny_models.items()
    }
    loaded["tokenizer"] = AutoTokenizer.from_pretrained(tiny_models["anti_expert"])
    return loaded


@pytest.fixture(scope="session")
def servers(tiny_models, tmp_path_factory):
    """Two real vLLM servers for the base, started together once per test session.

    - full: --max-logprobs -1 (k = -1 returns the whole vocabulary);
    - capped: --max-logprobs 20, --max-model-len 256, --api-key (the errors users meet).
    """
    from scripts.vllm_server import VLLMServer, start_many

    logs = tmp_path_factory.mktemp("vllm-logs")
    full = VLLMServer(tiny_models["base"], BASE_NAME, max_logprobs=-1, log_path=logs / "full.log")
    capped = VLLMServer(
        tiny_models["base"],
        BASE_NAME,
        max_logprobs=20,
        max_model_len=256,
        extra_args=["--api-key", API_KEY],
        log_path=logs / "capped.log",
    )
    start_many([full, capped])
    yield {"full": full, "capped": capped}
    full.stop()
    capped.stop()


@pytest.fixture(scope="module")
def local_tuner(tiny_models, hf_models):
    """A tuner on an in-process base (tests/support/local_base.py) that drafts; one per test
    module, so a module may set its base to fail (``fail_at_request``) without reaching another."""
    from proxyclient import ProxyTuner
    from tests.support.local_base import LocalBase

    base = LocalBase(hf_models["base"], drafts=True)
    with ProxyTuner(base, tiny_models["expert"], tiny_models["anti_expert"], device="cpu") as t:
        yield t
