from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

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
