"""Reading a request: its body (within the size limit), the model it names, its options as a
GenerationConfig, and its prompt's tokens checked against the context length."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import Request

from proxyclient.chat import Chat
from proxyclient.config import GenerationConfig
from proxyclient.errors import ConfigError
from proxyclient.server import protocol
from proxyclient.server.errors import to_api_error
from proxyclient.server.protocol import APIError, ChatRequest, CompletionRequest
from proxyclient.server.state import ServerState

T = TypeVar("T")
M = TypeVar("M", CompletionRequest, ChatRequest)


async def read_body(state: ServerState, request: Request) -> bytes:
    """The request body, or a 413 as soon as it is known to exceed the limit (by its declared
    length, else while it streams in)."""
    limit = state.max_body_bytes
    too_large = APIError(
        413,
        f"the request body is larger than this server's limit of {limit} bytes; send a shorter "
        f"prompt (or start the server with a larger --max-body-bytes)",
        code="request_too_large",
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


# Bodies larger than this are parsed (and validated) in a worker thread: a prompt of megabytes
# takes the event loop, and with it every stream, for tens of milliseconds otherwise.
PARSE_ON_LOOP_BYTES = 64 * 1024


async def parsed(state: ServerState, body: bytes, parse: Callable[[bytes], T]) -> T:
    """``parse(body)``: on the event loop for a small body, else off it."""
    if len(body) <= PARSE_ON_LOOP_BYTES:
        return parse(body)
    return await state.off_loop(parse, body)


async def read_request(state: ServerState, request: Request, model: type[M]) -> M:
    """The body (see ``read_body``) parsed and validated as ``model``, or a 400 naming the field."""
    body = await read_body(state, request)
    return await parsed(state, body, functools.partial(protocol.parse, kind=model))


async def read_json_object(state: ServerState, request: Request) -> dict[str, Any]:
    return await parsed(state, await read_body(state, request), json_object)


def json_object(body: bytes) -> dict[str, Any]:
    data = protocol.parse_json(body)
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    return data


def check_model(state: ServerState, model: str) -> None:
    if model != state.served_model_name:
        raise APIError(
            404,
            f"The model `{model}` does not exist; this server serves `{state.served_model_name}`",
            param="model",
            code="model_not_found",
        )


def config_for(
    state: ServerState,
    req: CompletionRequest | ChatRequest,
    max_tokens: int,
    trace: int | None,
) -> GenerationConfig:
    """The server's defaults with the request's options applied (their JSON types checked);
    an APIError naming the field at fault."""
    try:
        given = req.options(max_tokens)
        if trace is not None:
            given["trace"] = trace
        return dataclasses.replace(state.defaults, **given)
    except ConfigError as exc:
        raise to_api_error(exc, state.redact) from None


def seeded(config: GenerationConfig, i: int) -> GenerationConfig:
    """The i-th of n generations: seed + i (unseeded stays unseeded)."""
    if i == 0 or config.seed is None:
        return config
    return dataclasses.replace(config, seed=config.seed + i)


async def counted(
    state: ServerState,
    prompt: str | Chat,
    config: GenerationConfig,
    max_tokens: int,
) -> int:
    """The prompt's tokens, checked against the context. A prompt whose bytes alone cannot fit
    (no base token spells more than the longest's bytes) is refused without tokenizing it; the
    others are tokenized off the event loop."""
    if state.context_length is not None:
        _check_context(state, state.tokens.fewest_tokens(prompt), max_tokens, at_least=True)
    return _check_context(
        state, await state.off_loop(state.tokens.count, prompt, config), max_tokens
    )


def _check_context(
    state: ServerState, prompt_tokens: int, max_tokens: int, *, at_least: bool = False
) -> int:
    limit = state.context_length
    if limit is not None and prompt_tokens + max_tokens > limit:
        some = "at least " if at_least else ""
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens; the request asks for "
            f"{some}{prompt_tokens + max_tokens} ({some}{prompt_tokens} in the prompt, "
            f"{max_tokens} to generate). Shorten the prompt or lower max_tokens.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return prompt_tokens
