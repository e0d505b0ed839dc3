"""The OpenAI-compatible server (proxyclient.server) on a base served in-process from the tiny
base model (tests/support/local_base.py): no vLLM, seconds per test. Requests go through httpx's
ASGITransport, or, for the client-goes-away test and the openai package, to the app on uvicorn
in a thread. What it answers is checked against ProxyTuner called directly (a separate tuner
on the same models)."""

from __future__ import annotations

import asyncio
import gc
import json
import time

import httpx
import pytest

from proxyclient import Chat, GenerationConfig, ProxyTuner, connect, errors
from proxyclient.kvcache import KVState
from proxyclient.server import create_app
from proxyclient.server.main import ServerThread
from tests.support.local_base import LocalBase

NAME = "tiny-proxy"
PROMPT = "def main():"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
DEFAULTS = GenerationConfig(max_new_tokens=8, base_k=20)
SECRET = "sk-base-secret-0123456789"


class FlakyBase(LocalBase):
    """LocalBase that can be told to fail: ``arm(error, after=n)`` lets n more requests through,
    then raises ``error`` on each one until ``disarm()``; ``delay`` seconds per request."""

    def __init__(self, model, *, delay: float = 0.0, **options) -> None:
        super().__init__(model, **options)
        self.delay = delay
        self.error: BaseException | None = None
        self.allowed = 0

    def arm(self, error: BaseException, after: int = 0) -> None:
        self.error, self.allowed = error, after

    def disarm(self) -> None:
        self.error = None

    async def top_logprobs(self, prompt, k):
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.error is not None:
            if self.allowed <= 0:
                raise self.error
            self.allowed -= 1
        return await super().top_logprobs(prompt, k)


def make_tuner(tiny_models, hf_models, base=None) -> ProxyTuner:
    base = base if base is not None else LocalBase(hf_models["base"], drafts=True)
    return ProxyTuner(base, tiny_models["expert"], tiny_models["anti_expert"], device="cpu")


@pytest.fixture(scope="module")
def reference(tiny_models, hf_models):
    with make_tuner(tiny_models, hf_models) as tuner:
        yield tuner


@pytest.fixture(scope="module")
def app(tiny_models, hf_models):
    tuner = make_tuner(tiny_models, hf_models)
    yield create_app(tuner, served_model_name=NAME, defaults=DEFAULTS, secrets=(SECRET,))
    tuner.close()


def call(app, method: str, path: str, **options) -> httpx.Response:
    """One request to ``app`` in-process."""

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, timeout=60, **options)

    return asyncio.run(go())


def events(response: httpx.Response) -> list:
    """The data of each server-sent event: parsed JSON, or the string "[DONE]"."""
    found = []
    for line in response.text.splitlines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            found.append(data if data == "[DONE]" else json.loads(data))
    return found


def completion(app, **body) -> httpx.Response:
    return call(app, "POST", "/v1/completions", json={"model": NAME, "prompt": PROMPT, **body})


def chat(app, **body) -> httpx.Response:
    return call(
        app, "POST", "/v1/chat/completions", json={"model": NAME, "messages": MESSAGES, **body}
    )


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


# -- completions ------------------------------------------------------------------------------


def test_greedy_completion_equals_the_tuner(app, reference):
    answer = completion(app, max_tokens=10, temperature=0).json()
    expected = reference.generate(PROMPT, DEFAULTS, max_new_tokens=10)
    assert answer["object"] == "text_completion" and answer["model"] == NAME
    (choice,) = answer["choices"]
    assert choice["text"] == expected.text
    assert choice["finish_reason"] == {"eos": "stop"}.get(expected.finish_reason, "length")
    usage = answer["usage"]
    assert usage["completion_tokens"] == len(expected.token_ids)
    assert usage["prompt_tokens"] == len(reference.tokens.encode_prompt(PROMPT).base)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["base"]["requests"] == expected.usage.requests
    assert usage["base"]["prompt_tokens"] == expected.usage.prompt_tokens
    assert usage["base"]["completion_tokens"] == expected.usage.base_completion_tokens


def test_the_request_defaults_are_the_servers_config(app, reference):
    answer = completion(app).json()  # no max_tokens: DEFAULTS.max_new_tokens
    assert answer["choices"][0]["text"] == reference.generate(PROMPT, DEFAULTS).text


