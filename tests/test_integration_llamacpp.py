"""The llamacpp adapter against llama.cpp's own server (llama-server, built by
scripts/setup_llamacpp.sh), serving the tiny base converted to an f32 GGUF."""

from __future__ import annotations

import asyncio

import pytest
from reference import assert_same_tokens, proxy_tuned_greedy

from proxyclient import ProxyTuner, connect
from proxyclient.adapters.base import Prompt
from proxyclient.adapters.discovery import probe

pytestmark = pytest.mark.integration

PROMPTS = ["def main():", "import os\nclass Foo(object):\n    "]
N_TOKENS = 12
K = 20
# With an f32 KV cache and flash attention off (LlamaCppServer's defaults) llama.cpp's logprobs
# differ from transformers' by up to ~1.1e-5 on these models; a closer call may go either way.
LLAMACPP_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def llama_server(tiny_models, tmp_path_factory):
    from llamacpp_server import LlamaCppServer
    from make_gguf import build_gguf

    gguf = build_gguf(tiny_models["base"], tiny_models["base"].parent / "base-f32.gguf")
    logs = tmp_path_factory.mktemp("llamacpp-logs")
    with LlamaCppServer(gguf, "tiny-base", log_path=logs / "server.log") as server:
        yield server


@pytest.mark.parametrize("prompt", PROMPTS)
def test_llamacpp_equals_the_formula_on_the_top_k(llama_server, tiny_models, hf_models, prompt):
    base = connect("llamacpp", llama_server.base_url, "tiny-base")
    with ProxyTuner(base, tiny_models["expert"], tiny_models["anti_expert"], device="cpu") as t:
        got = t.generate(prompt, max_new_tokens=N_TOKENS, unseen="restrict", top_logprobs=K)
        expected = proxy_tuned_greedy(
            hf_models["base"], hf_models["expert"], hf_models["anti_expert"],
            t.tokenizer(prompt).input_ids, alpha=1.0, max_new_tokens=N_TOKENS,
            eos_ids=t.eos_ids, restrict_to_top_k=K,
        )  # fmt: skip
    assert got.usage.dropped_candidates == 0
    assert_same_tokens(got.token_ids, expected, t.eos_ids, tolerance=LLAMACPP_TOLERANCE)


def test_llamacpp_capabilities(llama_server):
    base = connect("llamacpp", llama_server.base_url, "tiny-base")
    capabilities = asyncio.run(probe(base, Prompt((0, 321), 2)))
    assert capabilities.token_id_prompts and capabilities.ids_in_response
    assert capabilities.logprobs == "raw"
