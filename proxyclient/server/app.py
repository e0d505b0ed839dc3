"""The routes: an OpenAI-compatible API in front of one ProxyTuner.

    POST /v1/completions        text completions (streaming or not; echo + logprobs scores prompts)
    POST /v1/chat/completions   chat completions (streaming or not)
    GET  /v1/models             the one model served
    GET  /health                liveness, and the generations in flight
    GET  /metrics               Prometheus text
    POST /tokenize, /detokenize, GET /tokenizer_info   the base tokenizer (lm-eval's remote one)

One tuner serves every request; its async API runs on the server's loop, so concurrent requests
share the local models through its batched forwards. Nothing is kept between requests.
"""

from __future__ import annotations

import dataclasses
import functools
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from proxyclient.config import GenerationConfig
from proxyclient.errors import ConfigError, ProxyClientError
from proxyclient.result import Generation
from proxyclient.server import protocol
from proxyclient.server.echo import score_prompt
from proxyclient.server.errors import Redact, redactor, to_api_error
from proxyclient.server.logprobs import CompletionLogprobs, Scored, chat_logprobs
from proxyclient.server.metrics import Metrics, MetricsMiddleware
from proxyclient.server.prompts import PromptTokens
from proxyclient.server.protocol import APIError, ChatRequest, CompletionRequest
from proxyclient.server.runs import Disconnected, End, Job, Piece, Run
from proxyclient.server.served import ServedTuner

logger = logging.getLogger("proxyclient.server")

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


# The largest request body read: larger ones get a 413 before anything is parsed.
DEFAULT_MAX_BODY_BYTES = 8 * 2**20
TOKENIZER_THREADS = 4


@dataclass
class ServerState:
    """What every request reads: the tuner, the request defaults, names, keys and metrics."""

    tuner: ServedTuner
    served_model_name: str
    defaults: GenerationConfig
    api_key: str | None
    context_length: int | None
    metrics: Metrics
    tokens: PromptTokens
    redact: Redact
    created: int
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # Tokenizing runs off the event loop, in a few threads, so that a long prompt holds up no
    # stream (nor, while a thread is free, another prompt).
    tokenizing: anyio.CapacityLimiter = dataclasses.field(
        default_factory=lambda: anyio.CapacityLimiter(TOKENIZER_THREADS)
    )

    async def off_loop(self, work: Callable[..., Any], *args: Any) -> Any:
        return await anyio.to_thread.run_sync(work, *args, limiter=self.tokenizing)


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
) -> FastAPI:
    """The server's ASGI app. ``api_key``: the key clients must send (Bearer); None serves any
    client. ``defaults``: the GenerationConfig a request's fields override. ``max_model_len``:
    the context length requests are checked against (default: the local models' own).
    ``secrets``: strings never to show a client (the base's API key; the transport's is
    redacted anyway). ``close_tuner``: close the tuner when the app shuts down.
    ``max_body_bytes``: larger request bodies are refused with a 413."""
    transport = getattr(tuner.base, "transport", None)
    state = ServerState(
        tuner=tuner,
        served_model_name=served_model_name,
        defaults=defaults if defaults is not None else GenerationConfig(),
        api_key=api_key or None,
        context_length=max_model_len or tuner.context_length,
        metrics=Metrics(),
        tokens=PromptTokens(tuner),
        redact=redactor((*secrets, api_key), *_transport_redact(transport)),
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
    _add_error_handlers(app, state)

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
    async def completions(request: Request) -> Response:
        authorized(request)
        return await _guarded(state, lambda: _completions(state, request))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorized(request)
        return await _guarded(state, lambda: _chat(state, request))

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorized(request)
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "active_generations": state.metrics.active}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        authorized(request)
        body = _json_object(await _body(state, request))
        prompt = body.get("prompt")
        special = body.get("add_special_tokens", True)
        if not isinstance(prompt, str) or not isinstance(special, bool):
            raise APIError(400, "tokenize takes {prompt: string, add_special_tokens?: bool}")
        ids = await state.off_loop(functools.partial(state.tokens.encode, special=special), prompt)
        return {"tokens": ids, "count": len(ids), "max_model_len": state.context_length}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        authorized(request)
        ids = _json_object(await _body(state, request)).get("tokens")
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


# -- completions ------------------------------------------------------------------------------