def test_completion_logprobs_are_the_proxy_tuned_trace(app, reference):
    answer = completion(app, max_tokens=6, logprobs=3).json()
    expected = reference.generate(PROMPT, DEFAULTS, max_new_tokens=6, trace=3)
    logprobs = answer["choices"][0]["logprobs"]
    assert logprobs["tokens"] == [s.text for s in expected.steps]
    assert logprobs["token_logprobs"] == pytest.approx([s.logprob for s in expected.steps])
    assert logprobs["base_token_logprobs"] == pytest.approx(
        [s.base_logprob for s in expected.steps]
    )
    assert logprobs["expert_token_logprobs"] == pytest.approx(
        [s.expert_logprob for s in expected.steps]
    )
    assert logprobs["anti_expert_token_logprobs"] == pytest.approx(
        [s.anti_logprob for s in expected.steps]
    )
    for top, step in zip(logprobs["top_logprobs"], expected.steps, strict=True):
        assert len(top) <= 4 and top[step.text] == pytest.approx(step.logprob)
        assert max(top.values()) == pytest.approx(step.top[0].logprob)
    offsets = logprobs["text_offset"]
    assert offsets[0] == 0
    assert offsets[1:] == [offsets[i] + len(t) for i, t in enumerate(logprobs["tokens"][:-1])]


