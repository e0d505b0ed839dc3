"""``POST /v1/chat/completions``: chat completions, streamed (OpenAI's deltas, the role first)
or not, with ``logprobs``/``top_logprobs`` in the chat shape."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from proxyclient.server import protocol
from proxyclient.server.intake import check_model, config_for, counted, read_request, seeded
from proxyclient.server.logprobs import chat_logprobs
from proxyclient.server.protocol import ChatRequest
from proxyclient.server.runs import End, Job, Piece, Run
from proxyclient.server.state import ServerState
from proxyclient.server.streaming import envelope, finish, finished, stream

ROUTE = "/v1/chat/completions"


async def chat_completions(state: ServerState, request: Request) -> Response:
    req: ChatRequest = await read_request(state, request, ChatRequest)
    check_model(state, req.model)
    messages = req.chat()
    max_tokens = req.max_new_tokens or state.defaults.max_new_tokens
    trace = (req.top_logprobs or 0) if req.logprobs else None
    config = config_for(state, req, max_tokens, trace)
    prompt_tokens = await counted(state, messages, config, max_tokens)
    wrap = envelope(state, "chat.completion.chunk" if req.stream else "chat.completion", "chatcmpl")
    jobs = [Job(j, messages, seeded(config, j)) for j in range(req.n)]
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
            return wrap([protocol.chat_chunk_choice(event.index, delta, block, finish(event))])

        return await stream(state, request, run, ROUTE, chunk, wrap, prompt_tokens, req)
    ends = await finished(state, request, run, ROUTE)
    choices = []
    for end in ends:
        block = chat_logprobs(end.generation.steps or [], top) if req.logprobs else None
        reason = protocol.finish_reason(end.generation.finish_reason)
        choices.append(protocol.chat_choice(end.index, end.generation.text, block, reason))
    return JSONResponse(wrap(choices, protocol.usage(prompt_tokens, [e.generation for e in ends])))
