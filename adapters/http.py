"""The one place that talks HTTP: a shared httpx.AsyncClient, the retry policy, error mapping,
API-key redaction, and the client-side limits hosted APIs ask for. Adapters build payloads and
parse answers; they never retry or wait on their own.

Our requests happen once per generated token, so timeouts are short and per request. Every
sequence that talks to one server shares its transport: a 429 with Retry-After pauses all of
them, not only the one that got it, and the optional limits (``RateLimits``) count them together.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
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

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
DEFAULT_MAX_RETRIES = 3
INITIAL_BACKOFF_S = 0.25
MAX_BACKOFF_S = 4.0
# Honour server-directed delays up to a minute; beyond that, waiting inside one token step is worse
# than failing with the tokens generated so far.
MAX_RETRY_AFTER_S = 60.0
RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})


class _RetryableStatus(Exception):
    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"HTTP {response.status_code}")
        self.response = response


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
    """The limits and the shared pause of one transport, on one event loop.

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


class HTTPTransport:
    """JSON over HTTP to one server, with retries. The API key never leaves the headers."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        transport: httpx.AsyncBaseTransport | None = None,
        limits: RateLimits | None = None,
        auth_header: tuple[str, str] = ("Authorization", "Bearer {key}"),
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key or None
        self._auth_header = auth_header
        self.timeout = timeout
        self.max_retries = max_retries
        self.limits = limits or RateLimits()
        self._transport = transport  # tests inject httpx.MockTransport
        self._client: httpx.AsyncClient | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._gate: _Gate | None = None

    def __repr__(self) -> str:
        key = "'***'" if self._api_key else "None"
        return f"HTTPTransport(base_url={self.base_url!r}, api_key={key})"

    def redact(self, text: str) -> str:
        """``text`` with the API key replaced; servers sometimes echo a wrong key back."""
        return text.replace(self._api_key, "***") if self._api_key else text

    def _http(self) -> httpx.AsyncClient:
        # An AsyncClient belongs to the event loop it first ran on; the sync API runs its own loop.
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop or self._client.is_closed:
            name, value = self._auth_header
            headers = {name: value.format(key=self._api_key)} if self._api_key else {}
            self._client = httpx.AsyncClient(
                base_url=self.base_url,
                headers=headers,
                timeout=self.timeout,
                transport=self._transport,
            )
            self._client_loop = loop
            self._gate = _Gate(self.limits)
        return self._client

    def _gate_here(self) -> _Gate:
        self._http()
        assert self._gate is not None
        return self._gate

    async def request_json(
        self, method: str, path: str, payload: Any = None, *, what: str = "", tokens: int = 0
    ) -> Any:
        """Send, retrying connection errors, 408/409/429 and 5xx with backoff; return parsed JSON.

        ``what`` describes the request for error messages (never the key); ``tokens`` is what it
        costs against ``RateLimits.tokens_per_minute``.
        """
        url = path if path.startswith(("http://", "https://")) else f"{self.base_url}{path}"
        sent = f"{method} {url}" + (f" ({what})" if what else "")
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.max_retries + 1),
            wait=_backoff,
            retry=retry_if_exception_type((_RetryableStatus, httpx.TransportError)),
            before_sleep=lambda state: logger.warning(
                "retrying %s after %s (attempt %d)",
                sent,
                state.outcome.exception() if state.outcome else "?",
                state.attempt_number,
            ),
            reraise=True,
        )
        attempts = self.max_retries + 1
        gate = self._gate_here()
        try:
            async for attempt in retrying:
                with attempt:
                    async with gate.slots:
                        await gate.admit(tokens)
                        response = await self._http().request(method, path, json=payload)
                    if response.status_code in RETRY_STATUSES:
                        delay = parse_retry_after(response.headers)
                        # Past the cap we retry after our own backoff (see _backoff), so we
                        # hold the others back no longer than that either.
                        capped = delay is not None and delay <= MAX_RETRY_AFTER_S
                        if response.status_code == 429 and capped:
                            gate.pause(delay)
                        raise _RetryableStatus(response)
        except _RetryableStatus as exc:
            response = exc.response
        except httpx.TimeoutException as exc:
            raise APITimeoutError(
                f"{sent}: no answer within the timeout after {attempts} attempts "
                f"({type(exc).__name__}). Is the server overloaded? Raise the timeout if slow."
            ) from None
        except httpx.TransportError as exc:
            reason = self.redact(str(exc)) or type(exc).__name__
            raise APIConnectionError(
                f"{sent}: could not connect after {attempts} attempts ({reason}). "
                f"Is the server running, and is the base URL right?"
            ) from None

        if response.is_error:
            body = self._redacted_body(response)
            message = error_message(body)
            raise status_error(
                response.status_code,
                f"{sent}: HTTP {response.status_code}: {message}",
                body,
            )
        try:
            return response.json()
        except ValueError:
            raise ResponseFormatError(
                f"{sent}: the answer is not JSON: {self.redact(response.text[:200])!r}"
            ) from None

    async def peek(self, url: str, timeout: float = 3.0) -> Any:
        """GET an absolute URL once (no retries); its JSON on 200, else None. For discovery."""
        try:
            response = await self._http().get(url, timeout=timeout)
            return response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    def _redacted_body(self, response: httpx.Response) -> Any:
        try:
            return json.loads(self.redact(response.text))
        except ValueError:
            return self.redact(response.text)

    async def aclose(self) -> None:
        if self._client is not None and not self._client.is_closed:
            with contextlib.suppress(RuntimeError):  # its loop is gone, and its sockets with it
                await self._client.aclose()
        self._client = None
