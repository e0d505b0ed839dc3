import asyncio
import gc
import json
import logging
import threading
import time
import warnings

import httpx
import pytest

from proxyclient.adapters import http as http_module
from proxyclient.adapters.http import HTTPTransport, error_message, parse_retry_after
from proxyclient.errors import (
    APIConnectionError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    NotFoundError,
    RateLimitError,
    ResponseFormatError,
    ServerError,
)
from proxyclient.loop_thread import LoopThread

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
    with pytest.raises(ServerError, match=r"HTTP 500: boom \(after 3 attempts in ") as info:
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


def test_a_non_json_answer_is_a_format_error_after_retries():
    transport, seen = transport_of(*[httpx.Response(200, text="<html>hello</html>")] * 3)
    with pytest.raises(ResponseFormatError, match=r"not JSON.*after 3 attempts"):
        post(transport, max_retries=2)
    assert len(seen) == 3


@pytest.mark.parametrize(
    "broken",
    [
        httpx.Response(200, text='{"choices": [{"logprobs": {"top_logprobs": [{"a": -0.1'),
        httpx.Response(200, text="not json at all"),
        httpx.Response(200, text=""),
        httpx.Response(200, text='{"logprob": NaN}'),
        httpx.Response(200, text='{"logprob": Infinity}'),
        httpx.Response(200, content=b"\xff\xfe{"),
    ],
    ids=["truncated", "malformed", "empty", "nan", "infinity", "not-utf8"],
)
def test_a_broken_200_is_retried_like_a_503(broken):
    transport, seen = transport_of(broken, httpx.Response(200, json={"ok": True}))
    assert post(transport) == {"ok": True}
    assert len(seen) == 2


def test_minus_infinity_is_a_logprob_not_a_broken_answer():
    transport, _ = transport_of(httpx.Response(200, text='{"logprob": -Infinity}'))
    assert post(transport) == {"logprob": float("-inf")}


def test_an_answer_the_parser_refuses_is_retried_then_reported():
    def parse(body):
        if "logprobs" not in body:
            raise ResponseFormatError("no logprobs in the answer")
        return body["logprobs"]

    async def ask(transport):
        client = HTTPTransport("http://server/v1", transport=transport, max_retries=2)
        return await client.request_json("POST", "/completions", {}, what="t", parse=parse)

    transport, seen = transport_of(
        httpx.Response(200, json={"choices": []}), httpx.Response(200, json={"logprobs": [1]})
    )
    assert asyncio.run(ask(transport)) == [1]
    assert len(seen) == 2
    transport, seen = transport_of(*[httpx.Response(200, json={"choices": []})] * 3)
    with pytest.raises(ResponseFormatError, match=r"\(t\): no logprobs.*after 3 attempts"):
        asyncio.run(ask(transport))
    assert len(seen) == 3


def test_other_parser_errors_are_not_retried():
    def parse(body):
        raise LookupError("a bug, not a broken answer")

    transport, seen = transport_of(httpx.Response(200, json={}), httpx.Response(200, json={}))
    client = HTTPTransport("http://server/v1", transport=transport)
    with pytest.raises(LookupError):
        asyncio.run(client.request_json("POST", "/x", {}, parse=parse))
    assert len(seen) == 1


@pytest.mark.parametrize("status", [500, 502, 503, 504, 520, 529])
def test_5xx_are_retried(status):
    transport, seen = transport_of(httpx.Response(status), httpx.Response(200, json={"ok": 1}))
    assert post(transport) == {"ok": 1}
    assert len(seen) == 2


@pytest.mark.parametrize("status", [501, 505])
def test_5xx_that_will_never_work_are_not_retried(status):
    transport, seen = transport_of(httpx.Response(status, json={"message": "never"}))
    with pytest.raises(ServerError, match=f"HTTP {status}: never$"):
        post(transport)
    assert len(seen) == 1


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


def test_extra_headers_go_with_every_request_and_the_key_wins(caplog):
    transport, seen = transport_of(
        httpx.Response(503, json={"error": {"message": "busy"}}),
        httpx.Response(200, json={"ok": True}),
    )
    extra = {"HTTP-Referer": "https://app.example", "authorization": "Bearer not-the-key"}
    client = HTTPTransport(
        "http://server/v1", api_key=SECRET, transport=transport, extra_headers=extra
    )
    with caplog.at_level(logging.DEBUG):
        assert asyncio.run(client.request_json("POST", "/completions", {"x": 1})) == {"ok": True}
    for request in seen:  # the retry too
        assert request.headers["http-referer"] == "https://app.example"
        assert request.headers.get_list("authorization") == [f"Bearer {SECRET}"]
    assert "HTTP-Referer" in repr(client) and "app.example" not in repr(client)
    assert SECRET not in repr(client) and SECRET not in caplog.text


