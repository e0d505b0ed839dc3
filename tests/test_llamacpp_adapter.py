"""The llama.cpp adapter on JSON captured from a real llama-server (tests/fixtures/llamacpp;
requests.json is what was sent for each): parsing, error mapping, and dialect sniffing."""

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from proxyclient.adapters import connect
from proxyclient.adapters.base import Prompt
from proxyclient.adapters.discovery import sniff_dialect
from proxyclient.adapters.http import HTTPTransport
from proxyclient.errors import BadRequestError, ContextLengthError, NotFoundError

FIXTURES = Path(__file__).parent / "fixtures" / "llamacpp"
PROMPT = Prompt((0, 321, 530, 264, 827), 5)


def fixture(name):
    return json.loads((FIXTURES / name).read_text())


def answering(status, body):
    """A llama.cpp adapter whose server answers every request with ``status`` and ``body``."""

    def handler(request):
        return httpx.Response(status, json=body)

    return connect("llamacpp", "http://server", "tiny-base", transport=httpx.MockTransport(handler))


@pytest.mark.parametrize(("name", "k"), [("completion_k5.json", 5), ("completion_k20.json", 20)])
def test_captured_payloads_are_what_the_adapter_builds(name, k):
    sent = fixture("requests.json")[name]
    assert (sent["method"], sent["path"]) == ("POST", "/completion")
    llama = connect("llamacpp", "http://server", "tiny-base")
    assert llama.build_request(Prompt(tuple(sent["json"]["prompt"]), 5), k) == (
        "/completion",
        sent["json"],
    )


@pytest.mark.parametrize(("name", "k"), [("completion_k5.json", 5), ("completion_k20.json", 20)])
def test_captured_answers_parse_to_k_top_logprobs(name, k):
    body = fixture(name)
    entries = body["completion_probabilities"][0]["top_logprobs"]
    top = connect("llamacpp", "http://server", "tiny-base").parse_response(body, PROMPT, k)
    assert len(top) == k
    assert list(top.token_ids) == [e["id"] for e in entries]
    assert list(top.logprobs) == pytest.approx([e["logprob"] for e in entries])


def test_a_huge_k_gets_the_whole_vocabulary():
    """Asked for n_probs 10000, llama-server echoes n_probs 10000 and sends every token of its
    1024-token vocabulary: no error names a cap, so the adapter keeps all 1024."""
    captured = fixture("n_probs_10000.json")
    body = captured["body"]
    assert captured["status"] == 200 and body["generation_settings"]["n_probs"] == 10000
    assert fixture("requests.json")["n_probs_10000.json"]["json"]["n_probs"] == 10000
    llama = answering(200, body)
    top = asyncio.run(llama.top_logprobs(PROMPT, 10000))
    assert len(top) == 1024 == fixture("v1_models.json")["data"][0]["meta"]["n_vocab"]
    assert len(set(top.token_ids)) == 1024


def test_prompt_too_long_is_a_context_length_error():
    captured = fixture("error_prompt_too_long.json")
    assert fixture("requests.json")["error_prompt_too_long.json"]["json"]["prompt"]
    llama = answering(captured["status"], captured["body"])
    with pytest.raises(ContextLengthError, match="exceeds the available context size") as info:
        asyncio.run(llama.top_logprobs(PROMPT, 5))
    assert info.value.status_code == 400
    assert "no longer fit the server's context window" in str(info.value)


def test_a_token_out_of_the_vocabulary_is_a_bad_request():
    captured = fixture("error_token_out_of_vocab.json")
    assert 5000 in fixture("requests.json")["error_token_out_of_vocab.json"]["json"]["prompt"]
    llama = answering(captured["status"], captured["body"])
    with pytest.raises(BadRequestError, match="HTTP 400: Prompt contains invalid tokens") as info:
        asyncio.run(llama.top_logprobs(PROMPT, 5))
    assert type(info.value) is BadRequestError  # not mistaken for a k or context error


def test_a_wrong_path_is_not_found():
    captured = fixture("error_wrong_path.json")
    llama = answering(captured["status"], captured["body"])
    with pytest.raises(NotFoundError, match="File Not Found"):
        asyncio.run(llama.top_logprobs(PROMPT, 5))


def test_sniffs_llamacpp_from_what_llama_server_answers():
    answers = {
        "/props": (200, fixture("props.json")),
        "/health": (fixture("health.json")["status"], fixture("health.json")["body"]),
        "/v1/models": (200, fixture("v1_models.json")),
    }
    asked = []

    def handler(request):
        asked.append(request.url.path)
        status, body = answers.get(
            request.url.path, (404, fixture("error_wrong_path.json")["body"])
        )
        return httpx.Response(status, json=body)

    for base_url in ("http://server", "http://server/v1"):
        transport = HTTPTransport(base_url, transport=httpx.MockTransport(handler))
        assert asyncio.run(sniff_dialect(transport)) == "llamacpp"
    assert "/props" in asked
