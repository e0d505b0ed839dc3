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


# -- the waits themselves: computed by _backoff, and slept (a virtual clock, no real waiting) ----


class _Outcome:
    def __init__(self, exc):
        self._exc = exc

    def exception(self):
        return self._exc


class _State:
    """The parts of tenacity's RetryCallState that _backoff reads."""

    def __init__(self, exc, attempt_number=1):
        self.outcome = _Outcome(exc)
        self.attempt_number = attempt_number


def retryable(status=429, headers=None):
    return http_module._RetryableStatus(httpx.Response(status, headers=headers or {}))


NOW = 1445412480.0  # 2015-10-21 07:28:00 GMT


@pytest.fixture
def real_backoff(monkeypatch):
    monkeypatch.setattr(http_module, "INITIAL_BACKOFF_S", 0.25)
    monkeypatch.setattr(http_module, "MAX_BACKOFF_S", 4.0)


@pytest.fixture
def frozen_now(monkeypatch):
    """time.time() at NOW, for the HTTP-date form (parse_retry_after's default clock)."""
    monkeypatch.setattr(http_module.time, "time", lambda: NOW)


@pytest.mark.parametrize(
    ("headers", "wait"),
    [
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after": "2"}, 2.0),
        ({"retry-after": "Wed, 21 Oct 2015 07:28:10 GMT"}, 10.0),  # an HTTP date, 10 s from NOW
        ({"retry-after": "60"}, 60.0),  # the cap itself is honoured
    ],
)
def test_backoff_waits_what_the_server_says(real_backoff, frozen_now, headers, wait):
    for status in (429, 503, 408):
        assert http_module._backoff(_State(retryable(status, headers))) == wait


@pytest.mark.parametrize(
    "headers",
    [
        {"retry-after": "61"},
        {"retry-after-ms": "3600000"},
        {"retry-after": "Wed, 21 Oct 2015 08:28:00 GMT"},  # an hour from NOW
        {"retry-after": "soon"},
        {},
    ],
)
def test_backoff_beyond_the_cap_or_unsaid_is_exponential(real_backoff, frozen_now, headers):
    assert http_module.MAX_RETRY_AFTER_S == 60.0
    for attempt, low in [(1, 0.25), (2, 0.5), (3, 1.0), (4, 2.0), (5, 4.0), (9, 4.0)]:
        wait = http_module._backoff(_State(retryable(429, headers), attempt))
        assert low <= wait <= low + 0.25, (attempt, wait)  # 0.25 * 2^(n-1), capped at 4, + jitter


def test_backoff_after_a_connection_error_is_exponential(real_backoff):
    wait = http_module._backoff(_State(httpx.ConnectError("refused"), 3))
    assert 1.0 <= wait <= 1.25


def virtual_clock(monkeypatch):
    """Tenacity's and the shared pause's sleeps recorded, not slept: they move a virtual clock
    that the event loop's time() follows, so the pause is over when the sleep "ends"."""
    slept = {"retry": [], "pause": []}
    offset = [0.0]

    def sleeper(kind):
        async def sleep(seconds, result=None):
            slept[kind].append(seconds)
            offset[0] += seconds
            await _real_sleep(0)
            return result

        return sleep

    class _Asyncio:  # http.py's asyncio, but for sleep
        sleep = staticmethod(sleeper("pause"))

        def __getattr__(self, name):
            return getattr(asyncio, name)

    real_retrying = http_module.AsyncRetrying
    monkeypatch.setattr(
        http_module,
        "AsyncRetrying",
        lambda **options: real_retrying(sleep=sleeper("retry"), **options),
    )
    monkeypatch.setattr(http_module, "asyncio", _Asyncio())

    def run(coroutine):
        async def main():
            loop = asyncio.get_running_loop()
            real_time = loop.time
            loop.time = lambda: real_time() + offset[0]
            return await coroutine

        return asyncio.run(main())

    return slept, run


_real_sleep = asyncio.sleep


def test_a_429_with_retry_after_waits_exactly_that(monkeypatch, real_backoff):
    slept, run = virtual_clock(monkeypatch)
    transport, seen = transport_of(
        httpx.Response(429, headers={"retry-after": "2"}, json={"error": "slow down"}),
        httpx.Response(200, json={"ok": True}),
    )
    client = HTTPTransport("http://server/v1", transport=transport)
    assert run(client.request_json("POST", "/completions", {"x": 1})) == {"ok": True}
    assert len(seen) == 2
    assert slept["retry"] == [2.0]
    assert sum(slept["pause"]) < 0.01  # the shared pause ended with the retry's own wait


def test_a_503_with_retry_after_beyond_the_cap_retries_after_the_backoff(monkeypatch, real_backoff):
    slept, run = virtual_clock(monkeypatch)
    transport, seen = transport_of(
        httpx.Response(503, headers={"retry-after": "3600"}, json={"error": "down"}),
        httpx.Response(503, headers={"retry-after": "3600"}, json={"error": "down"}),
        httpx.Response(200, json={"ok": True}),
    )
    client = HTTPTransport("http://server/v1", transport=transport)
    assert run(client.request_json("POST", "/completions", {"x": 1})) == {"ok": True}
    assert len(seen) == 3
    first, second = slept["retry"]
    assert 0.25 <= first <= 0.5 and 0.5 <= second <= 0.75
    assert not slept["pause"]


def test_a_429_with_retry_after_beyond_the_cap_retries_after_the_backoff(monkeypatch, real_backoff):
    slept, run = virtual_clock(monkeypatch)
    transport, _ = transport_of(
        httpx.Response(429, headers={"retry-after": "3600"}, json={"error": "slow down"}),
        httpx.Response(200, json={"ok": True}),
    )
    client = HTTPTransport("http://server/v1", transport=transport)
    assert run(client.request_json("POST", "/completions", {"x": 1})) == {"ok": True}
    assert sum(slept["retry"]) + sum(slept["pause"]) <= 0.5


@pytest.mark.parametrize("status", [408, 409])
def test_408_and_409_are_retried(status):
    transport, seen = transport_of(
        httpx.Response(status, json={"error": "try again"}),
        httpx.Response(200, json={"ok": True}),
    )
    assert post(transport) == {"ok": True}
    assert len(seen) == 2


@pytest.mark.parametrize("status", [408, 409])
def test_408_and_409_give_up_after_max_retries(status):
    transport, seen = transport_of(*[httpx.Response(status, json={"error": "again"})] * 3)
    with pytest.raises(http_module.APIStatusError, match=f"HTTP {status}: again"):
        post(transport, max_retries=2)
    assert len(seen) == 3
