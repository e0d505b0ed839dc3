import asyncio
import json
import logging

import httpx
import pytest

from proxyclient.adapters import http as http_module
from proxyclient.adapters.http import HTTPTransport, error_message, parse_retry_after
from proxyclient.errors import (
    APIConnectionError,
    AuthenticationError,
    BadRequestError,
    NotFoundError,
    RateLimitError,
    ResponseFormatError,
    ServerError,
)

SECRET = "sk-test-0123456789abcdef"


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(http_module, "INITIAL_BACKOFF_S", 0.001)
    monkeypatch.setattr(http_module, "MAX_BACKOFF_S", 0.002)


def transport_of(*responses):
    """A MockTransport answering with ``responses`` in order; records the requests."""
    seen: list[httpx.Request] = []
    queue = list(responses)

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = queue.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    return httpx.MockTransport(handler), seen


def post(transport, **options):
    client = HTTPTransport("http://server/v1", transport=transport, **options)
    return asyncio.run(client.request_json("POST", "/completions", {"x": 1}, what="test"))


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after": "3"}, 3.0),
        ({"retry-after": "0.5"}, 0.5),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
        ({"retry-after": "Wed, 21 Oct 2015 07:28:10 GMT"}, 10.0),
        ({"retry-after": "soon"}, None),
        ({}, None),
    ],
)
def test_parse_retry_after(headers, seconds):
    now = 1445412480.0  # 2015-10-21 07:28:00 GMT
    assert parse_retry_after(headers, now=now) == seconds


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"error": {"message": "nested", "type": "invalid_request_error"}}, "nested"),
        ({"object": "error", "message": "flat", "code": 400}, "flat"),
        ({"error": "tgi style", "error_type": "validation"}, "tgi style"),
        ({"detail": "fastapi"}, "fastapi"),
        ("plain text", "plain text"),
        ({}, "no error message in the response"),
    ],
)
def test_error_message_of_every_dialect(body, message):
    assert error_message(body) == message


def test_retries_429_honouring_retry_after_then_succeeds():
    transport, seen = transport_of(
        httpx.Response(429, headers={"retry-after-ms": "1"}, json={"error": "slow down"}),
        httpx.Response(503, json={"error": "overloaded"}),
        httpx.Response(200, json={"ok": True}),
    )
    assert post(transport) == {"ok": True}
    assert len(seen) == 3


def test_gives_up_after_max_retries_with_the_right_error():
    transport, seen = transport_of(*[httpx.Response(500, json={"message": "boom"})] * 3)
    with pytest.raises(ServerError, match=r"HTTP 500: boom") as info:
        post(transport, max_retries=2)
    assert len(seen) == 3
    assert info.value.status_code == 500


def test_rate_limit_after_retries_is_a_rate_limit_error():
    transport, _ = transport_of(*[httpx.Response(429, json={"error": "overloaded"})] * 2)
    with pytest.raises(RateLimitError):
        post(transport, max_retries=1)


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, BadRequestError),
        (401, AuthenticationError),
        (403, AuthenticationError),
        (404, NotFoundError),
        (422, BadRequestError),
    ],
)
def test_client_errors_are_not_retried(status, error):
    transport, seen = transport_of(httpx.Response(status, json={"error": {"message": "no"}}))
    with pytest.raises(error, match=f"POST http://server/v1/completions \\(test\\): HTTP {status}"):
        post(transport)
    assert len(seen) == 1


def test_connection_errors_are_retried_then_reported():
    transport, seen = transport_of(*[httpx.ConnectError("connection refused")] * 4)
    with pytest.raises(APIConnectionError, match="could not connect after 4 attempts"):
        post(transport)
    assert len(seen) == 4


def test_a_non_json_answer_is_a_format_error():
    transport, _ = transport_of(httpx.Response(200, text="<html>hello</html>"))
    with pytest.raises(ResponseFormatError, match="not JSON"):
        post(transport)