# -- client-side limits and the shared pause ---------------------------------------------------


def timed_transport(delay: float = 0.0, first_status: int | None = None, headers=None):
    """A MockTransport that records when each request arrived and how many were in flight."""
    log = {"sent": [], "in_flight": 0, "most": 0}

    async def handler(request: httpx.Request) -> httpx.Response:
        loop = asyncio.get_running_loop()
        log["sent"].append((loop.time(), json.loads(request.content)["who"]))
        first = len(log["sent"]) == 1  # at arrival: a loaded machine may let others in meanwhile
        log["in_flight"] += 1
        log["most"] = max(log["most"], log["in_flight"])
        try:
            await asyncio.sleep(delay)
        finally:
            log["in_flight"] -= 1
        if first_status is not None and first:
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


# -- one base driven from two loops: the sync API's private loop and the caller's own ----------


def shared_transport(delay: float = 0.0, first_status: int | None = None, headers=None):
    """A MockTransport that may be called from any thread: it records, under a lock, each
    request's arrival (time.monotonic, comparable across loops), the loop it ran on, and the most
    requests in flight at once; ``log["answered"]`` is set once the first answer is out."""
    lock = threading.Lock()
    log = {"sent": [], "loops": set(), "in_flight": 0, "most": 0}
    answered = threading.Event()
    log["answered"] = answered

    async def handler(request: httpx.Request) -> httpx.Response:
        who = json.loads(request.content)["who"] if request.content else request.url.path
        with lock:
            log["sent"].append((time.monotonic(), who))
            log["loops"].add(id(asyncio.get_running_loop()))
            log["in_flight"] += 1
            log["most"] = max(log["most"], log["in_flight"])
            first = len(log["sent"]) == 1
        try:
            await asyncio.sleep(delay)
        finally:
            with lock:
                log["in_flight"] -= 1
        if first and first_status is not None:
            answered.set()
            return httpx.Response(first_status, headers=headers or {}, json={"error": "slow"})
        answered.set()
        return httpx.Response(200, json={"ok": True})

    return httpx.MockTransport(handler), log


async def ask_all(transport: HTTPTransport, *who: str) -> list:
    return await asyncio.gather(*(transport.request_json("POST", "/x", {"who": w}) for w in who))


def in_thread(target) -> threading.Thread:
    thread = threading.Thread(target=target)
    thread.start()
    return thread


def test_limits_hold_across_the_sync_and_the_async_api():
    mock, log = shared_transport(delay=0.03)
    transport = HTTPTransport(
        "http://test/v1", transport=mock, limits=http_module.RateLimits(max_concurrency=1)
    )
    runner = LoopThread("test-sync-api")
    both = threading.Barrier(2)

    def sync_api():
        both.wait()
        runner.run(ask_all(transport, "s1", "s2", "s3"))

    def async_api():
        both.wait()
        asyncio.run(ask_all(transport, "a1", "a2", "a3"))

    threads = [in_thread(sync_api), in_thread(async_api)]
    for thread in threads:
        thread.join(10)
    runner.close(transport.aclose())
    assert len(log["sent"]) == 6
    assert log["most"] == 1


def test_a_429_seen_via_one_loop_pauses_requests_via_the_other():
    mock, log = shared_transport(first_status=429, headers={"retry-after-ms": "300"})
    transport = HTTPTransport("http://test/v1", transport=mock)
    runner = LoopThread("test-sync-api")
    limited = in_thread(lambda: runner.run(transport.request_json("POST", "/x", {"who": "sync"})))
    assert log["answered"].wait(5)
    told = time.monotonic()  # just after the 429 left the server
    asyncio.run(transport.request_json("POST", "/x", {"who": "async"}))
    limited.join(5)
    runner.close(transport.aclose())
    (t_limited, first), *later = log["sent"]
    assert first == "sync" and sorted(who for _, who in later) == ["async", "sync"]
    for when, who in later:  # the async request waited out the pause as the retry did
        assert when - told >= 0.25, who
        assert when - t_limited >= 0.29, who


