"""A base and proxies that tokenize differently, end to end.

Base: the tiny byte-level BPE model on a real vLLM server (and a tiktoken-tokenized base behind the
OpenAI dialect fixture). Proxies: expert_sp / anti_expert_sp, on a Metaspace + byte-fallback
tokenizer. The loop combines on the shared byte vocabulary and keeps both sides on the same bytes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from transformers import AutoTokenizer

from proxyclient import ConfigError, ProxyTuner, connect
from proxyclient.tokenizer import BaseTokenizer
from tests.support.constants import BASE_NAME
from tests.support.dialect_servers import DialectServer
from tests.support.other_tokenizers import tiktoken_twin
from tests.support.reference import server_greedy
from tests.support.reference_bridged import BridgedWorld
from tests.support.speculation_checks import (
    DRAFT_TOKENS,
    UNSEEN,
    UNTWINNED,
    assert_drafts_give_off_tokens,
    property_settings,
)

pytestmark = pytest.mark.integration

PROMPTS = ["def main():", "import os\nclass Foo(object):\n    ", "x = '日本' # 🙂"]
N = 16


@pytest.fixture(scope="module")
def bridged(servers, tiny_models):
    base = connect("vllm", servers["full"].base_url, BASE_NAME)
    with ProxyTuner(
        base, tiny_models["expert_sp"], tiny_models["anti_expert_sp"],
        base_tokenizer=tiny_models["base"], device="cpu",
    ) as tuner:  # fmt: skip
        yield tuner


@pytest.mark.parametrize("prompt", PROMPTS)
def test_alpha_zero_reproduces_the_bases_greedy_text(servers, bridged, prompt):
    got = bridged.generate(prompt, max_new_tokens=N, alpha=0.0, unseen="restrict", base_k=20)
    base_ids = bridged.tokens.base_tokenizer.encode(prompt)
    assert got.token_ids == server_greedy(servers["full"], base_ids, N)
    assert got.text == bridged.tokens.base_tokenizer.decode(got.token_ids)


def test_expert_equal_to_anti_expert_reproduces_it_too(servers, tiny_models):
    base = connect("vllm", servers["full"].base_url, BASE_NAME)
    with ProxyTuner(
        base, tiny_models["anti_expert_sp"], tiny_models["anti_expert_sp"],
        base_tokenizer=tiny_models["base"], device="cpu",
    ) as same:  # fmt: skip
        for prompt in PROMPTS:
            got = same.generate(prompt, max_new_tokens=N, alpha=2.0, unseen="restrict", base_k=20)
            expected = server_greedy(servers["full"], same.tokens.base_tokenizer.encode(prompt), N)
            assert got.token_ids == expected


def test_a_steering_expert_moves_the_output_and_text_stays_valid(bridged):
    moved = 0
    for prompt in PROMPTS:
        plain = bridged.generate(prompt, max_new_tokens=N, alpha=0.0, unseen="restrict", base_k=20)
        steered = bridged.generate(
            prompt, max_new_tokens=N, alpha=2.0, unseen="restrict", base_k=20
        )
        moved += sum(a != b for a, b in zip(plain.token_ids, steered.token_ids, strict=False))
        # Whatever the token boundaries, the text is the base bytes, decoded: valid UTF-8.
        assert steered.text.encode("utf-8").decode("utf-8") == steered.text
        assert steered.text == bridged.tokens.base_tokenizer.decode(steered.token_ids)
        usage = steered.usage
        # Candidates with no single-token twin are counted and, under `prefix`, kept.
        assert 0 < usage.untwinned_candidates < usage.candidates
        assert usage.dropped_candidates == 0
        dropping = bridged.generate(prompt, max_new_tokens=N, alpha=2.0, untwinned="drop")
        assert dropping.usage.dropped_candidates == dropping.usage.untwinned_candidates > 0
    assert moved >= N  # at least a third of the positions over the three prompts


@pytest.fixture(scope="module", params=["sp", "fine"])
def drafting(request, servers, tiny_models, hf_models):
    """The vLLM base with proxies on the Metaspace tokenizer, or on the one with about a token
    per character (one base token spelled by several proxy tokens)."""
    expert, anti = f"expert_{request.param}", f"anti_expert_{request.param}"
    base = connect("vllm", servers["full"].base_url, BASE_NAME)
    world = BridgedWorld(
        hf_models["base"], hf_models[expert], hf_models[anti], hf_models["tokenizer"],
        AutoTokenizer.from_pretrained(tiny_models[anti]),
    )  # fmt: skip
    with ProxyTuner(
        base, tiny_models[expert], tiny_models[anti], base_tokenizer=tiny_models["base"],
        device="cpu",
    ) as tuner:  # fmt: skip
        yield tuner, world


@property_settings(max_examples=8)
@given(
    prompt=st.sampled_from([*PROMPTS, "You may convey", "The licensee shall"]),
    alpha=st.sampled_from([0.5, 1.0, 2.0]),
    draft_tokens=DRAFT_TOKENS,
    unseen=UNSEEN,
    untwinned=UNTWINNED,
)
def test_base_drafts_through_vllm_give_off_tokens(
    drafting, prompt, alpha, draft_tokens, unseen, untwinned
):
    """What auto picks on vLLM, against one request per token and the bridged reference."""
    tuner, world = drafting
    assert_drafts_give_off_tokens(
        tuner, world, prompt, draft_tokens=draft_tokens, max_new_tokens=N, alpha=alpha,
        base_k=20, unseen=unseen, untwinned=untwinned,
    )  # fmt: skip


def test_without_the_base_tokenizer_the_mismatch_is_named(servers, tiny_models):
    base = connect("vllm", servers["full"].base_url, BASE_NAME)
    with (
        ProxyTuner(base, tiny_models["expert_sp"], tiny_models["anti_expert_sp"]) as tuner,
        pytest.raises(
            ConfigError, match=r"tokenizes the prompt differently.*base_tokenizer=\.\.\."
        ),
    ):
        tuner.generate(PROMPTS[0], max_new_tokens=2)


def test_cli_with_a_base_tokenizer(servers, tiny_models, bridged):
    run = subprocess.run(
        [sys.executable, "-m", "proxyclient.cli", "generate", "--api", "vllm",
         "--base-url", servers["full"].base_url, "--base-model", BASE_NAME,
         "--base-tokenizer", str(tiny_models["base"]), "--expert", str(tiny_models["expert_sp"]),
         "--anti-expert", str(tiny_models["anti_expert_sp"]), "--prompt", PROMPTS[0],
         "--max-new-tokens", str(N), "--alpha", "1.0", "--temperature", "0", "--json",
         "--threads", "1", "--unseen", "residual", "--untwinned", "prefix",
         "--base-k", "20", "--speculate", "off"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    # The same settings on both sides, all explicit: no default decides the comparison.
    expected = bridged.generate(
        PROMPTS[0], max_new_tokens=N, alpha=1.0, temperature=0.0, unseen="residual",
        untwinned="prefix", base_k=20, speculate="off",
    )  # fmt: skip
    assert result["token_ids"] == expected.token_ids
    assert result["text"] == expected.text


def test_a_tiktoken_base_through_the_openai_dialect(tiny_models, hf_models):
    encoding = tiktoken_twin(hf_models["tokenizer"])
    with DialectServer("openai", tiny_models["base"], tokenizer=encoding) as server:
        base = connect("openai", server.base_url, "tiny-base", tokenizer=BaseTokenizer(encoding))
        with ProxyTuner(
            base, tiny_models["expert_sp"], tiny_models["anti_expert_sp"],
            base_tokenizer=encoding, device="cpu",
        ) as tuner:  # fmt: skip
            got = tuner.generate(
                PROMPTS[0], max_new_tokens=N, alpha=0.0, unseen="restrict", base_k=5
            )
            steered = tuner.generate(
                PROMPTS[0], max_new_tokens=N, alpha=2.0, unseen="restrict", base_k=5
            )
        greedy = httpx.post(
            f"{server.base_url}/completions",
            json={"model": "tiny-base", "prompt": PROMPTS[0], "max_tokens": N, "temperature": 0},
            timeout=60,
        ).json()["choices"][0]["text"]
    assert got.text == greedy
    assert steered.token_ids != got.token_ids
