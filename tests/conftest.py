from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

BASE_NAME = "tiny-base"
API_KEY = "sk-integration-test-key"

# The client shares this machine's few cores with the vLLM server (shared/notes/real-servers.md).
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    """Tiny tokenizer + base/expert/anti-expert models, built offline once and cached."""
    from make_tiny_models import build_tiny_models

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
    from vllm_server import VLLMServer, start_many

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
