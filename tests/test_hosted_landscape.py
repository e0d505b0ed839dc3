"""The hosted landscape as of 2026-12-03 (issue 24): OpenAI's retired completion models and its
reasoning models, Gemini's tokenId (used where they are the base tokenizer's ids), Azure OpenAI's
silent cap on top_logprobs, OpenRouter, and Mistral (no dialect)."""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
import pytest

from proxyclient import connect
from proxyclient.adapters import BUILTIN
from proxyclient.adapters.base import Prompt
from proxyclient.adapters.discovery import probe
from proxyclient.adapters.openrouter import OpenRouterChat
from proxyclient.errors import BadRequestError, ConfigError, NotFoundError
from proxyclient.tokenizer import BaseTokenizer
from tests.support import (
    dialect_azure,  # noqa: F401  (registers the "azure-openai-chat" fixture dialect)
    dialect_gemini,  # noqa: F401
)
from tests.support.dialect_servers import DialectServer, token_bytes
from tests.support.hosted import connected, ids_of, run_step
from tests.support.reference import valid_utf8

KEY = "AIzaSy-landscape-test-0123456789"
GEMINI_API = "https://generativelanguage.googleapis.com/v1beta"


@pytest.fixture(scope="module")
def tokenizer(hf_models) -> BaseTokenizer:
    return BaseTokenizer(hf_models["tokenizer"])


def answering(status: int, payload: dict):
    return httpx.MockTransport(lambda request: httpx.Response(status, json=payload))


def openai_error(status: int, message: str, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error", "param": None,
                      "code": code}}  # fmt: skip


# -- OpenAI ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["gpt-3.5-turbo-instruct", "davinci-002", "babbage-002"])
def test_a_retired_completion_model_says_when_and_what_instead(tokenizer, model):
    message = f"The model `{model}` has been deprecated, learn more here: https://platform.openai.com/docs/deprecations"
    transport = answering(404, openai_error(404, message, "model_not_found"))
    base = connect("openai", None, model, tokenizer=tokenizer, transport=transport, max_retries=0)
    with pytest.raises(NotFoundError, match=r"shut down .* on 2026-09-28 .*--api openai-chat"):
        run_step(base, Prompt((1, 2), 2))


@pytest.mark.parametrize(
    ("model", "status", "message", "fix"),
    [
        ("o4-mini", 403, "You are not allowed to request logprobs from this model", "never gives"),
        ("gpt-5.2", 400, "Unsupported parameter: 'logprobs' is not supported with this model.",
         'reasoning_effort="none"'),
    ],
)  # fmt: skip
def test_a_reasoning_model_s_refusal_names_the_fix(tokenizer, model, status, message, fix):
    transport = answering(status, openai_error(status, message, "unsupported_parameter"))
    base = connect(
        "openai-chat", None, model, tokenizer=tokenizer, transport=transport, max_retries=0
    )
    with pytest.raises(BadRequestError if status == 400 else Exception, match=fix) as caught:
        run_step(base, Prompt((1, 2), 2))
    assert "reasoning model" in str(caught.value) and message in str(caught.value)


def test_reasoning_effort_is_sent_where_given(tokenizer):
    base = connect("openai-chat", None, "gpt-5.2", tokenizer=tokenizer, reasoning_effort="none")
    assert base.build_request(Prompt((1, 2), 2), 20)[1]["reasoning_effort"] == "none"
    plain = connect("openai-chat", None, "gpt-4.1", tokenizer=tokenizer)
    assert "reasoning_effort" not in plain.build_request(Prompt((1, 2), 2), 20)[1]


# -- Azure OpenAI: top_logprobs 20 answered with 5 ----------------------------------------------


@pytest.fixture(scope="module")
def azure(tiny_models):
    with DialectServer("azure-openai-chat", tiny_models["base"]) as server:
        yield server