def test_streamed_completion_equals_the_whole_one(app):
    whole = completion(app, max_tokens=10, logprobs=1).json()["choices"][0]
    response = completion(
        app, max_tokens=10, logprobs=1, stream=True, stream_options={"include_usage": True}
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = events(response)
    assert chunks[-1] == "[DONE]"
    *pieces, usage_chunk, _ = chunks
    assert all(c["object"] == "text_completion" for c in pieces)
    assert "".join(c["choices"][0]["text"] for c in pieces) == whole["text"]
    assert pieces[-1]["choices"][0]["finish_reason"] == whole["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in pieces[:-1])
    tokens = [t for c in pieces for t in c["choices"][0]["logprobs"]["tokens"]]
    offsets = [o for c in pieces for o in c["choices"][0]["logprobs"]["text_offset"]]
    assert tokens == whole["logprobs"]["tokens"]
    assert offsets == whole["logprobs"]["text_offset"]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == len(tokens)


def test_n_choices_are_seeded_seed_plus_i(app, reference):
    answer = completion(app, max_tokens=6, temperature=1.0, seed=11, n=3).json()
    texts = [c["text"] for c in sorted(answer["choices"], key=lambda c: c["index"])]
    expected = [
        reference.generate(PROMPT, DEFAULTS, max_new_tokens=6, temperature=1.0, seed=11 + i).text
        for i in range(3)
    ]
    assert texts == expected
    assert answer["usage"]["prompt_tokens"] == len(reference.tokens.encode_prompt(PROMPT).base)


def test_several_prompts_and_token_id_prompts(app, reference):
    ids = reference.tokenizer(PROMPT, add_special_tokens=False).input_ids
    answer = completion(app, prompt=[PROMPT, "for i in range(10):"], max_tokens=5).json()
    by_ids = completion(app, prompt=ids, max_tokens=5).json()
    nested = completion(app, prompt=[ids], max_tokens=5).json()
    first = reference.generate(PROMPT, DEFAULTS, max_new_tokens=5).text
    second = reference.generate("for i in range(10):", DEFAULTS, max_new_tokens=5).text
    assert [c["text"] for c in answer["choices"]] == [first, second]
    assert by_ids["choices"][0]["text"] == first == nested["choices"][0]["text"]


def test_proxy_tuning_fields_reach_the_config(app, reference):
    body = {"alpha": 0.0, "base_k": 5, "unseen": "restrict", "speculate": "off"}
    answer = completion(app, max_tokens=6, **body).json()
    expected = reference.generate(
        PROMPT, DEFAULTS, max_new_tokens=6, alpha=0.0, base_k=5, unseen="restrict",
        speculate="off",
    )  # fmt: skip
    assert answer["choices"][0]["text"] == expected.text
    assert answer["usage"]["base"]["requests"] == expected.usage.requests == 6  # one per token


def test_stop_sequences(app, reference):
    text = reference.generate(PROMPT, DEFAULTS, max_new_tokens=10).text
    stop = text[3:5]
    answer = completion(app, max_tokens=10, stop=[stop]).json()["choices"][0]
    assert answer["text"] == text[: text.index(stop)]
    assert answer["finish_reason"] == "stop"


# -- echo: scoring prompts (lm-eval's loglikelihood requests) ---------------------------------


def test_echo_scores_the_prompt_tokens_with_the_tuned_model(app, reference):
    context, continuation = "def main():\n    return", " x"
    body = {"prompt": context + continuation, "echo": True, "logprobs": 1, "max_tokens": 1}
    answer = completion(app, temperature=0, **body).json()
    choice = answer["choices"][0]
    logprobs = choice["logprobs"]
    ids = reference.tokenizer(context + continuation, add_special_tokens=False).input_ids
    ctxlen = len(reference.tokenizer(context, add_special_tokens=False).input_ids)
    assert len(logprobs["tokens"]) == len(ids) + 1  # the prompt's tokens, then the generated one
    whole = reference.score("", context + continuation, DEFAULTS)
    assert logprobs["token_logprobs"][:-1] == pytest.approx(whole.token_logprobs)
    assert "".join(logprobs["tokens"][:-1]) == context + continuation
    # What lm-eval computes from it is ProxyTuner.score of the continuation.
    direct = reference.score(context, continuation, DEFAULTS)
    assert sum(logprobs["token_logprobs"][ctxlen:-1]) == pytest.approx(direct.logprob)
    greedy = all(
        lp == max(top.values())
        for lp, top in zip(
            logprobs["token_logprobs"][ctxlen:-1], logprobs["top_logprobs"][ctxlen:-1], strict=True
        )
    )
    assert greedy == direct.is_greedy
    assert choice["text"].startswith(context + continuation)


def test_echo_without_generation_and_with_token_ids(app, reference):
    ids = reference.tokenizer(PROMPT, add_special_tokens=False).input_ids
    by_text = completion(app, echo=True, logprobs=0, max_tokens=0).json()["choices"][0]
    by_ids = completion(app, prompt=ids, echo=True, logprobs=0, max_tokens=0).json()
    assert by_text["text"] == PROMPT
    assert by_text["logprobs"] == by_ids["choices"][0]["logprobs"]
    assert len(by_text["logprobs"]["tokens"]) == len(ids)
    plain = completion(app, echo=True, max_tokens=3).json()["choices"][0]
    assert plain["text"].startswith(PROMPT) and plain["logprobs"] is None


def test_echo_needs_a_base_that_scores(tiny_models, hf_models):
    tuner = make_tuner(tiny_models, hf_models, LocalBase(hf_models["base"], drafts=False))
    try:
        app = create_app(tuner, served_model_name=NAME, defaults=DEFAULTS)
        response = completion(app, echo=True, logprobs=1, max_tokens=0)
        error = assert_openai_error(response, 400)
        assert "score" in error["message"] and "vllm" in error["message"].lower()
    finally:
        tuner.close()


# -- chat -------------------------------------------------------------------------------------


def test_chat_equals_the_tuner_on_the_messages(app, reference):
    answer = chat(app, max_completion_tokens=8, logprobs=True, top_logprobs=2).json()
    expected = reference.generate(MESSAGES, DEFAULTS, max_new_tokens=8, trace=2)
    assert answer["object"] == "chat.completion"
    (choice,) = answer["choices"]
    assert choice["message"] == {"role": "assistant", "content": expected.text}
    content = choice["logprobs"]["content"]
    assert [c["token"] for c in content] == [s.text for s in expected.steps]
    assert [c["logprob"] for c in content] == pytest.approx([s.logprob for s in expected.steps])
    for entry, step in zip(content, expected.steps, strict=True):
        assert entry["bytes"] == step.token_bytes and entry["bytes"]
        assert [t["bytes"] for t in entry["top_logprobs"]] == [a.token_bytes for a in step.top]
        assert [t["token"] for t in entry["top_logprobs"]] == [a.text for a in step.top]
        assert entry["base_logprob"] == pytest.approx(step.base_logprob)
        assert entry["expert_logprob"] == pytest.approx(step.expert_logprob)
        assert entry["anti_expert_logprob"] == pytest.approx(step.anti_logprob)
    assert answer["usage"]["completion_tokens"] == len(expected.token_ids)


def test_streamed_chat(app):
    whole = chat(app, max_tokens=8).json()["choices"][0]["message"]["content"]
    chunks = events(chat(app, max_tokens=8, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1] == "[DONE]"
    *pieces, usage_chunk, _ = chunks
    assert all(c["object"] == "chat.completion.chunk" for c in pieces)
    assert pieces[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in pieces) == whole
    assert pieces[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert usage_chunk["usage"]["total_tokens"] > usage_chunk["usage"]["completion_tokens"]


@pytest.mark.parametrize("base_chat_template", [None, False])
def test_response_prefix_base_chat_template_and_text_parts(app, reference, base_chat_template):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text",
              "text": "there"}]}]  # fmt: skip
    body = {"model": NAME, "messages": parts, "max_tokens": 5, "response_prefix": " Sure"}
    if base_chat_template is not None:
        body["base_chat_template"] = base_chat_template
    answer = call(app, "POST", "/v1/chat/completions", json=body).json()
    chat = Chat([{"role": "user", "content": "Hi there"}], " Sure", base_chat_template)
    expected = reference.generate(chat, DEFAULTS, max_new_tokens=5)
    assert answer["choices"][0]["message"]["content"] == expected.text
    assert answer["usage"]["prompt_tokens"] == reference.count_base_tokens(chat, DEFAULTS)


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"max_tokens": "5"}, "max_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"stop": 5}, "stop"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"n": 9}, "n"),
        ({"n": True}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 10**6}, "max_tokens"),
        ({"logprobs": 6}, "logprobs"),
        ({"unseen": "sometimes"}, "unseen"),
        ({"alpha": float("inf")}, "alpha"),
        ({"base_k": 0}, "base_k"),
        ({"top_p": 0}, "top_p"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [5000]}, "prompt"),
        ({"frequency_penalty": 1.0}, "frequency_penalty"),
        ({"echo": True, "stream": True}, "echo"),
    ],
)
def test_bad_completion_requests_are_400s(app, body, param):
    content = json.dumps({"model": NAME, "prompt": PROMPT, **body}).replace("Infinity", "1e999")
    response = call(app, "POST", "/v1/completions", content=content)
    error = assert_openai_error(response, 400, param)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "system", "content": "x"}]}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": "yes"}, "logprobs"),
        ({"tools": [{"type": "function"}]}, "tools"),
    ],
)
def test_bad_chat_requests_are_400s(app, body, param):
    response = call(
        app, "POST", "/v1/chat/completions", json={"model": NAME, "messages": MESSAGES, **body}
    )
    assert_openai_error(response, 400, param)


