"""proxyclient's errors as HTTP statuses in OpenAI's error shape; secrets never in a message.

ConfigError, BadRequestError (k too large, context too long), UnsupportedError -> 400
RateLimitError (the base kept answering 429)                                  -> 429
APITimeoutError (the base did not answer in time)                             -> 504
APIConnectionError (the base unreachable), base 4xx/5xx, broken answers       -> 502
the base's own 503 (overloaded)                                               -> 503
ModelLoadError, anything unforeseen                                           -> 500
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from proxyclient import errors
from proxyclient.config import OPTION_BY_HTTP, OPTIONS
from proxyclient.server.protocol import APIError

Redact = Callable[[str], str]


def redactor(secrets: Iterable[str | None], *more: Redact) -> Redact:
    """A function that blanks every secret (and applies ``more``, e.g. the transport's own)."""
    words = sorted({s for s in secrets if s}, key=len, reverse=True)

    def redact(text: str) -> str:
        for other in more:
            text = other(text)
        for word in words:
            text = text.replace(word, "***")
        return text

    return redact


def to_api_error(exc: BaseException, redact: Redact) -> APIError:
    """The APIError a client gets for ``exc``."""
    if isinstance(exc, APIError):
        exc.message = redact(exc.message)
        return exc
    message = redact(str(exc)) or type(exc).__name__
    if isinstance(exc, errors.UnsupportedError):
        return APIError(400, message, code="unsupported")
    if isinstance(exc, errors.ContextLengthError):
        return APIError(400, message, code="context_length_exceeded")
    if isinstance(exc, errors.TopKTooLargeError):
        return APIError(400, message, param="base_k", code="base_k_too_large")
    if isinstance(exc, errors.ConfigError | errors.BadRequestError):
        param = _param_of(message)
        if param is not None:  # the request's name for the option, not Python's
            message = param + message[message.index(" ") if " " in message else len(message) :]
        return APIError(400, message, param=param)
    if isinstance(exc, errors.RateLimitError):
        return APIError(429, message, type="rate_limit_error", code="base_rate_limited")
    if isinstance(exc, errors.APITimeoutError):
        return APIError(504, message, type="timeout_error", code="base_timeout")
    if isinstance(exc, errors.APIConnectionError):
        return APIError(502, message, type="server_error", code="base_unreachable")
    if isinstance(exc, errors.ServerError) and exc.status_code == 503:
        return APIError(503, message, type="server_error", code="base_unavailable")
    if isinstance(exc, errors.BaseModelError):
        return APIError(502, message, type="server_error", code="base_error")
    return APIError(500, "internal server error (logged on the server)", type="server_error")


def _param_of(message: str) -> str | None:
    """The request field a ConfigError's message starts with (by its Python or HTTP name)."""
    first = message.split(" ", 1)[0].split("=", 1)[0]
    option = OPTION_BY_HTTP.get(first) or next((o for o in OPTIONS if o.name == first), None)
    return option.edges.http if option is not None else None