def test_a_silent_cap_on_k_becomes_max_k_with_one_warning(azure, tokenizer, caplog):
    ids = tuple(tokenizer.encode("def main():"))
    with (
        caplog.at_level(logging.WARNING, logger="proxyclient.adapters.dialect"),
        connected("openai-chat", azure, tokenizer, "tiny-base") as base,
    ):
        assert base.capabilities.max_k == 20
        for _ in range(2):
            top = asyncio.run(base.top_logprobs(Prompt(ids, len(ids)), 20))
            assert len(top) + top.unresolved == 5
        assert base.capabilities.max_k == base.k_cap_seen == 5
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "answered 5 top logprobs where 20 were asked for" in warnings[0]
    assert "caps k at 5" in warnings[0] and "base_k=5" in warnings[0]


def test_inspect_finds_the_silent_cap(azure, tokenizer):
    ids = tuple(tokenizer.encode("def main():"))
    with connected("openai-chat", azure, tokenizer, "tiny-base") as base:
        assert asyncio.run(probe(base, Prompt(ids, len(ids)))).max_k == 5


def test_a_natural_shortfall_is_no_cap(tokenizer):
    """Fewer entries than asked where the vocabulary has no more tokens: nothing to learn."""
    base = connect("openai-chat", "http://server/v1", "m", tokenizer=tokenizer)
    vocab = len(tokenizer.vocab)
    base.note_top_size(vocab, vocab + 10)
    base.note_top_size(20, 20)
    assert base.k_cap_seen is None and base.capabilities.max_k == 20


# -- Gemini: tokenId ------------------------------------------------------------------------------


def gemini_answer(entries) -> dict:
    def entry(token, token_id, logprob):
        return {"token": token, "tokenId": token_id, "logProbability": logprob}

    return {"candidates": [{
        "content": {"role": "model", "parts": [{"text": entries[0][0]}]},
        "finishReason": "MAX_TOKENS",
        "logprobsResult": {"topCandidates": [{"candidates": [entry(*e) for e in entries]}],
                           "chosenCandidates": [entry(*entries[0])]},
    }]}  # fmt: skip


def gemini(tokenizer, **options):
    return connect("gemini", "https://gemini.test/v1beta", "gemini-2.0-flash",
                   tokenizer=tokenizer, **options)  # fmt: skip


def test_gemini_token_ids_that_spell_their_texts_are_used(tokenizer, hf_models):
    partial = next(i for i in range(len(tokenizer.vocab))
                   if not valid_utf8(token_bytes(hf_models["tokenizer"], i)))  # fmt: skip
    [def_id, return_id] = ids_of(tokenizer, "def", "Ġreturn")
    body = gemini_answer(
        [("def", def_id, -0.5), ("\ufffd", partial, -1.0), (" return", return_id, -2.0)]
    )
    base = gemini(tokenizer)
    top = base.parse_response(body, Prompt((0,), 1), 20)
    assert top.token_ids == (def_id, partial, return_id) and top.unresolved == 0
    assert base.token_ids is True and base.capabilities.ids_in_response


def test_gemini_token_ids_of_another_vocabulary_fall_back_to_text_with_one_warning(
    tokenizer, caplog
):
    [def_id, return_id] = ids_of(tokenizer, "def", "Ġreturn")
    body = gemini_answer([("def", return_id, -0.5), ("\ufffd", 3, -1.0), (" return", def_id, -2.0)])
    base = gemini(tokenizer)
    with caplog.at_level(logging.WARNING, logger="proxyclient.adapters.gemini"):
        for _ in range(2):
            top = base.parse_response(body, Prompt((0,), 1), 20)
    assert top.token_ids == (def_id, return_id) and top.unresolved == 1
    assert base.token_ids is False and not base.capabilities.ids_in_response
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "its tokenId are not the ids of the base tokenizer" in warnings[0]
    assert f"tokenId {return_id} is ' return' in the base tokenizer" in warnings[0]
    assert not gemini(tokenizer, token_ids=False).capabilities.ids_in_response