@pytest.mark.parametrize("content", [b"{", b"[1, 2]", b"", b"\xff\xfe"])
def test_malformed_json_is_a_400(app, content):
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert_openai_error(call(app, "POST", path, content=content), 400)


def test_unknown_model_and_route(app):
    error = assert_openai_error(completion(app, model="gpt-4"), 404, "model")
    assert error["code"] == "model_not_found" and NAME in error["message"]
    assert_openai_error(call(app, "GET", "/v1/nothing"), 404)


def test_models_health_and_tokenizer_endpoints(app, reference):
    models = call(app, "GET", "/v1/models").json()
    assert [m["id"] for m in models["data"]] == [NAME]
    assert call(app, "GET", "/health").json()["status"] == "ok"
    ids = call(app, "POST", "/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    assert ids == reference.tokens.encode_prompt(PROMPT).base
    plain = call(
        app, "POST", "/tokenize", json={"prompt": PROMPT, "add_special_tokens": False}
    ).json()
    assert plain["tokens"] == ids[1:]
    assert call(app, "POST", "/detokenize", json={"tokens": ids}).json()["prompt"] == PROMPT
    info = call(app, "GET", "/tokenizer_info").json()
    assert info["eos_token"] == reference.tokenizer.eos_token
    assert_openai_error(call(app, "POST", "/detokenize", json={"tokens": ["a"]}), 400)


# -- client API key ---------------------------------------------------------------------------


def test_client_api_key(tiny_models, hf_models):
    tuner = make_tuner(tiny_models, hf_models)
    try:
        app = create_app(tuner, served_model_name=NAME, api_key="client-key", defaults=DEFAULTS)
        body = {"model": NAME, "prompt": PROMPT, "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "client-key"}):
            response = call(app, "POST", "/v1/completions", json=body, headers=headers)
            error = assert_openai_error(response, 401)
            assert error["type"] == "authentication_error" and "client-key" not in response.text
        assert_openai_error(call(app, "GET", "/v1/models"), 401)
        ok = call(
            app,
            "POST",
            "/v1/completions",
            json=body,
            headers={"Authorization": "Bearer client-key"},
        )
        assert ok.status_code == 200
        assert call(app, "GET", "/health").status_code == 200
    finally:
        tuner.close()


# -- the base failing -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flaky(tiny_models, hf_models):
    base = FlakyBase(hf_models["base"])
    tuner = make_tuner(tiny_models, hf_models, base)
    app = create_app(tuner, served_model_name=NAME, defaults=DEFAULTS, secrets=(SECRET,))
    yield app, base
    tuner.close()


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (errors.APIConnectionError(f"cannot reach http://base (key {SECRET})"), 502, None),
        (errors.APITimeoutError("the base did not answer in 30 s"), 504, "base_timeout"),
        (errors.ServerError("HTTP 503: overloaded", status_code=503), 503, None),
        (errors.ServerError("HTTP 500: boom", status_code=500), 502, None),
        (errors.RateLimitError("HTTP 429", status_code=429), 429, None),
        (errors.ContextLengthError("too long", status_code=400), 400, "context_length_exceeded"),
        (RuntimeError(f"a bug with {SECRET}"), 500, None),
    ],
)
def test_base_failures_are_mapped_and_the_server_keeps_serving(flaky, error, status, code):
    app, base = flaky
    base.arm(error)
    try:
        for stream in (False, True):
            response = completion(app, max_tokens=4, stream=stream)
            found = assert_openai_error(response, status)
            assert SECRET not in response.text
            if code is not None:
                assert found["code"] == code
    finally:
        base.disarm()
    assert completion(app, max_tokens=4).status_code == 200


