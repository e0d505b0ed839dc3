"""Answering from a Run: all its choices at once (``finished``), or as server-sent events
(``stream``: OpenAI's chunks, an error event, the usage chunk, ``[DONE]``); the envelope every
answer and chunk goes in, and the time-to-first-token metric."""

from __future__ import annotations

import functools
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import Response
from sse_starlette import EventSourceResponse

from proxyclient.result import Generation
from proxyclient.server import protocol
from proxyclient.server.failures import client_error
from proxyclient.server.runs import End, Piece, Run
from proxyclient.server.state import ServerState


async def finished(state: ServerState, request: Request, run: Run, route: str) -> list[End]:
    """Every choice of ``run``, run to its end; cancelled if the client goes away."""
    run.start()
    try:
        ends = await run.collect(request)
    except BaseException:
        await run.cancel()
        raise
    _observe_first(state, run, route)
    return ends


async def stream(
    state: ServerState,
    request: Request,
    run: Run,
    route: str,
    chunk: Callable[[Piece | End], dict[str, Any]],
    wrap: Callable[..., dict[str, Any]],
    prompt_tokens: int,
    req: Any,
) -> Response:
    """Server-sent events: a chunk per piece and per choice's end, an error event if one
    fails, the usage chunk (``wrap``ped, no choices) if asked for, then ``data: [DONE]``. The
    first event is awaited before the response starts, so a request that fails at once gets its
    HTTP error status."""
    run.start()
    try:
        first = await run.next(request)
    except BaseException:
        await run.cancel()
        raise
    if isinstance(first, End) and first.error is not None:
        await run.cancel()
        raise first.error

    async def events() -> AsyncIterator[dict[str, str]]:
        generations: list[Generation] = []
        event: Piece | End | None = first
        try:
            while event is not None:
                if isinstance(event, End):
                    if event.error is not None:
                        error = client_error(state, event.error)
                        yield {"data": json.dumps(error.body())}
                        break
                    generations.append(event.generation)
                yield {"data": json.dumps(chunk(event), ensure_ascii=False)}
                event = await run.next() if run.open else None
            else:
                if req.include_usage:
                    usage = protocol.usage(prompt_tokens, generations)
                    yield {"data": json.dumps(wrap([], usage))}
            _observe_first(state, run, route)
            yield {"data": "[DONE]"}
        finally:
            with anyio.CancelScope(shield=True):
                await run.cancel()

    return EventSourceResponse(events(), ping=15)


def envelope(state: ServerState, object_name: str, id_prefix: str) -> Callable[..., dict[str, Any]]:
    """``wrap(choices, usage=None)``: one request's answer or chunks, under one id and time."""
    rid, created = f"{id_prefix}-{uuid.uuid4().hex}", int(time.time())
    return functools.partial(protocol.envelope, object_name, rid, created, state.served_model_name)


def finish(event: Piece | End) -> str | None:
    """A chunk's ``finish_reason``: set on a choice's end only."""
    return (
        protocol.finish_reason(event.generation.finish_reason) if isinstance(event, End) else None
    )


def _observe_first(state: ServerState, run: Run, route: str) -> None:
    if run.first_piece_s is not None:
        state.metrics.first_token.labels(route).observe(run.first_piece_s)
        run.first_piece_s = None  # observed once
