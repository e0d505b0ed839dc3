"""The error types users catch.

    ProxyClientError
    ├── ConfigError            bad argument or option (ValueError too)
    ├── ModelLoadError         a local expert/anti-expert could not be loaded or does not fit
    ├── UnsupportedError       the base's API cannot do what was asked (e.g. score given text)
    └── BaseModelError         the remote base model failed
        ├── APIConnectionError     no answer (refused, reset, DNS) after retries
        │   └── APITimeoutError        no answer within the timeouts, or within max_retry_time
        ├── APIStatusError         an HTTP error status; .status_code, .body
        │   ├── BadRequestError        400/422
        │   │   ├── TopKTooLargeError      k over the server's cap; .server_max
        │   │   └── ContextLengthError     prompt longer than the server's context
        │   ├── AuthenticationError    401/403
        │   ├── NotFoundError          404 (wrong model name, wrong path)
        │   ├── RateLimitError         429
        │   └── ServerError            5xx
        └── ResponseFormatError    a 200 answer that lacks what we asked for (e.g. no logprobs),
                                   is not JSON, or holds NaN; retried like a 503 first

Every error raised while generating carries ``partial``: the :class:`~proxyclient.Generation`
of the tokens chosen before the failure (finish_reason ``"error"``), so nothing generated is lost;
``ProxyTuner.generate(prompt, config, resume=error.partial)`` goes on from there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from proxyclient.result import Generation


class ProxyClientError(Exception):
    """Base of every error proxyclient raises on purpose."""

    partial: Generation | None = None


class ConfigError(ProxyClientError, ValueError):
    """An argument or option has a value we cannot use; the message names it and the fix."""


class UnsupportedError(ProxyClientError):
    """The base's API (or this base/proxies pairing) cannot do what was asked; the message says
    what can."""


class ModelLoadError(ProxyClientError):
    """A local model or tokenizer could not be loaded, or expert and anti-expert do not match."""


class BaseModelError(ProxyClientError):
    """The remote base model could not give us its next-token log-probabilities."""


class APIConnectionError(BaseModelError):
    """The server could not be reached (after retries)."""


class APITimeoutError(APIConnectionError):
    """The server did not answer in time (after retries)."""


class APIStatusError(BaseModelError):
    """The server answered with an HTTP error status."""

    def __init__(self, message: str, *, status_code: int, body: Any = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.body = body


class BadRequestError(APIStatusError):
    """The server refused the request as malformed (400/422)."""


class TopKTooLargeError(BadRequestError):
    """More top logprobs were asked for than the server allows."""

    def __init__(self, message: str, *, status_code: int, body: Any, server_max: int | None):
        super().__init__(message, status_code=status_code, body=body)
        self.server_max = server_max


class ContextLengthError(BadRequestError):
    """The prompt (plus what was generated) no longer fits the server's context window."""


class AuthenticationError(APIStatusError):
    """The API key is missing, wrong, or not allowed to do this (401/403)."""


class NotFoundError(APIStatusError):
    """The server has no such model or endpoint (404)."""


class RateLimitError(APIStatusError):
    """The server kept answering 429 after all retries."""


class ServerError(APIStatusError):
    """The server kept failing (5xx) after all retries."""


class ResponseFormatError(BaseModelError):
    """The server answered 200 but without usable log-probabilities (after retries)."""