def test_a_greedy_path_through_part_of_a_character_is_followed_by_id(tiny_models, tokenizer):
    """At alpha 0 the base alone: its greedy text on this prompt passes through tokens that are
    part of a character (text U+FFFD), which only their tokenId can name (with token_ids=False
    the tuner cannot choose them and goes elsewhere). Base drafts, since the answer so far goes
    back as text, where a character cut in two would be U+FFFD."""
    prompt = "Привет мир"
    with DialectServer("gemini", tiny_models["base"], api_key=KEY) as server:
        answer = httpx.post(
            f"{server.base_url}/models/tiny-base:generateContent",
            headers={"x-goog-api-key": KEY},
            json={"contents": [{"role": "user", "parts": [{"text": prompt}]}],
                  "generationConfig": {"maxOutputTokens": 10, "temperature": 0.0,
                                       "responseLogprobs": True, "logprobs": 1}},
            timeout=60,
        ).json()  # fmt: skip
        chosen = answer["candidates"][0]["logprobsResult"]["chosenCandidates"]
        assert any(c["token"] == "\ufffd" for c in chosen)  # the path this test is about
        from proxyclient import ProxyTuner

        base = connect("gemini", server.base_url, "tiny-base", tokenizer=tokenizer, api_key=KEY)
        with ProxyTuner(base, tiny_models["expert"], tiny_models["anti_expert"], device="cpu") as t:
            got = t.generate(prompt, max_new_tokens=10, alpha=0.0, unseen="restrict", base_k=20,
                             speculate="base")  # fmt: skip
    assert list(got.token_ids) == [c["tokenId"] for c in chosen]
    assert got.text == answer["candidates"][0]["content"]["parts"][0]["text"]


@pytest.mark.parametrize(
    ("model", "base_url", "advice"),
    [
        ("gemini-3-flash", GEMINI_API, "3.x models give no"),
        ("gemini-2.5-flash", GEMINI_API, "only on Vertex"),
    ],
)  # fmt: skip
def test_a_gemini_refusal_of_logprobs_says_which_models_have_them(
    tokenizer, model, base_url, advice
):
    error = {"error": {"code": 400, "message": f"Logprobs is not enabled for models/{model}",
                       "status": "INVALID_ARGUMENT"}}  # fmt: skip
    base = connect("gemini", base_url, model, tokenizer=tokenizer, continue_model_turn=True,
                   transport=answering(400, error), max_retries=0)  # fmt: skip
    with pytest.raises(BadRequestError, match=advice):
        run_step(base, Prompt((1, 2), 2))


# -- OpenRouter; Mistral --------------------------------------------------------------------------


def test_openrouter_asks_only_upstreams_that_give_logprobs(tokenizer):
    assert BUILTIN["openrouter"] is OpenRouterChat
    assert OpenRouterChat.default_base_url == "https://openrouter.ai/api/v1"
    assert OpenRouterChat.api_key_env == "OPENROUTER_API_KEY"
    assert OpenRouterChat.default_tokenizer("openai/gpt-4o") == "tiktoken:o200k_base"
    seen = []
    [def_id] = ids_of(tokenizer, "def")

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url, request.headers, json.loads(request.content)))
        entry = {"token": "def", "logprob": -0.1, "bytes": list(b"def")}
        other = {"token": "x", "logprob": -3.0, "bytes": None}
        content = [{**entry, "top_logprobs": [entry, other]}]
        return httpx.Response(200, json={"choices": [{"logprobs": {"content": content}}]})

    base = connect("openrouter", None, "meta-llama/llama-3.1-8b-instruct", tokenizer=tokenizer,
                   api_key="sk-or-test", transport=httpx.MockTransport(handler))  # fmt: skip
    top = run_step(base, Prompt((1, 2), 2), 2)
    assert top.token_ids[0] == def_id
    url, headers, body = seen[0]
    assert str(url) == "https://openrouter.ai/api/v1/chat/completions"
    assert headers["authorization"] == "Bearer sk-or-test"
    assert body["provider"] == {"require_parameters": True}
    assert (body["logprobs"], body["top_logprobs"], body["max_tokens"]) == (True, 2, 1)
    assert not base.capabilities.multi_step
    with pytest.raises(ConfigError, match="scores only the first token"):
        base.build_request(Prompt((1, 2, 3), 2), 5)


