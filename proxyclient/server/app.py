"""The routes: an OpenAI-compatible API in front of one ProxyTuner.

    POST /v1/completions        text completions (streaming or not; echo + logprobs scores prompts)
    POST /v1/chat/completions   chat completions (streaming or not)
    GET  /v1/models             the one model served
    GET  /health                liveness, and the generations in flight
    GET  /metrics               Prometheus text
    GET  /                      the playground (playground.py), unless created without it
    POST /tokenize, /detokenize, GET /tokenizer_info   the base tokenizer (lm-eval's remote one)

One tuner serves every request; its async API runs on the server's loop, so concurrent requests
share the local models through its batched forwards. Nothing is kept between requests.
"""

from __future__ import annotations

import functools
import hmac
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response

from proxyclient.config import GenerationConfig
from proxyclient.server.chat_completions import chat_completions
from proxyclient.server.completions import completions
from proxyclient.server.errors import redactor
from proxyclient.server.failures import add_error_handlers, guarded
from proxyclient.server.intake import read_json_object
from proxyclient.server.metrics import Metrics, MetricsMiddleware
from proxyclient.server.prompts import PromptTokens
from proxyclient.server.protocol import APIError
from proxyclient.server.served import ServedTuner
from proxyclient.server.state import DEFAULT_MAX_BODY_BYTES, ServerState

ROUTES = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models",
    "/health",
    "/metrics",
    "/tokenize",
    "/detokenize",
    "/tokenizer_info",
)


def create_app(
    tuner: ServedTuner,
    *,
    served_model_name: str,
    api_key: str | None = None,
    defaults: GenerationConfig | None = None,
    max_model_len: int | None = None,
    secrets: tuple[str | None, ...] = (),
    close_tuner: bool = False,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    playground: bool = True,
) -> FastAPI:
    """The server's ASGI app. ``api_key``: the key clients must send (Bearer); None serves any
    client. ``defaults``: the GenerationConfig a request's fields override. ``max_model_len``:
    the context length requests are checked against (default: the local models' own).
    ``secrets``: strings never to show a client (the base's API key; the tuner redacts its
    base's own anyway). ``close_tuner``: close the tuner when the app shuts down.
    ``max_body_bytes``: larger request bodies are refused with a 413. ``playground``: answer
    ``GET /`` with the playground page (it holds no secret; its API calls need the key)."""
    state = ServerState(
        tuner=tuner,
        served_model_name=served_model_name,
        defaults=defaults if defaults is not None else GenerationConfig(),
        api_key=api_key or None,
        context_length=max_model_len or tuner.context_length,
        metrics=Metrics(),
        tokens=PromptTokens(tuner),
        redact=redactor((*secrets, api_key), tuner.redact),
        created=int(time.time()),
        max_body_bytes=max_body_bytes,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if close_tuner:
            await tuner.aclose()

    app = FastAPI(title="proxyclient", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = state
    app.add_middleware(MetricsMiddleware, metrics=state.metrics, routes=ROUTES)
    add_error_handlers(app, state)

    def authorized(request: Request) -> None:
        if state.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip(), state.api_key):
            raise APIError(
                401,
                "missing or wrong API key: send it as 'Authorization: Bearer KEY'",
                type="authentication_error",
                code="invalid_api_key",
            )

    @app.post("/v1/completions")
    async def completions_route(request: Request) -> Response:
        authorized(request)
        return await guarded(state, lambda: completions(state, request))

    @app.post("/v1/chat/completions")
    async def chat_completions_route(request: Request) -> Response:
        authorized(request)
        return await guarded(state, lambda: chat_completions(state, request))

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorized(request)
        return {"object": "list", "data": [_model_card(state)]}

    if playground:
        from proxyclient.server.playground import page

        # Built once: the page depends on the server's settings only.
        playground_page = page(
            model=state.served_model_name,
            needs_key=state.api_key is not None,
            defaults=state.defaults,
        )

        @app.get("/")
        async def playground_route() -> Response:
            return HTMLResponse(playground_page, headers=_PAGE_HEADERS)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "active_generations": state.metrics.active}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        authorized(request)
        body = await read_json_object(state, request)
        prompt = body.get("prompt")
        special = body.get("add_special_tokens", True)
        if not isinstance(prompt, str) or not isinstance(special, bool):
            raise APIError(400, "tokenize takes {prompt: string, add_special_tokens?: bool}")
        ids = await state.off_loop(functools.partial(state.tokens.encode, special=special), prompt)
        return {"tokens": ids, "count": len(ids), "max_model_len": state.context_length}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        authorized(request)
        ids = (await read_json_object(state, request)).get("tokens")
        if not isinstance(ids, list) or not all(_is_int(t) for t in ids):
            raise APIError(400, "detokenize takes {tokens: [int, ...]}", param="tokens")
        if any(not 0 <= t < state.tokens.vocab_size for t in ids):
            raise APIError(400, "tokens: an id is outside the base's vocabulary", param="tokens")
        return {"prompt": state.tokens.decode(ids)}

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request) -> dict[str, Any]:
        authorized(request)
        return state.tokens.info()

    return app


# The page runs only its own inline scripts and talks only to this server.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
    "style-src 'unsafe-inline'; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}


def _model_card(state: ServerState) -> dict[str, Any]:
    return {
        "id": state.served_model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "proxyclient",
        "root": state.tuner.base_name or state.served_model_name,
        "max_model_len": state.context_length,
    }


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
