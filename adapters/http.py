"""The one place that talks HTTP: a shared httpx.AsyncClient, the retry policy, error mapping,
API-key redaction, and the client-side limits hosted APIs ask for. Adapters build payloads and
parse answers; they never retry or wait on their own.

Our requests happen once per generated token, so timeouts are short and per request. Every
sequence that talks to one server shares its transport: a 429 with Retry-After pauses all of
them, not only the one that got it, and the optional limits (``RateLimits``) count them together.

A transport does all its I/O on one event loop of its own, in a thread of its own (a
``LoopThread``): the client, its connection pool and the limits live there, whichever loops its
callers run on (the sync API's private loop, the caller's loop for the async API, or both at
once), so they hold per server and not per loop. A request made from another loop is handed to
that loop and awaited there; cancelling the caller cancels the request.

The one retry policy (tenacity) covers every adapter and every transient fault: connection errors
and resets, read timeouts, 408/409/429 and 5xx (but 501 and 505), and a 200 whose body is broken
(not JSON, NaN where a number should be, or refused by the adapter's parser: truncated, logprobs
missing). It waits with exponential backoff and jitter, or what the server names
(``retry-after-ms``, ``retry-after`` in seconds or as an HTTP date), and is bounded twice: by
attempts (``max_retries`` + 1) and by total time (``max_retry_time``, waits included; no attempt
starts that could not end in time, and none runs past it).

Under httpx, the connections are aiohttp's (``httpx-aiohttp``'s transport, what openai-python
offers as ``DefaultAioHttpClient`` for the same reason): httpcore's pool rescans every connection
on every request (``is_idle``, ``has_expired``: a ``getpeername`` and a ``select`` each), which at
64 concurrent generations cost more CPU than everything else the client does per request, and it
keeps only 20 of them alive, so most requests opened a new connection. aiohttp's pool hands out an
idle connection in O(1) and keeps every one alive (at most ``POOL_LIMITS.max_connections``). Its
errors are mapped to the httpx errors httpcore raises for the same fault (``_as_httpx_error``),
so retries and messages do not depend on which library holds the socket.

Per request, at 64 concurrent generations, what is left of httpx is its request and response
objects: a request goes to its route's transport directly (``_Home.send``: the client's
headers, timeout and cookies, without ``AsyncClient.send``'s auth, redirect and event-hook
layers, none of which is configured), the retry machinery starts only once a first attempt
failed, and answers are read with orjson (json only where orjson refuses: ``-Infinity``, or to
say what is wrong).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import orjson
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    wait_exponential,
    wait_random,
)

from proxyclient.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConfigError,
    NotFoundError,
    RateLimitError,
    ResponseFormatError,
    ServerError,
)
from proxyclient.loop_thread import LoopThread

T = TypeVar("T")

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
# httpx's default connection count; all of them are kept alive, for keepalive_expiry seconds.
POOL_LIMITS = httpx.Limits(max_connections=100, keepalive_expiry=5.0)
DEFAULT_MAX_RETRIES = 3
# All attempts of one request together, waits included: four read timeouts of 30 s fit.
DEFAULT_MAX_RETRY_TIME_S = 150.0
INITIAL_BACKOFF_S = 0.25
MAX_BACKOFF_S = 4.0
# Honour server-directed delays up to a minute; beyond that, waiting inside one token step is worse
# than failing with the tokens generated so far.
MAX_RETRY_AFTER_S = 60.0
RETRY_STATUSES = frozenset({408, 409, 429})
# 5xx are retried but these two, which say the server will never do what was asked.
PERMANENT_5XX = frozenset({501, 505})


def retryable_status(status: int) -> bool:
    """Whether an answer with this HTTP status is worth asking again."""
    return status in RETRY_STATUSES or (500 <= status < 600 and status not in PERMANENT_5XX)


class _RetryableStatus(Exception):
    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"HTTP {response.status_code}")
        self.response = response


class _BrokenAnswer(Exception):
    """A 200 whose body is not what was asked for: a transient fault, retried like a 503."""

    def __init__(self, error: ResponseFormatError) -> None:
        super().__init__(str(error))
        self.error = error


_RETRIED = (_RetryableStatus, _BrokenAnswer, httpx.TransportError)


def _finite_only(constant: str) -> float:
    # json.loads accepts NaN and Infinity, which JSON does not; -Infinity is a logprob of an
    # impossible token (some servers write it), the others are a broken answer.
    if constant == "-Infinity":
        return -math.inf
    raise ResponseFormatError(f"the answer holds {constant} where a number should be")


def decode_json(content: bytes) -> Any:
    """A 200 answer's JSON, or ResponseFormatError when it is not JSON or holds NaN/Infinity."""
    try:
        return orjson.loads(content)  # strict JSON: no NaN or Infinity, valid UTF-8
    except orjson.JSONDecodeError:
        pass  # then json's reading, which accepts -Infinity and says what else is wrong
    try:
        return json.loads(content, parse_constant=_finite_only)
    except (ValueError, UnicodeDecodeError, RecursionError):
        snippet = content[:200].decode("utf-8", "replace")
        raise ResponseFormatError(f"the answer is not JSON: {snippet!r}") from None