def test_one_client_on_one_loop_serves_every_caller(monkeypatch):
    made = []

    class CountedClient(httpx.AsyncClient):
        def __init__(self, *args, **kwargs):
            made.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(httpx, "AsyncClient", CountedClient)
    mock, log = shared_transport()
    transport = HTTPTransport("http://test/v1", transport=mock)
    runner = LoopThread("test-sync-api")
    runner.run(ask_all(transport, "s1", "s2"))
    asyncio.run(ask_all(transport, "a1", "a2"))
    in_thread(lambda: asyncio.run(ask_all(transport, "b1"))).join(5)
    runner.run(ask_all(transport, "s3"))
    assert asyncio.run(transport.peek("http://test/v1/models")) == {"ok": True}
    assert len(log["sent"]) == 7
    assert len(made) == 1 and len(log["loops"]) == 1
    runner.close(transport.aclose())
    assert made[0].is_closed


def test_the_sync_api_inside_a_running_loop_does_not_deadlock():
    # A notebook: a cell awaits the async API, a later one calls the sync API on the same thread,
    # blocking that loop until the sync API's private loop is done with the request.
    mock, _ = shared_transport()
    transport = HTTPTransport("http://test/v1", transport=mock)
    runner = LoopThread("test-sync-api")
    answers = []

    async def notebook():
        answers.append(await transport.request_json("POST", "/x", {"who": "async"}))
        answers.append(runner.run(transport.request_json("POST", "/x", {"who": "sync"})))

    cells = threading.Thread(target=asyncio.run, args=(notebook(),), daemon=True)
    cells.start()
    cells.join(10)
    assert not cells.is_alive(), "deadlocked"
    assert answers == [{"ok": True}] * 2
    runner.close(transport.aclose())


def test_cancelling_the_caller_cancels_the_request_on_the_transport_loop():
    started, cancelled = threading.Event(), threading.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content)["who"] == "quick":
            return httpx.Response(200, json={"ok": True})
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return httpx.Response(200, json={"ok": True})

    transport = HTTPTransport(
        "http://test/v1",
        transport=httpx.MockTransport(handler),
        limits=http_module.RateLimits(max_concurrency=1),
    )

    async def run():
        task = asyncio.create_task(transport.request_json("POST", "/x", {"who": "slow"}))
        while not started.is_set():
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await asyncio.to_thread(cancelled.wait, 5)
        # The one slot was given back: the next request goes through.
        assert await transport.request_json("POST", "/x", {"who": "quick"}) == {"ok": True}
        await transport.aclose()

    asyncio.run(run())


def test_aclose_closes_everything_is_idempotent_and_leaves_no_warnings():
    mock, log = shared_transport()
    gc.collect()  # what earlier tests left behind warns now, not inside the block below
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        transport = HTTPTransport("http://test/v1", transport=mock)
        runner = LoopThread("test-sync-api")
        runner.run(ask_all(transport, "s"))
        asyncio.run(ask_all(transport, "a"))
        home = transport._home
        client = home.client
        thread = asyncio.run(transport._at_home(current_thread))
        asyncio.run(transport.aclose())
        assert client.is_closed and home.thread.closed and transport._home is None
        asyncio.run(transport.aclose())  # a second close, and a third from the other loop
        runner.run(transport.aclose())
        # Closed is not dead: a later request opens a new home, which closes as well.
        assert runner.run(transport.request_json("POST", "/x", {"who": "again"})) == {"ok": True}
        runner.close(transport.aclose())
        del transport, home, client
        gc.collect()
    found = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not found, found
    assert len(log["sent"]) == 3
    assert thread.name == "proxyclient-http" and not thread.is_alive()


def test_a_lent_loop_runs_its_requests_in_place_and_the_transport_outlives_it():
    mock, log = shared_transport()
    transport = HTTPTransport("http://test/v1", transport=mock)
    lender = LoopThread("test-lender")
    assert transport.host_on(lender)
    assert not transport.host_on(LoopThread("test-second")), "one lender at a time"
    lender_thread = lender.run(_this_thread())
    assert lender.run(transport._at_home(current_thread)) is lender_thread  # no hand-over
    assert lender.run(ask_all(transport, "lent1", "lent2")) == [{"ok": True}] * 2
    assert asyncio.run(ask_all(transport, "other loop")) == [{"ok": True}]  # to the lender
    client = transport._home.client
    lender.close(transport.aclose())  # as ProxyTuner.close does
    assert client.is_closed and lender.closed
    # The lender is gone: the next request opens a home of the transport's own.
    assert asyncio.run(transport.request_json("POST", "/x", {"who": "after"})) == {"ok": True}
    assert asyncio.run(transport._at_home(current_thread)).name == "proxyclient-http"
    assert not transport.host_on(LoopThread("test-late")), "a home already exists"
    asyncio.run(transport.aclose())
    assert len(log["sent"]) == 4


