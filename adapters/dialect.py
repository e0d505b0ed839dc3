"""What every HTTP adapter shares: one request per step, and errors explained once.

An adapter subclass is a payload builder and a response parser (both pure, tested with literal
JSON); the flow around them — send, map errors to what the user should do — lives here.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from proxyclient.adapters.base import Capabilities, Prompt, TopLogprobs
from proxyclient.adapters.discovery import dialect_hint
from proxyclient.adapters.http import HTTPTransport
from proxyclient.errors import (
    APIStatusError,
    BadRequestError,
    ContextLengthError,
    NotFoundError,
    ProxyClientError,
    ResponseFormatError,
    TopKTooLargeError,
)

# How servers word "k is over my cap", each with the cap as group 1.
_K_CAP = (
    re.compile(r"max(?:imum)? allowed:?\s*(-?\d+)", re.IGNORECASE),  # vLLM
    re.compile(r"(?:<=|less than or equal to|at most|maximum of|no more than)\s*(\d+)", re.I),
    re.compile(r"(?:between|range)\s*\[?\s*0\s*(?:,|and)\s*(\d+)", re.IGNORECASE),
)
_REFUSED = re.compile(r"logprobs.*(?:not allowed|not supported)|not allowed.*logprobs", re.I)
_K_WORDS = re.compile(r"logprob|top_n_tokens|n_probs", re.IGNORECASE)
# The last alternative is what vLLM 0.32 says when the prompt fills the context exactly: it
# shrinks max_tokens to the room left, which is 0.
_CONTEXT = re.compile(
    r"context length|context window|max_model_len|maximum model length|max_input_tokens|"
    r"max_total_tokens|max_tokens must be at least 1, got 0|exceeds the available context",
    re.IGNORECASE,
)


def k_cap_in(message: str) -> int | None:
    """The cap on k that an error message states, or None."""
    if not _K_WORDS.search(message):
        return None
    for pattern in _K_CAP:
        if match := pattern.search(message):
            return int(match.group(1))
    return None


class DialectAdapter:
    """Base of the HTTP adapters. Subclasses set ``dialect`` and ``capabilities`` and implement
    ``build_request`` and ``parse_response``."""

    dialect: ClassVar[str] = ""
    k_option: ClassVar[str] = "--top-logprobs"  # what the user changes to lower k
    capabilities: Capabilities

    def __init__(self, transport: HTTPTransport, model: str) -> None:
        self.transport = transport
        self.name = model

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.name!r}, transport={self.transport!r})"

    def build_request(self, prompt: Prompt, k: int) -> tuple[str, dict[str, Any]]:
        raise NotImplementedError

    def parse_response(self, body: Any, prompt: Prompt, k: int) -> TopLogprobs:
        raise NotImplementedError

    async def top_logprobs(self, prompt: Prompt, k: int) -> TopLogprobs:
        path, payload = self.build_request(prompt, k)
        return await self.send(path, payload, prompt, k)

    async def send(self, path: str, payload: dict[str, Any], prompt: Prompt, k: int) -> TopLogprobs:
        """POST one request and parse it, with errors explained."""
        what = f"model {self.name!r}, {len(prompt.ids)} prompt tokens, k={k}"
        try:
            body = await self.transport.request_json("POST", path, payload, what=what)
            return self.parse_response(body, prompt, k)
        except APIStatusError as exc:
            raise await self.explain(exc, prompt, k) from None
        except ResponseFormatError as exc:
            hint = await dialect_hint(self.transport, self.dialect)
            if not hint:
                raise
            raise ResponseFormatError(f"{exc}{hint}") from None

    async def explain(self, exc: APIStatusError, prompt: Prompt, k: int) -> ProxyClientError:
        """The error with what to do about it."""
        text = str(exc)
        if isinstance(exc, BadRequestError):
            server_max = k_cap_in(text)
            if server_max is not None:
                fix = f"pass {self.k_option} {server_max} or less" if server_max > 0 else ""
                return TopKTooLargeError(
                    f"{text}\nThe server allows at most {server_max} top logprobs and {k} were "
                    f"asked for: {fix or 'ask for fewer'}"
                    + (
                        ", or restart vLLM with a larger --max-logprobs (-1 allows the whole "
                        "vocabulary)."
                        if self.dialect == "vllm"
                        else "."
                    ),
                    status_code=exc.status_code,
                    body=exc.body,
                    server_max=server_max,
                )
            if _CONTEXT.search(text):
                return ContextLengthError(
                    f"{text}\nThe prompt plus the tokens generated so far ({len(prompt.ids)} "
                    f"tokens) no longer fit the server's context window: shorten the prompt or "
                    f"lower max_new_tokens.",
                    status_code=exc.status_code,
                    body=exc.body,
                )
        if exc.status_code in (400, 403) and _REFUSED.search(text):
            return type(exc)(
                f"{text}\nThis model does not give logprobs (OpenAI's reasoning models refuse "
                f"them), and proxy-tuning needs them: use another base model.",
                status_code=exc.status_code,
                body=exc.body,
            )
        hint = ""
        if exc.status_code in (404, 405):
            hint = await dialect_hint(self.transport, self.dialect)
        if isinstance(exc, NotFoundError):
            return NotFoundError(
                f"{text} — {hint.strip() or await self._served_models_hint()}",
                status_code=exc.status_code,
                body=exc.body,
            )
        if hint:
            return type(exc)(f"{text}{hint}", status_code=exc.status_code, body=exc.body)
        return exc

    async def _served_models_hint(self) -> str:
        try:
            body = await self.transport.request_json("GET", "/models", what="list models")
            names = [m["id"] for m in body.get("data", [])]
        except (ProxyClientError, KeyError, TypeError, AttributeError):
            return "check --base-model and --api (GET /v1/models lists an OpenAI-style server's)."
        return f"the server serves {names}; pass one of them as --base-model."

    async def aclose(self) -> None:
        await self.transport.aclose()