def test_openrouter_without_an_upstream_for_logprobs_says_where_to_look(tokenizer):
    error = {"error": {"message": "No endpoints found that can handle the requested parameters.",
                       "code": 404}}  # fmt: skip
    base = connect("openrouter", None, "some/model", tokenizer=tokenizer,
                   transport=answering(404, error), max_retries=0)  # fmt: skip
    with pytest.raises(NotFoundError, match=r"supported_parameters .* include top_logprobs"):
        run_step(base, Prompt((1, 2), 2))


def test_mistral_is_no_dialect_and_says_why():
    with pytest.raises(ConfigError, match="documents no logprobs"):
        connect("mistral", "https://api.mistral.ai/v1", "mistral-small-latest")


def test_openrouter_sends_app_attribution_only_when_given(tokenizer):
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers)
        entry = {"token": "def", "logprob": -0.1, "bytes": list(b"def")}
        return httpx.Response(200, json={"choices": [{"logprobs": {"content": [
            {**entry, "top_logprobs": [entry]}]}}]})  # fmt: skip

    for attribution in ({"app_url": "https://app.example", "app_title": "My App"}, {}):
        base = connect("openrouter", None, "some/model", tokenizer=tokenizer, api_key="sk-or",
                       transport=httpx.MockTransport(handler), **attribution)  # fmt: skip
        run_step(base, Prompt((1, 2), 2), 1)
    given, plain = seen
    assert (given["http-referer"], given["x-openrouter-title"]) == ("https://app.example", "My App")
    assert given["authorization"] == plain["authorization"] == "Bearer sk-or"
    assert "http-referer" not in plain and "x-openrouter-title" not in plain
    with pytest.raises(ConfigError, match="app_title must be printable ASCII"):
        connect("openrouter", None, "some/model", tokenizer=tokenizer, app_title="Café\n")
    with pytest.raises(TypeError, match="takes no option app_url"):  # only openrouter's option
        connect("openai-chat", "http://127.0.0.1:9/v1", "m", tokenizer=tokenizer, app_url="x")


def run_cli(capsys, *args):
    from proxyclient.cli import main

    try:
        code = main(["inspect", *args, "--base-url", "http://127.0.0.1:9/v1", "--base-model", "m"])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    return code, capsys.readouterr().err


def test_cli_api_mistral_says_why_there_is_no_dialect(capsys):
    code, err = run_cli(capsys, "--api", "mistral")
    assert code == 2
    assert "argument --api: Mistral's chat API" in err and "documents no logprobs" in err
    assert "invalid choice" not in err
    code, err = run_cli(capsys, "--api", "mistral2")
    assert code == 2 and "invalid choice: 'mistral2'" in err


def test_cli_reasoning_effort_goes_to_openai_chat_only(capsys, monkeypatch):
    import proxyclient.adapters

    given = {}

    def fake_connect(api, base_url, model, **kwargs):
        given.update(kwargs, api=api)
        raise ConfigError("connected")

    monkeypatch.setattr(proxyclient.adapters, "connect", fake_connect)
    code, err = run_cli(capsys, "--api", "openai-chat", "--reasoning-effort", "none")
    assert (code, given["api"], given["reasoning_effort"]) == (2, "openai-chat", "none")
    assert "connected" in err
    given.clear()
    code, err = run_cli(capsys, "--api", "openai-chat")
    assert code == 2 and "reasoning_effort" not in given
    given.clear()
    code, err = run_cli(capsys, "--api", "vllm", "--reasoning-effort", "low")
    assert code == 2 and not given
    assert "--reasoning-effort is an option of --api openai-chat, not of --api vllm" in err