async def _this_thread() -> threading.Thread:
    return threading.current_thread()


async def current_thread(home) -> threading.Thread:
    return threading.current_thread()


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
    that the transport's event loop's time() follows, so the pause is over when the sleep
    "ends"."""
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

    async def follow_the_clock(home):
        loop = asyncio.get_running_loop()
        real_time = loop.time
        loop.time = lambda: real_time() + offset[0]

    def run(client, coroutine):
        """``coroutine``, a request of ``client``, with the client's home loop on the clock."""

        async def main():
            await client._at_home(follow_the_clock)
            try:
                return await coroutine
            finally:
                await client.aclose()

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
    assert run(client, client.request_json("POST", "/completions", {"x": 1})) == {"ok": True}
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
    assert run(client, client.request_json("POST", "/completions", {"x": 1})) == {"ok": True}
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
    assert run(client, client.request_json("POST", "/completions", {"x": 1})) == {"ok": True}
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


# -- a hung or trickling server: bounded by the timeouts, by attempts and by total time ---------


class _SlowServer:
    """A TCP server that reads each request and then never answers (``trickle=False``) or sends
    one byte of a never-ending header every 0.1 s (``trickle=True``)."""

    def __init__(self, trickle: bool) -> None:
        self.trickle = trickle
        self.connections = 0

    async def handle(self, reader, writer) -> None:
        self.connections += 1
        try:
            await reader.readuntil(b"\r\n\r\n")
            if self.trickle:
                writer.write(b"HTTP/1.1 200 OK\r\n")
                while True:
                    writer.write(b"X")
                    await writer.drain()
                    await asyncio.sleep(0.1)
            await asyncio.sleep(3600)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


def against_slow_server(trickle: bool, **options):
    server = _SlowServer(trickle)

    async def run():
        listening = await asyncio.start_server(server.handle, "127.0.0.1", 0)
        port = listening.sockets[0].getsockname()[1]
        client = HTTPTransport(f"http://127.0.0.1:{port}/v1", **options)
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            await client.request_json("POST", "/completions", {"x": 1})
        except Exception as exc:
            return exc, loop.time() - started, server.connections
        finally:
            await client.aclose()
            listening.close()
        raise AssertionError("a server that never answers answered")

    return asyncio.run(run())


def test_a_hung_server_is_given_up_after_the_read_timeouts():
    exc, took, connections = against_slow_server(False, timeout=0.3, max_retries=2)
    assert isinstance(exc, APITimeoutError)
    assert "no answer within the timeout after 3 attempts" in str(exc)
    assert connections == 3 and 0.9 <= took < 2.0


def test_a_trickling_server_is_cut_off_by_the_total_time():
    # Each byte arrives well within the read timeout: only max_retry_time ends it.
    exc, took, _ = against_slow_server(True, timeout=5.0, max_retries=5, max_retry_time=0.8)
    assert isinstance(exc, APITimeoutError)
    assert "no complete answer within max_retry_time (0.8 s" in str(exc)
    assert 0.7 <= took < 1.5


def test_no_retry_begins_that_could_not_end_in_time(monkeypatch, real_backoff):
    transport, seen = transport_of(
        httpx.Response(503, headers={"retry-after": "5"}, json={"error": "later"}),
        httpx.Response(200, json={"ok": True}),
    )
    client = HTTPTransport("http://server/v1", transport=transport, max_retry_time=2.0)
    with pytest.raises(ServerError, match=r"HTTP 503: later \(after 1 attempt in "):
        asyncio.run(client.request_json("POST", "/completions", {}))
    assert len(seen) == 1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"timeout": 0}, "timeout must be a number of seconds > 0, got 0"),
        ({"timeout": -1.0}, "timeout must be a number of seconds > 0"),
        ({"timeout": float("nan")}, "timeout must be a number of seconds > 0, got nan"),
        ({"timeout": None}, "timeout must be a number of seconds > 0, got None"),
        ({"timeout": "30"}, "timeout must be a number of seconds > 0, got '30'"),
        ({"timeout": httpx.Timeout(5.0, read=None)}, "timeout.read must be"),
        ({"connect_timeout": 0}, "connect_timeout must be a number of seconds > 0"),
        ({"max_retries": -1}, "max_retries must be an integer >= 0"),
        ({"max_retries": True}, "max_retries must be an integer >= 0"),
        ({"max_retry_time": float("inf")}, "max_retry_time must be a number of seconds > 0"),
    ],
)
def test_bad_timeouts_and_retry_bounds_are_refused(options, message):
    from proxyclient.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        HTTPTransport("http://server/v1", **options)
    assert message in str(info.value)