async def _completions(state: ServerState, request: Request) -> Response:
    req: CompletionRequest = protocol.parse(await _body(state, request), CompletionRequest)
    _check_model(state, req.model)
    prompts = [
        p if isinstance(p, str) else await state.off_loop(state.tokens.text_of, p)
        for p in req.prompts()
    ]
    max_tokens = req.max_tokens if req.max_tokens is not None else state.defaults.max_new_tokens
    trace = req.logprobs
    config = _config(state, req, max(1, max_tokens), trace)
    prompt_tokens = 0
    for p in prompts:
        prompt_tokens += await _counted(state, p, config, max_tokens)
    if req.echo:
        return await _echo(state, request, req, prompts, config, max_tokens, prompt_tokens)
    wrap = _envelope(state, "text_completion", "cmpl")
    jobs = _completion_jobs(prompts, config, req.n)
    run = Run(state.tuner, jobs, state.metrics)
    top = req.logprobs or 0
    if req.stream:
        logprobs = {job.index: CompletionLogprobs(top) for job in jobs}

        def chunk(event: Piece | End) -> dict[str, Any]:
            block = logprobs[event.index].block(event.traces) if req.logprobs is not None else None
            text = event.text if isinstance(event, Piece) else ""
            return wrap([protocol.completion_choice(event.index, text, block, _finish(event))])

        return await _stream(
            state, request, run, "/v1/completions", chunk, wrap, prompt_tokens, req
        )
    ends = await _finished(state, request, run, "/v1/completions")
    choices = []
    for end in ends:
        block = None
        if req.logprobs is not None:
            block = CompletionLogprobs(top).block(end.generation.steps or [])
        finish = protocol.finish_reason(end.generation.finish_reason)
        choices.append(protocol.completion_choice(end.index, end.generation.text, block, finish))
    return JSONResponse(wrap(choices, protocol.usage(prompt_tokens, [e.generation for e in ends])))


async def _echo(
    state: ServerState,
    request: Request,
    req: CompletionRequest,
    prompts: list[str],
    config: GenerationConfig,
    max_tokens: int,
    prompt_tokens: int,
) -> Response:
    """Completions with ``echo``: each choice's text starts with its prompt; with ``logprobs``
    the prompt's tokens come scored (see echo.py), then the generated ones."""
    top = req.logprobs or 0
    raw = req.prompts()
    scores, generations = [], []
    for i, prompt in enumerate(prompts):
        scored = None
        if req.logprobs is not None:
            ids = raw[i] if isinstance(raw[i], list) else state.tokens.encode(prompt)
            score_config = dataclasses.replace(config, trace=max(1, top))
            scored, score = await score_prompt(state.tuner, state.tokens, ids, score_config, top)
            _count_score(state, score)
        scores.append(scored)
    ends: list[End] = []
    if max_tokens > 0:
        run = Run(state.tuner, _completion_jobs(prompts, config, req.n), state.metrics)
        ends = await _finished(state, request, run, "/v1/completions")
    choices = []
    for i, prompt in enumerate(prompts):
        for j in range(req.n):
            index = i * req.n + j
            end = ends[index] if ends else None
            text, finish, traces = prompt, "length", []
            if end is not None:
                generation = end.generation
                generations.append(generation)
                text += generation.text
                finish = protocol.finish_reason(generation.finish_reason) or "stop"
                traces = generation.steps or []
            block = None
            if req.logprobs is not None:
                tail = _eos_entry(state, end.generation) if end is not None else []
                block = CompletionLogprobs(top).block(traces, scores[i] or [], tail)
            choices.append(protocol.completion_choice(index, text, block, finish))
    wrap = _envelope(state, "text_completion", "cmpl")
    return JSONResponse(wrap(choices, protocol.usage(prompt_tokens, generations)))


def _completion_jobs(prompts: list[str], config: GenerationConfig, n: int) -> list[Job]:
    """``n`` jobs a prompt, indexed as OpenAI numbers completions' choices: prompt-major."""
    return [
        Job(i * n + j, prompt, _seeded(config, j))
        for i, prompt in enumerate(prompts)
        for j in range(n)
    ]


# -- chat -------------------------------------------------------------------------------------


async def _chat(state: ServerState, request: Request) -> Response:
    req: ChatRequest = protocol.parse(await _body(state, request), ChatRequest)
    _check_model(state, req.model)
    messages = req.chat()
    max_tokens = req.max_new_tokens or state.defaults.max_new_tokens
    trace = (req.top_logprobs or 0) if req.logprobs else None
    config = _config(state, req, max_tokens, trace)
    prompt_tokens = await _counted(state, messages, config, max_tokens)
    wrap = _envelope(
        state, "chat.completion.chunk" if req.stream else "chat.completion", "chatcmpl"
    )
    jobs = [Job(j, messages, _seeded(config, j)) for j in range(req.n)]
    run = Run(state.tuner, jobs, state.metrics)
    top = req.top_logprobs or 0
    if req.stream:
        roles_sent: set[int] = set()

        def chunk(event: Piece | End) -> dict[str, Any]:
            delta: dict[str, Any] = {}
            if event.index not in roles_sent:
                roles_sent.add(event.index)
                delta["role"] = "assistant"
            if isinstance(event, Piece):
                delta["content"] = event.text
            block = chat_logprobs(event.traces, top) if req.logprobs else None
            return wrap([protocol.chat_chunk_choice(event.index, delta, block, _finish(event))])

        route = "/v1/chat/completions"
        return await _stream(state, request, run, route, chunk, wrap, prompt_tokens, req)
    ends = await _finished(state, request, run, "/v1/chat/completions")
    choices = []
    for end in ends:
        block = chat_logprobs(end.generation.steps or [], top) if req.logprobs else None
        finish = protocol.finish_reason(end.generation.finish_reason)
        choices.append(protocol.chat_choice(end.index, end.generation.text, block, finish))
    return JSONResponse(wrap(choices, protocol.usage(prompt_tokens, [e.generation for e in ends])))


