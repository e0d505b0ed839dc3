"""No client stalls the others: the request-body limit (413), JSON any parser rejects (400), a
prompt that cannot fit refused without tokenizing it, and tokenization off the event loop."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest

from proxyclient.server import create_app
from proxyclient.server.intake import PARSE_ON_LOOP_BYTES
from proxyclient.server.prompts import PromptTokens
from tests.test_server import DEFAULTS, NAME, PROMPT, assert_openai_error, call, make_tuner

LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def app(tiny_models, hf_models):
    tuner = make_tuner(tiny_models, hf_models)
    yield create_app(
        tuner, served_model_name=NAME, defaults=DEFAULTS, max_model_len=256, max_body_bytes=LIMIT
    )
    tuner.close()


def test_a_body_over_the_limit_is_a_413_in_openais_shape(app):
    prompt = "x" * (LIMIT + 1)
    messages = [{"role": "user", "content": prompt}]
    for path, body in [
        ("/v1/completions", {"model": NAME, "prompt": prompt}),
        ("/v1/chat/completions", {"model": NAME, "messages": messages}),
        ("/tokenize", {"prompt": prompt}),
    ]:
        error = assert_openai_error(call(app, "POST", path, json=body), 413)
        assert error["code"] == "request_too_large" and str(LIMIT) in error["message"]


def test_a_body_without_a_declared_length_is_cut_off_too(app):
    async def chunks():
        yield b'{"model": "' + NAME.encode() + b'", "prompt": "'
        for _ in range(LIMIT // 1024 + 1):
            yield b"x" * 1024
        yield b'"}'

    error = assert_openai_error(call(app, "POST", "/v1/completions", content=chunks()), 413)
    assert error["code"] == "request_too_large"


@pytest.mark.parametrize(
    "body",
    [b"[" * 50_000 + b"]" * 50_000, b'{"a": ' * 50_000 + b"1" + b"}" * 50_000, b"\xff\xfe", b"{"],
    ids=["deep list", "deep object", "not UTF-8", "cut short"],
)
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/tokenize"])
def test_any_body_the_json_parser_rejects_is_a_400(tiny_models, hf_models, path, body):
    tuner = make_tuner(tiny_models, hf_models)
    with tuner:  # the default limit (8 MiB): a 100 kB body gets through to the parser
        roomy = create_app(tuner, served_model_name=NAME, defaults=DEFAULTS)
        error = assert_openai_error(call(roomy, "POST", path, content=body), 400)
    assert "not valid JSON" in error["message"]


def test_a_prompt_that_cannot_fit_is_refused_without_tokenizing_it(app, monkeypatch):
    encoded: list[int] = []
    real = PromptTokens.count

    def counting(self, prompt, config):
        encoded.append(len(prompt))
        return real(self, prompt, config)

    monkeypatch.setattr(PromptTokens, "count", counting)
    longest = app.state.server.tokens.longest_token_bytes
    prompt = "y" * (longest * 300)  # at least 300 tokens: more than the context of 256
    error = assert_openai_error(completion_of(app, prompt), 400, "max_tokens")
    assert error["code"] == "context_length_exceeded" and "at least" in error["message"]
    assert encoded == []
    ok = completion_of(app, PROMPT)
    assert ok.status_code == 200, ok.text
    assert encoded == [len(PROMPT)]


def completion_of(app, prompt: str) -> httpx.Response:
    return call(
        app, "POST", "/v1/completions", json={"model": NAME, "prompt": prompt, "max_tokens": 2}
    )


def test_tokenizing_a_long_prompt_does_not_hold_up_another_request(app, monkeypatch):
    """The long prompt's tokenization waits until the short request is answered: if it ran on
    the event loop, the short one could never be served (and the test would time out)."""
    short_done = threading.Event()
    real = PromptTokens.count

    def slow_for_long(self, prompt, config):
        if len(prompt) > 100:
            assert short_done.wait(30), "the short request was not served meanwhile"
        return real(self, prompt, config)

    monkeypatch.setattr(PromptTokens, "count", slow_for_long)
    long_prompt = "z " * 200

    async def both():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:

            async def post(prompt: str) -> httpx.Response:
                body = {"model": NAME, "prompt": prompt, "max_tokens": 2}
                return await client.post("/v1/completions", json=body, timeout=60)

            long_request = asyncio.create_task(post(long_prompt))
            await asyncio.sleep(0.05)  # the long one is in its tokenization now
            short = await post(PROMPT)
            short_done.set()
            return short, await long_request

    short, long = asyncio.run(both())
    assert short.status_code == 200, short.text
    assert long.status_code in (200, 400), long.text  # answered or refused, never stuck
    assert json.loads(short.text)["choices"][0]["text"] is not None


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_parsing_a_large_body_does_not_hold_up_another_request(
    tiny_models, hf_models, monkeypatch, path
):
    """As above for the JSON parse and validation of a body over PARSE_ON_LOOP_BYTES."""
    from proxyclient.server import protocol

    tuner = make_tuner(tiny_models, hf_models)
    app = create_app(
        tuner, served_model_name=NAME, defaults=DEFAULTS, max_model_len=256,
        max_body_bytes=4 * PARSE_ON_LOOP_BYTES,
    )  # fmt: skip

    short_done = threading.Event()
    real = protocol.parse

    def slow_for_large(body, kind):
        if len(body) > PARSE_ON_LOOP_BYTES:
            assert short_done.wait(30), "the short request was not served meanwhile"
        return real(body, kind)

    monkeypatch.setattr(protocol, "parse", slow_for_large)
    large = "w " * (PARSE_ON_LOOP_BYTES // 2 + 1)

    def body(prompt: str) -> dict:
        if path == "/v1/completions":
            return {"model": NAME, "prompt": prompt, "max_tokens": 2}
        return {"model": NAME, "messages": [{"role": "user", "content": prompt}], "max_tokens": 2}

    async def both():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            large_request = asyncio.create_task(client.post(path, json=body(large), timeout=60))
            await asyncio.sleep(0.05)
            short = await client.post(path, json=body(PROMPT), timeout=60)
            short_done.set()
            return short, await large_request

    with tuner:
        short, large_answer = asyncio.run(both())
    assert short.status_code == 200, short.text
    assert large_answer.status_code == 400, large_answer.text  # 64 kB of prompt: over 256 tokens