def test_timeouts_are_per_read_and_connect():
    client = HTTPTransport("http://server/v1", timeout=12, connect_timeout=2.5)
    assert (client.timeout.read, client.timeout.connect, client.timeout.pool) == (12, 2.5, 12)
    assert HTTPTransport("http://server/v1").timeout == http_module.DEFAULT_TIMEOUT


def test_the_retry_warning_says_what_went_wrong_and_what_comes_next(caplog):
    transport, _ = transport_of(
        httpx.Response(503, json={"error": {"message": "overloaded"}}),
        httpx.Response(200, json={"ok": True}),
    )
    with caplog.at_level(logging.WARNING):
        post(transport)
    (record,) = caplog.records
    assert "retrying POST http://server/v1/completions (test) in " in record.getMessage()
    assert "after HTTP 503: overloaded (attempt 1 of 4)" in record.getMessage()


def test_paths_join_the_base_url_as_httpx_joins_them_and_absolute_urls_stay():
    mock, seen = transport_of(*[httpx.Response(200, json={"ok": True}) for _ in range(4)])
    client = HTTPTransport("https://host:8443/v1?api-version=2", transport=mock)
    for path in ["/completions", "models/m:streamGenerateContent?alt=sse", "http://h:1/tokenize"]:
        assert asyncio.run(client.request_json("POST", path, {})) == {"ok": True}
    assert asyncio.run(client.request_json("POST", "/completions", {})) == {"ok": True}
    with httpx.Client(base_url="https://host:8443/v1?api-version=2") as reference:
        expected = [str(reference.build_request("POST", p).url) for p in [
            "/completions", "models/m:streamGenerateContent?alt=sse", "http://h:1/tokenize",
            "/completions",
        ]]  # fmt: skip
    assert [str(r.url) for r in seen] == expected
    assert str(seen[2].url) == "http://h:1/tokenize"


def test_a_request_is_the_one_httpx_would_build_and_the_clients_cookies_are_kept():
    mock, seen = transport_of(
        httpx.Response(200, json={"ok": 1}, headers={"set-cookie": "lb=node-7; Path=/"}),
        httpx.Response(200, json={"ok": 2}),
        httpx.Response(200, json={"ok": 3}),
    )
    client = HTTPTransport(
        "http://server/v1", api_key=SECRET, timeout=7.0, transport=mock,
        extra_headers={"X-Title": "proxyclient tests"},
    )  # fmt: skip
    payload = {"prompt": [1, 2, 3], "text": "naïve ✓", "logprobs": 20}
    assert asyncio.run(client.request_json("POST", "/completions", payload)) == {"ok": 1}
    assert asyncio.run(client.request_json("POST", "/completions", payload)) == {"ok": 2}
    assert asyncio.run(client.request_json("GET", "/models")) == {"ok": 3}
    reference = httpx.AsyncClient(
        base_url="http://server/v1", timeout=client.timeout,
        headers={"X-Title": "proxyclient tests", "Authorization": f"Bearer {SECRET}"},
    )  # fmt: skip
    expected = reference.build_request("POST", "/completions", json=payload)
    first, second, get = seen
    for sent in (first, second):
        assert (sent.method, sent.url, sent.content) == (
            expected.method,
            expected.url,
            expected.content,
        )
        assert sent.extensions["timeout"] == expected.extensions["timeout"]
    assert sorted(first.headers.multi_items()) == sorted(expected.headers.multi_items())
    # The cookie the server set comes back, as httpx.AsyncClient sends it.
    assert second.headers["cookie"] == "lb=node-7"
    assert get.content == b"" and "content-type" not in get.headers
    assert get.headers["cookie"] == "lb=node-7" and get.headers["x-title"] == "proxyclient tests"


def test_no_retries_means_one_attempt_and_no_retry_warning(caplog):
    mock, seen = transport_of(
        httpx.Response(503, json={"error": {"message": "overloaded"}}),
        httpx.Response(200, json={"ok": True}),
    )
    with caplog.at_level(logging.WARNING), pytest.raises(ServerError, match="after 1 attempt in"):
        post(mock, max_retries=0)
    assert len(seen) == 1 and not caplog.records