# -- running ----------------------------------------------------------------------------------


async def _finished(state: ServerState, request: Request, run: Run, route: str) -> list[End]:
    """Every choice of ``run``, run to its end; cancelled if the client goes away."""
    run.start()
    try:
        ends = await run.collect(request)
    except BaseException:
        await run.cancel()
        raise
    _observe_first(state, run, route)
    return ends


async def _stream(
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
                        error = _client_error(state, event.error)
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


def _envelope(
    state: ServerState, object_name: str, id_prefix: str
) -> Callable[..., dict[str, Any]]:
    """``wrap(choices, usage=None)``: one request's answer or chunks, under one id and time."""
    rid, created = f"{id_prefix}-{uuid.uuid4().hex}", int(time.time())
    return functools.partial(protocol.envelope, object_name, rid, created, state.served_model_name)


def _finish(event: Piece | End) -> str | None:
    """A chunk's ``finish_reason``: set on a choice's end only."""
    return (
        protocol.finish_reason(event.generation.finish_reason) if isinstance(event, End) else None
    )


def _observe_first(state: ServerState, run: Run, route: str) -> None:
    if run.first_piece_s is not None:
        state.metrics.first_token.labels(route).observe(run.first_piece_s)
        run.first_piece_s = None  # observed once


# -- helpers ----------------------------------------------------------------------------------


async def _guarded(state: ServerState, handle: Callable[[], Awaitable[Response]]) -> Response:
    """Every failure as an OpenAI-shaped error; unforeseen ones logged, without their details
    reaching the client."""
    try:
        return await handle()
    except Disconnected:
        return Response(status_code=499)  # nobody reads it: the client has gone
    except APIError:
        raise
    except Exception as exc:
        raise _client_error(state, exc) from None


def _client_error(state: ServerState, exc: BaseException) -> APIError:
    """What the client is told; a failure proxyclient did not foresee is logged (redacted, no
    traceback: its frames could hold secrets) and reported as a 500 without its details."""
    if not isinstance(exc, ProxyClientError | APIError):
        logger.error("request failed: %s", state.redact(f"{type(exc).__name__}: {exc}"))
    return to_api_error(exc, state.redact)


def _config(
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


def _seeded(config: GenerationConfig, i: int) -> GenerationConfig:
    """The i-th of n generations: seed + i (unseeded stays unseeded)."""
    if i == 0 or config.seed is None:
        return config
    return dataclasses.replace(config, seed=config.seed + i)


def _check_model(state: ServerState, model: str) -> None:
    if model != state.served_model_name:
        raise APIError(
            404,
            f"The model `{model}` does not exist; this server serves `{state.served_model_name}`",
            param="model",
            code="model_not_found",
        )


async def _body(state: ServerState, request: Request) -> bytes:
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


async def _counted(
    state: ServerState,
    prompt: str | list[dict[str, str]],
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


def _count_score(state: ServerState, score: Any) -> None:
    usage = getattr(score, "usage", None)
    if usage is not None:
        state.metrics.base_requests.inc(usage.requests)
        state.metrics.base_prompt_tokens.inc(usage.prompt_tokens)


def _eos_entry(state: ServerState, generation: Generation) -> list[Scored]:
    """An entry for the EOS that ended ``generation``, as vLLM lists it: EOS is no output token
    here, but lm-eval drops the last echoed entry as the generated one and must find one."""
    if generation.finish_reason != "eos":
        return []
    steps = generation.steps or []
    if len(steps) > len(generation.token_ids):  # the tuner traced the EOS step itself
        return []
    eos = state.tokens.info().get("eos_token") or ""
    return [Scored(eos, None)]


def _model_card(state: ServerState) -> dict[str, Any]:
    return {
        "id": state.served_model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "proxyclient",
        "root": _base_name(state.tuner.base) or state.served_model_name,
        "max_model_len": state.context_length,
    }


def _base_name(base: Any) -> str | None:
    for name in ("model", "name"):
        value = getattr(base, name, None)
        if isinstance(value, str):
            return value
    return None


def _transport_redact(transport: Any) -> tuple[Redact, ...]:
    redact = getattr(transport, "redact", None)
    return (redact,) if callable(redact) else ()


def _json_object(body: bytes) -> dict[str, Any]:
    data = protocol.parse_json(body)
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    return data


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _add_error_handlers(app: FastAPI, state: ServerState) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        exc.message = state.redact(exc.message)
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        body = protocol.error_body(str(exc.detail), "invalid_request_error", None, kind)
        return JSONResponse(body, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unexpected error: %s", state.redact(f"{type(exc).__name__}: {exc}"))
        body = protocol.error_body("internal server error", "server_error")
        return JSONResponse(body, status_code=500)