def test_a_base_failing_mid_stream_ends_it_with_an_error_event(flaky):
    app, base = flaky
    error = errors.APIConnectionError(f"connection reset ({SECRET})")
    try:
        base.arm(error, after=3)
        response = completion(app, max_tokens=8, stream=True, speculate="off")
        base.arm(error, after=3)
        chat_response = chat(app, max_tokens=8, stream=True, speculate="off")
    finally:
        base.disarm()
    for answer in (response, chat_response):
        assert answer.status_code == 200
        chunks = events(answer)
        assert chunks[-1] == "[DONE]"
        error = chunks[-2]["error"]
        assert error["type"] == "server_error" and error["code"] == "base_unreachable"
        assert SECRET not in answer.text
        assert all("error" not in c for c in chunks[:-2])
    assert len(events(response)) >= 3  # at least one piece came first (or its held-back rest)
    assert completion(app, max_tokens=4, stream=True).status_code == 200


def test_base_unreachable_over_http_never_shows_the_key(tiny_models):
    base = connect(
        "vllm", "http://127.0.0.1:9/v1", "tiny-base", api_key=SECRET, max_retries=0, timeout=2
    )
    with ProxyTuner(base, tiny_models["expert"], tiny_models["anti_expert"], device="cpu") as t:
        app = create_app(t, served_model_name=NAME, defaults=DEFAULTS)
        for stream in (False, True):
            response = completion(app, max_tokens=2, stream=stream)
            error = assert_openai_error(response, 502)
            assert error["code"] == "base_unreachable"
            assert SECRET not in response.text
        assert SECRET not in call(app, "GET", "/metrics").text


# -- metrics ----------------------------------------------------------------------------------


def test_metrics(app):
    completion(app, max_tokens=3)
    completion(app, model="nope")
    text = call(app, "GET", "/metrics").text
    assert 'proxyclient_requests_total{route="/v1/completions",status="200"}' in text
    assert 'proxyclient_requests_total{route="/v1/completions",status="404"}' in text
    for name in (
        "proxyclient_generated_tokens_total",
        "proxyclient_base_requests_total",
        "proxyclient_request_duration_seconds_bucket",
        "proxyclient_time_to_first_token_seconds_bucket",
        "proxyclient_active_generations",
    ):
        assert name in text
    (generated,) = [
        line for line in text.splitlines() if line.startswith("proxyclient_generated_tokens_total")
    ]
    assert float(generated.split()[-1]) >= 3


# -- on uvicorn: the openai package, and a client that goes away -------------------------------