def make_timeout(
    timeout: httpx.Timeout | float | None, connect_timeout: float | None = None
) -> httpx.Timeout:
    """An httpx.Timeout from seconds (per read, write and pool wait) and connect seconds, checked:
    every limit finite and > 0, so that a hung server never hangs the client."""
    if isinstance(timeout, httpx.Timeout):
        base = timeout
    else:
        _positive_seconds("timeout", timeout)
        assert timeout is not None
        base = httpx.Timeout(float(timeout), connect=DEFAULT_TIMEOUT.connect)
    if connect_timeout is not None:
        _positive_seconds("connect_timeout", connect_timeout)
        base = httpx.Timeout(
            connect=float(connect_timeout), read=base.read, write=base.write, pool=base.pool
        )
    for name in ("connect", "read", "write", "pool"):
        _positive_seconds(f"timeout.{name}", getattr(base, name))
    return base


def _positive_seconds(name: str, value: object) -> None:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not (math.isfinite(value) and value > 0):  # type: ignore[arg-type]
        raise ConfigError(f"{name} must be a number of seconds > 0, got {value!r}")


def _retry_stop(attempts: int, deadline: float) -> Callable[[RetryCallState], bool]:
    """Stop after ``attempts``, or when the next attempt would begin past ``deadline`` (the
    running loop's time)."""

    def stop(state: RetryCallState) -> bool:
        if state.attempt_number >= attempts:
            return True
        upcoming = getattr(state, "upcoming_sleep", 0.0) or 0.0
        return asyncio.get_running_loop().time() + upcoming >= deadline

    return stop


