"""``POST /v1/completions``: text completions, streamed or not, and ``echo`` (the prompt first
in each choice; with ``logprobs`` its tokens scored, as lm-eval's loglikelihood requests ask)."""

from __future__ import annotations

import dataclasses
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from proxyclient.config import GenerationConfig
from proxyclient.result import Generation
from proxyclient.server import protocol
from proxyclient.server.echo import score_prompt
from proxyclient.server.intake import check_model, config_for, counted, read_request, seeded
from proxyclient.server.logprobs import CompletionLogprobs, Scored
from proxyclient.server.protocol import CompletionRequest
from proxyclient.server.runs import End, Job, Piece, Run
from proxyclient.server.state import ServerState
from proxyclient.server.streaming import envelope, finish, finished, stream

ROUTE = "/v1/completions"


async def completions(state: ServerState, request: Request) -> Response:
    req: CompletionRequest = await read_request(state, request, CompletionRequest)
    check_model(state, req.model)
    prompts = [
        p if isinstance(p, str) else await state.off_loop(state.tokens.text_of, p)
        for p in req.prompts()
    ]
    max_tokens = req.max_tokens if req.max_tokens is not None else state.defaults.max_new_tokens
    config = config_for(state, req, max(1, max_tokens), req.logprobs)
    prompt_tokens = 0
    for p in prompts:
        prompt_tokens += await counted(state, p, config, max_tokens)
    if req.echo:
        return await _echo(state, request, req, prompts, config, max_tokens, prompt_tokens)
    wrap = envelope(state, "text_completion", "cmpl")
    jobs = _jobs(prompts, config, req.n)
    run = Run(state.tuner, jobs, state.metrics)
    top = req.logprobs or 0
    if req.stream:
        logprobs = {job.index: CompletionLogprobs(top) for job in jobs}

        def chunk(event: Piece | End) -> dict[str, Any]:
            block = logprobs[event.index].block(event.traces) if req.logprobs is not None else None
            text = event.text if isinstance(event, Piece) else ""
            return wrap([protocol.completion_choice(event.index, text, block, finish(event))])

        return await stream(state, request, run, ROUTE, chunk, wrap, prompt_tokens, req)
    ends = await finished(state, request, run, ROUTE)
    choices = []
    for end in ends:
        block = None
        if req.logprobs is not None:
            block = CompletionLogprobs(top).block(end.generation.steps or [])
        reason = protocol.finish_reason(end.generation.finish_reason)
        choices.append(protocol.completion_choice(end.index, end.generation.text, block, reason))
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
        run = Run(state.tuner, _jobs(prompts, config, req.n), state.metrics)
        ends = await finished(state, request, run, ROUTE)
    choices = []
    for i, prompt in enumerate(prompts):
        for j in range(req.n):
            index = i * req.n + j
            end = ends[index] if ends else None
            text, reason, traces = prompt, "length", []
            if end is not None:
                generation = end.generation
                generations.append(generation)
                text += generation.text
                reason = protocol.finish_reason(generation.finish_reason) or "stop"
                traces = generation.steps or []
            block = None
            if req.logprobs is not None:
                tail = _eos_entry(state, end.generation) if end is not None else []
                block = CompletionLogprobs(top).block(traces, scores[i] or [], tail)
            choices.append(protocol.completion_choice(index, text, block, reason))
    wrap = envelope(state, "text_completion", "cmpl")
    return JSONResponse(wrap(choices, protocol.usage(prompt_tokens, generations)))


def _jobs(prompts: list[str], config: GenerationConfig, n: int) -> list[Job]:
    """``n`` jobs a prompt, indexed as OpenAI numbers completions' choices: prompt-major."""
    return [
        Job(i * n + j, prompt, seeded(config, j))
        for i, prompt in enumerate(prompts)
        for j in range(n)
    ]


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