def test_api_key_is_sent_but_never_shown(caplog):
    transport, seen = transport_of(
        httpx.Response(500, json={"error": {"message": "bad"}}),
        httpx.Response(401, json={"error": {"message": f"Incorrect API key provided: {SECRET}"}}),
    )
    client = HTTPTransport("http://server/v1", api_key=SECRET, transport=transport)
    with caplog.at_level(logging.DEBUG), pytest.raises(AuthenticationError) as info:
        asyncio.run(client.request_json("POST", "/completions", {"x": 1}))
    assert seen[0].headers["authorization"] == f"Bearer {SECRET}"
    assert SECRET not in str(info.value)
    assert SECRET not in json.dumps(info.value.body)
    assert "Incorrect API key provided: ***" in str(info.value)
    assert SECRET not in repr(client)
    assert SECRET not in caplog.text


# -- client-side limits and the shared pause ---------------------------------------------------


def timed_transport(delay: float = 0.0, first_status: int | None = None, headers=None):
    """A MockTransport that records when each request arrived and how many were in flight."""
    log = {"sent": [], "in_flight": 0, "most": 0}

    async def handler(request: httpx.Request) -> httpx.Response:
        loop = asyncio.get_running_loop()
        log["sent"].append((loop.time(), json.loads(request.content)["who"]))
        log["in_flight"] += 1
        log["most"] = max(log["most"], log["in_flight"])
        try:
            await asyncio.sleep(delay)
        finally:
            log["in_flight"] -= 1
        if first_status is not None and len(log["sent"]) == 1:
            return httpx.Response(first_status, headers=headers or {}, json={"error": "slow"})
        return httpx.Response(200, json={"ok": True})

    return httpx.MockTransport(handler), log


def test_a_429_with_retry_after_pauses_every_request_to_that_server():
    mock, log = timed_transport(first_status=429, headers={"retry-after-ms": "300"})
    transport = HTTPTransport("http://test/v1", transport=mock)

    async def run():
        loop = asyncio.get_running_loop()
        first = asyncio.create_task(transport.request_json("POST", "/x", {"who": "a"}))
        await asyncio.sleep(0.05)  # another sequence asks while the first one is told to wait
        second = asyncio.create_task(transport.request_json("POST", "/x", {"who": "b"}))
        await asyncio.gather(first, second)
        return loop

    asyncio.run(run())
    (t_limited, who), *later = log["sent"]
    assert who == "a" and len(later) == 2
    for when, _ in later:  # the retry of a and the first try of b both waited out the pause
        assert when - t_limited >= 0.29


def test_max_concurrency_bounds_requests_in_flight():
    mock, log = timed_transport(delay=0.03)
    transport = HTTPTransport(
        "http://test/v1", transport=mock, limits=http_module.RateLimits(max_concurrency=2)
    )

    async def run():
        await asyncio.gather(*(transport.request_json("POST", "/x", {"who": i}) for i in range(6)))

    asyncio.run(run())
    assert len(log["sent"]) == 6 and log["most"] == 2


def test_tokens_per_minute_delays_what_exceeds_it():
    mock, log = timed_transport()
    transport = HTTPTransport(
        "http://test/v1", transport=mock, limits=http_module.RateLimits(tokens_per_minute=60)
    )

    async def run():
        await transport.request_json("POST", "/x", {"who": "big"}, tokens=60)  # the whole minute
        await transport.request_json("POST", "/x", {"who": "small"}, tokens=2)

    asyncio.run(run())
    (t_big, _), (t_small, _) = log["sent"]
    assert t_small - t_big >= 1.5  # 60 tokens a minute: 2 more tokens take ~2 s to free up


@pytest.mark.parametrize("field", ["max_concurrency", "requests_per_minute", "tokens_per_minute"])
def test_limits_must_be_positive(field):
    from proxyclient.errors import ConfigError

    with pytest.raises(ConfigError, match=f"{field} must be > 0"):
        http_module.RateLimits(**{field: 0})