@pytest.fixture(scope="module")
def served(tiny_models, hf_models):
    base = FlakyBase(hf_models["base"], delay=0.02)
    tuner = make_tuner(tiny_models, hf_models, base)
    app = create_app(tuner, served_model_name=NAME, defaults=DEFAULTS)
    with ServerThread(app) as server:
        yield server, app, base
    tuner.close()


def test_openai_package_on_uvicorn(served, reference):
    from openai import OpenAI

    server, _, _ = served
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    expected = reference.generate(PROMPT, DEFAULTS, max_new_tokens=6).text
    answer = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=6, temperature=0)
    assert answer.choices[0].text == expected
    streamed = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=6, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected
    expected_chat = reference.generate(MESSAGES, DEFAULTS, max_new_tokens=6).text
    reply = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=6)
    assert reply.choices[0].message.content == expected_chat
    pieces = client.chat.completions.create(
        model=NAME, messages=MESSAGES, max_tokens=6, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in pieces) == expected_chat


def test_a_client_going_away_cancels_its_generation(served):
    server, app, base = served
    metrics = app.state.server.metrics
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 400, "stream": True, "speculate": "off"}
    cancelled, before = metrics.cancelled, len(base.requests)
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", f"{server.url}/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        assert metrics.active == 1
    # The connection is closed: the generation must stop and free its caches.
    deadline = time.monotonic() + 10
    while (metrics.active or metrics.cancelled == cancelled) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metrics.active == 0 and metrics.cancelled == cancelled + 1
    requests = len(base.requests)
    time.sleep(0.3)
    assert len(base.requests) == requests  # nothing asked of the base any more
    assert 0 < requests - before < 400  # it stopped early
    gc.collect()
    assert not [s for s in gc.get_objects() if type(s) is KVState and s.length]
    after = httpx.post(f"{server.url}/v1/completions", json={**body, "max_tokens": 3}, timeout=30)
    assert after.status_code == 200 and events(after)[-1] == "[DONE]"
    scraped = httpx.get(f"{server.url}/metrics").text
    assert 'proxyclient_generations_total{outcome="cancelled"}' in scraped


def test_a_client_going_away_cancels_a_whole_response_too(served):
    server, app, _ = served
    metrics = app.state.server.metrics
    cancelled = metrics.cancelled
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 400, "speculate": "off"}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=0.5)
    deadline = time.monotonic() + 10
    while (metrics.active or metrics.cancelled == cancelled) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metrics.active == 0 and metrics.cancelled == cancelled + 1


# -- the command ------------------------------------------------------------------------------


@pytest.mark.parametrize("client_key", [None, "client-key"])
def test_the_serve_command_builds_the_app_from_its_flags(
    tiny_models, monkeypatch, capsys, client_key
):
    import uvicorn

    from proxyclient.cli import main

    seen: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: seen.update(app=app, **options))
    monkeypatch.delenv("PROXYCLIENT_SERVER_API_KEY", raising=False)
    argv = [
        "serve", "--base-url", "http://127.0.0.1:9/v1", "--base-model", "tiny-base",
        "--base-api-key", SECRET, "--expert", str(tiny_models["expert"]),
        "--anti-expert", str(tiny_models["anti_expert"]), "--device", "cpu", "--port", "8123",
        "--max-new-tokens", "5", "--alpha", "0.5", "--stop", "\n",
    ]  # fmt: skip
    if client_key:
        argv += ["--api-key", client_key]
    assert main(argv) == 0
    state = seen["app"].state.server
    try:
        said = capsys.readouterr().err
        assert (seen["host"], seen["port"]) == ("127.0.0.1", 8123)
        assert state.served_model_name == "tiny-base"  # the base's name by default
        assert (state.defaults.max_new_tokens, state.defaults.alpha) == (5, 0.5)
        assert state.defaults.stop == ("\n",)
        assert state.api_key == client_key
        expected = "clients must send the server API key" if client_key else "any client is served"
        assert expected in said and SECRET not in said
        assert state.redact(f"key {SECRET}") == "key ***"
    finally:
        state.tuner.close()


@pytest.mark.subprocess
def test_the_other_commands_do_not_need_the_serve_extra():
    import subprocess
    import sys

    code = (
        "import sys; from proxyclient.cli import _parser; _parser(); "
        "print(sorted(m for m in ('fastapi', 'uvicorn', 'sse_starlette', 'prometheus_client') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