def _describe(exc: BaseException | None) -> str:
    """What went wrong in one attempt, for the retry warning."""
    if exc is None:
        return "?"
    if isinstance(exc, _RetryableStatus):
        try:
            body = exc.response.json()
        except ValueError:
            body = exc.response.text
        return f"{exc}: {error_message(body)}"[:300]
    if isinstance(exc, _BrokenAnswer):
        return str(exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds the server asks us to wait: ``retry-after-ms``, then ``retry-after`` as seconds or
    as an HTTP date. None when absent or unparsable."""
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _backoff(retry_state: RetryCallState) -> float:
    exc = retry_state.outcome.exception() if retry_state.outcome else None
    if isinstance(exc, _RetryableStatus):
        delay = parse_retry_after(exc.response.headers)
        if delay is not None and delay <= MAX_RETRY_AFTER_S:
            return delay
    backoff = wait_exponential(multiplier=INITIAL_BACKOFF_S, max=MAX_BACKOFF_S) + wait_random(
        0, INITIAL_BACKOFF_S
    )
    return backoff(retry_state)


def error_message(body: Any) -> str:
    """The human message inside an error body of any dialect we know.

    OpenAI/vLLM nest it (``{"error": {"message": ...}}``), older vLLM is flat
    (``{"object": "error", "message": ...}``), TGI sends ``{"error": ..., "error_type": ...}``.
    """
    if isinstance(body, dict):
        inner = body.get("error")
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if isinstance(inner, str) and inner:
            return inner
        if body.get("message"):
            return str(body["message"])
        if body.get("detail"):
            return str(body["detail"])
    if isinstance(body, str) and body.strip():
        return body.strip()[:500]
    return "no error message in the response"


def status_error(status: int, message: str, body: Any) -> APIStatusError:
    """The error class for an HTTP status; ``message`` already says what was sent and what to do."""
    if status in (400, 422):
        cls: type[APIStatusError] = BadRequestError
    elif status in (401, 403):
        cls = AuthenticationError
    elif status == 404:
        cls = NotFoundError
    elif status == 429:
        cls = RateLimitError
    elif status >= 500:
        cls = ServerError
    else:
        cls = APIStatusError
    return cls(message, status_code=status, body=body)


@dataclass(frozen=True)
class RateLimits:
    """Client-side limits for one server (None: no limit). Hosted APIs publish theirs per key.

    ``tokens_per_minute`` counts each request's prompt tokens plus the tokens it asks for.
    """

    max_concurrency: int | None = None
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_concurrency", "requests_per_minute", "tokens_per_minute"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name} must be > 0 (or None for no limit), got {value!r}")


class _Gate:
    """The limits and the shared pause of one transport, on its home loop.

    aiolimiter's leaky bucket does the per-minute counting (a well-kept implementation of exactly
    this; asyncio has none), an asyncio.Semaphore the concurrency."""

    def __init__(self, limits: RateLimits) -> None:
        self.slots = asyncio.Semaphore(limits.max_concurrency or 1_000_000)
        self.requests = _limiter(limits.requests_per_minute)
        self.tokens = _limiter(limits.tokens_per_minute)
        self.paused_until = 0.0  # loop.time(): a server said "retry after"

    async def admit(self, tokens: int) -> None:
        loop = asyncio.get_running_loop()
        while (wait := self.paused_until - loop.time()) > 0:
            await asyncio.sleep(wait)
        if self.requests is not None:
            await self.requests.acquire()
        if self.tokens is not None:
            await self.tokens.acquire(min(float(tokens), self.tokens.max_rate))

    def pause(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        self.paused_until = max(self.paused_until, loop.time() + seconds)


def _limiter(per_minute: float | None) -> Any:
    if per_minute is None:
        return None
    from aiolimiter import AsyncLimiter

    return AsyncLimiter(per_minute, 60)


def _as_httpx_error(exc: BaseException) -> BaseException:
    """The httpx error httpcore raises for the fault behind ``exc`` (an aiohttp error, or
    httpx-aiohttp's mapping of one, which turns resets and refused connections into timeouts);
    ``exc`` itself when it is neither."""
    import aiohttp

    original = exc
    if isinstance(exc, httpx.TransportError) and isinstance(exc.__cause__, aiohttp.ClientError):
        original = exc.__cause__
    if not isinstance(original, aiohttp.ClientError):
        return exc
    message = str(original) or type(original).__name__
    mapped: type[httpx.TransportError]
    if isinstance(original, aiohttp.ConnectionTimeoutError):
        mapped = httpx.ConnectTimeout
    elif isinstance(original, aiohttp.ServerTimeoutError):
        mapped = httpx.ReadTimeout
    elif isinstance(original, aiohttp.ClientConnectorError):
        mapped = httpx.ConnectError
    elif isinstance(original, aiohttp.ServerDisconnectedError | aiohttp.ClientResponseError):
        mapped = httpx.RemoteProtocolError  # closed before the answer, or not HTTP
    elif isinstance(original, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError):
        mapped = httpx.ReadError  # reset, or the body cut short
    elif isinstance(original, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        mapped = httpx.UnsupportedProtocol
    else:
        mapped = httpx.TransportError
    return mapped(message)


class _MappedStream(httpx.AsyncByteStream):
    """A response body whose read errors are httpx's (see ``_as_httpx_error``)."""

    def __init__(self, stream: httpx.AsyncByteStream) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._stream:
                yield chunk
        except Exception as exc:
            mapped = _as_httpx_error(exc)
            if mapped is exc:
                raise
            raise mapped from exc

    async def aclose(self) -> None:
        await self._stream.aclose()


def _aiohttp_transport(proxy: httpx.Proxy | None = None) -> httpx.AsyncBaseTransport:
    """httpx-aiohttp's transport with our pool (``POOL_LIMITS``, every connection kept alive; no
    cookie jar of its own: httpx keeps the cookies) and httpcore's errors."""
    import aiohttp
    from httpx_aiohttp import AiohttpTransport

    class Transport(AiohttpTransport):
        def get_client(self) -> aiohttp.ClientSession:
            keepalive = self.limits.keepalive_expiry
            connector = aiohttp.TCPConnector(
                limit=self.limits.max_connections or 0,
                ssl=self.ssl_context,
                **({} if keepalive is None else {"keepalive_timeout": keepalive}),
            )
            return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            try:
                response = await super().handle_async_request(request)
            except Exception as exc:
                mapped = _as_httpx_error(exc)
                if mapped is exc:
                    raise
                raise mapped from exc
            assert isinstance(response.stream, httpx.AsyncByteStream)
            response.stream = _MappedStream(response.stream)
            return response

    return Transport(limits=POOL_LIMITS, proxy=proxy)


def _environment_proxies() -> dict[str, httpx.AsyncBaseTransport | None]:
    """httpx's ``mounts`` for the proxies the environment names (``HTTP_PROXY``, ``HTTPS_PROXY``,
    ``ALL_PROXY``, ``NO_PROXY``), read as httpx reads them: a client given a transport does not."""
    try:
        from httpx._utils import get_environment_proxies
    except ImportError:  # pragma: no cover - httpx moved it; no proxies rather than no client
        return {}
    return {
        pattern: None if url is None else _aiohttp_transport(proxy=httpx.Proxy(url))
        for pattern, url in get_environment_proxies().items()
    }


class _Home:
    """Where one transport does its I/O: a private loop thread, and the client and the gate that
    live on its loop (the client is opened there on first use)."""

    def __init__(self, limits: RateLimits, host: LoopThread | None = None) -> None:
        self.owns_thread = host is None
        self.thread = LoopThread("proxyclient-http") if host is None else host
        self.client: httpx.AsyncClient | None = None
        self.routes: dict[str, tuple[httpx.URL, httpx.AsyncBaseTransport]] = {}
        self.json_headers = httpx.Headers()  # the client's, with the JSON content type
        self.timeouts: dict[str, float | None] = {}  # the client's, as a request extension
        self.gate = _Gate(limits)  # asyncio's and aiolimiter's primitives bind on first use

    def route(self, client: httpx.AsyncClient, path: str) -> tuple[httpx.URL, Any]:
        """``path`` under the client's base URL, as httpx joins them, and the transport httpx
        would send it with (a proxy's, where the environment names one): found once per path,
        where ``client.send`` would parse, join and match them again for every request."""
        route = self.routes.get(path)
        if route is None:
            base = client.base_url  # with the trailing slash httpx gives it
            url = httpx.URL(path)
            if url.is_relative_url:
                url = base.copy_with(raw_path=base.raw_path + url.raw_path.lstrip(b"/"))
            route = self.routes[path] = (url, client._transport_for_url(url))
        return route

    async def send(
        self, client: httpx.AsyncClient, method: str, path: str, payload: Any, stream: bool
    ) -> httpx.Response:
        """``client.send(client.build_request(method, path, json=payload), stream=stream)``,
        without the layers of it we do not use (auth flows, redirects, event hooks: none is
        configured; they were a fifth of the client's CPU per request at 64 concurrent
        generations). The client's headers, timeout and cookies apply as there."""
        url, transport = self.route(client, path)
        headers, content = client.headers, None
        if payload is not None:  # as httpx encodes json=
            headers = self.json_headers
            content = json.dumps(
                payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False
            ).encode()
        request = httpx.Request(
            method, url, headers=headers, content=content, extensions={"timeout": self.timeouts}
        )
        cookies = client.cookies
        if cookies.jar:  # a hosted API's load balancer may pin us with one
            cookies.set_cookie_header(request)
        response = await transport.handle_async_request(request)
        response.request = request
        if "set-cookie" in response.headers:
            cookies.extract_cookies(response)
        if not stream:
            try:
                await response.aread()
            except BaseException:
                await response.aclose()
                raise
        return response

    def open_client(self, client: httpx.AsyncClient) -> None:
        """Use ``client`` from now on (routes, headers and timeouts are its own)."""
        self.client = client
        self.routes.clear()
        self.json_headers = client.headers.copy()
        self.json_headers["Content-Type"] = "application/json"
        self.timeouts = client.timeout.as_dict()

    async def close_client(self) -> None:
        if self.client is not None and not self.client.is_closed:
            await self.client.aclose()
        self.client = None


class HTTPTransport:
    """JSON over HTTP to one server, with retries. The API key never leaves the headers.

    ``timeout``: seconds per read (also write and pool wait), or an ``httpx.Timeout``;
    ``connect_timeout`` overrides its connect part. ``max_retries``: attempts after the first;
    ``max_retry_time``: seconds all attempts of one request may take, waits included.
    ``extra_headers``: sent with every request (a provider's optional ones, e.g. OpenRouter's
    attribution); the API key's header wins over one of the same name, and values are never
    shown (``repr`` names the headers only).
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        connect_timeout: float | None = None,
        max_retries: int = DEFAULT_MAX_RETRIES,
        max_retry_time: float = DEFAULT_MAX_RETRY_TIME_S,
        transport: httpx.AsyncBaseTransport | None = None,
        limits: RateLimits | None = None,
        auth_header: tuple[str, str] = ("Authorization", "Bearer {key}"),
        extra_headers: Mapping[str, str] | None = None,
    ) -> None:
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ConfigError(
                f"max_retries must be an integer >= 0 (0: no retries), got {max_retries!r}"
            )
        _positive_seconds("max_retry_time", max_retry_time)
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key or None
        self._auth_header = auth_header
        self._extra_headers = dict(extra_headers or {})
        self.timeout = make_timeout(timeout, connect_timeout)
        self.max_retries = max_retries
        self.max_retry_time = float(max_retry_time)
        self.limits = limits or RateLimits()
        self._transport = transport  # tests inject httpx.MockTransport
        # Why a loop of its own and not the first loop that called: that loop's thread may block
        # in the sync API (a notebook cell calls generate() after awaiting agenerate()), waiting
        # for a request that would wait for that loop: a deadlock. And that loop may end first.
        self._home: _Home | None = None
        self._host: LoopThread | None = None  # a loop lent by host_on()
        self._lock = threading.Lock()  # callers on several threads share _home

    def __repr__(self) -> str:
        key = "'***'" if self._api_key else "None"
        extra = f", extra_headers={sorted(self._extra_headers)}" if self._extra_headers else ""
        return f"HTTPTransport(base_url={self.base_url!r}, api_key={key}{extra})"

    def redact(self, text: str) -> str:
        """``text`` with the API key replaced; servers sometimes echo a wrong key back."""
        return text.replace(self._api_key, "***") if self._api_key else text

    async def _at_home(self, work: Callable[[_Home], Coroutine[Any, Any, T]]) -> T:
        """``work(home)`` run on the home loop: directly when the caller is on it already, else
        handed over and awaited from the caller's loop."""
        with self._lock:  # so that aclose() cannot stop the home between lookup and hand-over
            home = self._home_now()
            here = home.thread.in_loop_thread()
            future = None if here else home.thread.submit(work(home))
        if future is None:
            return await work(home)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if future.cancelled() and task is not None and not task.cancelling():
                # Not the caller's cancellation: aclose() stopped the home under this request.
                raise APIConnectionError(
                    f"{self.base_url}: the transport was closed while a request was in flight"
                ) from None
            raise

    def host_on(self, thread: LoopThread) -> bool:
        """Do the I/O on ``thread``'s loop from now on (a ProxyTuner lends its private loop):
        requests made there then run in place, without a hand-over between two threads each
        (measured: a sixth of the client's CPU at 64 concurrent generations). Whoever lends the
        loop closes this transport before the loop; once the loop is closed the transport goes
        back to a loop of its own. Only while no request has been made and nobody else lent one:
        False otherwise (then nothing changes)."""
        with self._lock:
            if self._home is not None or (self._host is not None and not self._host.closed):
                return False
            self._host = thread
            return True

    def _home_now(self) -> _Home:
        """The home, started if there is none; under ``self._lock``."""
        if self._home is None:
            host = self._host if self._host is not None and not self._host.closed else None
            self._home = _Home(self.limits, host)
        return self._home

    def _http(self, home: _Home) -> httpx.AsyncClient:
        """The home's client; on the home loop only."""
        if home.client is None or home.client.is_closed:
            name, value = self._auth_header
            headers = dict(self._extra_headers)
            if self._api_key:
                headers = {h: v for h, v in headers.items() if h.lower() != name.lower()}
                headers[name] = value.format(key=self._api_key)
            injected = self._transport is not None  # tests inject httpx.MockTransport
            client = httpx.AsyncClient(
                base_url=self.base_url,
                headers=headers,
                timeout=self.timeout,
                transport=self._transport if injected else _aiohttp_transport(),
                mounts=None if injected else _environment_proxies(),
            )
            home.open_client(client)
            return client
        return home.client

    async def request_json(
        self,
        method: str,
        path: str,
        payload: Any = None,
        *,
        what: str = "",
        tokens: int = 0,
        parse: Callable[[Any], Any] | None = None,
    ) -> Any:
        """Send; return the answer's JSON, or ``parse(json)`` when ``parse`` is given.

        Retried (see the module's docstring): connection errors and timeouts, 408/409/429 and
        5xx, and a 200 that is not JSON or that ``parse`` refuses with ResponseFormatError.
        ``what`` describes the request for error messages (never the key); ``tokens`` is what it
        costs against ``RateLimits.tokens_per_minute``.
        """
        return await self._at_home(
            lambda home: self._request(home, method, path, payload, what, tokens, parse)
        )

    async def stream_json(
        self,
        method: str,
        path: str,
        payload: Any = None,
        *,
        what: str = "",
        tokens: int = 0,
        ndjson: bool = False,
    ) -> AsyncIterator[Any]:
        """Send; yield the JSON of each server-sent event (``data: ...``) as it arrives, until
        ``[DONE]`` or the end of the answer; with ``ndjson``, of each line of newline-delimited
        JSON instead (Ollama's streams), until the end of the answer.

        Opening the stream is retried as ``request_json`` is, until a 200 arrives; a failure
        after that ends the iteration with the error (APIConnectionError for a dropped
        connection), since the caller has what came before it. Closing the iterator early closes
        the connection, which tells the server to stop generating."""
        caller = asyncio.get_running_loop()
        events: asyncio.Queue[Any] = asyncio.Queue()
        end = object()

        def put(item: Any) -> None:
            caller.call_soon_threadsafe(events.put_nowait, item)

        async def pump(home: _Home) -> None:
            try:
                async for event in self._stream(home, method, path, payload, what, tokens, ndjson):
                    put(event)
                put(end)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # handed to the caller, raised there
                put(exc)

        with self._lock:
            home = self._home_now()
            running = (
                asyncio.ensure_future(pump(home))
                if home.thread.in_loop_thread()
                else home.thread.submit(pump(home))
            )
        try:
            while True:
                item = await events.get()
                if item is end:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            running.cancel()

    async def _stream(
        self,
        home: _Home,
        method: str,
        path: str,
        payload: Any,
        what: str,
        tokens: int,
        ndjson: bool = False,
    ) -> AsyncIterator[Any]:
        response = await self._request(home, method, path, payload, what, tokens, None, True)
        sent = f"{method} {response.request.url}" + (f" ({what})" if what else "")
        try:
            async for line in response.aiter_lines():
                if ndjson:
                    data = line.strip()
                    if not data:
                        continue
                elif not line.startswith("data:"):
                    continue  # comments, event names, keep-alives
                else:
                    data = line[len("data:") :].strip()
                    if data == "[DONE]":
                        return
                try:
                    yield decode_json(data.encode())
                except ResponseFormatError as exc:
                    raise ResponseFormatError(self.redact(f"{sent}: {exc}")) from None
        except httpx.TimeoutException as exc:
            raise APITimeoutError(
                f"{sent}: the stream stalled past the read timeout ({type(exc).__name__})"
            ) from None
        except httpx.TransportError as exc:
            reason = self.redact(str(exc)) or type(exc).__name__
            raise APIConnectionError(f"{sent}: the stream broke ({reason})") from None
        finally:
            await response.aclose()

    async def _request(
        self,
        home: _Home,
        method: str,
        path: str,
        payload: Any,
        what: str,
        tokens: int,
        parse: Callable[[Any], Any] | None,
        stream: bool = False,
    ) -> Any:
        """One request under the retry policy: its parsed JSON, or with ``stream`` the open
        response (a 200 whose body the caller reads and closes)."""
        url = path if path.startswith(("http://", "https://")) else f"{self.base_url}{path}"
        sent = f"{method} {url}" + (f" ({what})" if what else "")
        attempts = self.max_retries + 1
        gate = home.gate
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_retry_time
        made = 0  # attempts so far
        response: httpx.Response | None = None

        def tried() -> str:
            took = self.max_retry_time - max(0.0, deadline - loop.time())
            return f"{made} attempt{'s' if made != 1 else ''} in {took:.1f} s"

        async def attempt() -> Any:
            """One attempt: the result, None for an error answer (in ``response``), or one of
            ``_RETRIED`` for a fault worth another attempt."""
            nonlocal made, response
            made += 1
            try:
                async with asyncio.timeout_at(deadline):
                    async with gate.slots:
                        await gate.admit(tokens)
                        response = await home.send(self._http(home), method, path, payload, stream)
                        if stream and response.is_error:
                            await response.aread()  # the error's body, then closed
                            await response.aclose()
            except TimeoutError:
                raise APITimeoutError(
                    f"{sent}: no complete answer within max_retry_time "
                    f"({self.max_retry_time:g} s, {tried()}). Is the server overloaded? "
                    f"Raise the time limit if it is just slow."
                ) from None
            if retryable_status(response.status_code):
                delay = parse_retry_after(response.headers)
                # Past the cap we retry after our own backoff (see _backoff), so we hold the
                # others back no longer than that either.
                if response.status_code == 429 and delay is not None and delay <= MAX_RETRY_AFTER_S:
                    gate.pause(delay)
                raise _RetryableStatus(response)
            if response.is_error:
                return None
            if stream:
                return response
            try:
                body = decode_json(response.content)
                return parse(body) if parse is not None else body
            except ResponseFormatError as exc:
                raise _BrokenAnswer(exc) from None

        try:
            try:
                result = await attempt()  # most requests: one attempt, no retry machinery
            except _RETRIED as first:
                result = await self._retried(attempt, first, sent, attempts, deadline)
        except _RetryableStatus as exc:
            response = exc.response
        except _BrokenAnswer as exc:
            raise ResponseFormatError(
                self.redact(f"{sent}: {exc.error}") + f" (after {tried()})"
            ) from None
        except httpx.TimeoutException as exc:
            raise APITimeoutError(
                f"{sent}: no answer within the timeout after {tried()} "
                f"({type(exc).__name__}). Is the server overloaded? Raise the timeout if slow."
            ) from None
        except httpx.TransportError as exc:
            reason = self.redact(str(exc)) or type(exc).__name__
            raise APIConnectionError(
                f"{sent}: could not connect after {tried()} ({reason}). "
                f"Is the server running, and is the base URL right?"
            ) from None

        assert response is not None
        if response.is_error:
            body = self._redacted_body(response)
            message = error_message(body)
            gave_up = f" (after {tried()})" if retryable_status(response.status_code) else ""
            raise status_error(
                response.status_code,
                f"{sent}: HTTP {response.status_code}: {message}{gave_up}",
                body,
            )
        return result

    async def _retried(
        self,
        attempt: Callable[[], Coroutine[Any, Any, T]],
        first: BaseException,
        sent: str,
        attempts: int,
        deadline: float,
    ) -> T:
        """The attempts after a first that failed with ``first``, under tenacity: it is handed
        the first failure as its own first attempt, then waits and tries again."""

        def warn(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            logger.warning(
                "%s",
                self.redact(
                    f"retrying {sent} in {state.upcoming_sleep:.2f} s after "
                    f"{_describe(exc)} (attempt {state.attempt_number} of {attempts})"
                ),
            )

        failed = [first]
        async for retry in AsyncRetrying(
            stop=_retry_stop(attempts, deadline),
            wait=_backoff,
            retry=retry_if_exception_type(_RETRIED),
            before_sleep=warn,
            reraise=True,
        ):
            with retry:
                if failed:
                    raise failed.pop()
                result = await attempt()
        return result

    async def peek(self, url: str, timeout: float = 3.0) -> Any:
        """GET an absolute URL once (no retries); its JSON on 200, else None. For discovery."""
        return await self._at_home(lambda home: self._peek(home, url, timeout))

    async def _peek(self, home: _Home, url: str, timeout: float) -> Any:
        try:
            response = await self._http(home).get(url, timeout=timeout)
            return response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    def _redacted_body(self, response: httpx.Response) -> Any:
        try:
            return json.loads(self.redact(response.text))
        except ValueError:
            return self.redact(response.text)

    async def aclose(self) -> None:
        """Close the client on its loop, then stop that loop and its thread (not a lent one).
        Idempotent; a request made afterwards opens a new home."""
        with self._lock:
            home, self._home = self._home, None
        if home is None:
            return
        if not home.owns_thread:
            if home.thread.in_loop_thread():
                await home.close_client()
            elif not home.thread.closed:
                with contextlib.suppress(RuntimeError):  # closed meanwhile: nothing left open
                    await asyncio.wrap_future(home.thread.submit(home.close_client()))
            return
        if home.thread.in_loop_thread():
            # Called from the home loop itself, which cannot join its own thread.
            await home.close_client()
            threading.Thread(target=home.thread.close, name="proxyclient-http-close").start()
            return
        # LoopThread.close blocks until the loop has wound down: not on the caller's loop.
        await asyncio.to_thread(home.thread.close, home.close_client())
