"""A base model served in-process from a local transformers model, in the BaseModel protocol:
for unit tests of the loop without a server. Integration tests use a real vLLM server.

``drafts=True`` adds what speculation needs: ``generate`` (several tokens per request, greedy or
sampled at temperature 1, with the top-k before each), ``stream_draft`` (the same, one position at
a time as a stream delivers them) and ``score`` (the top-k before each token of a continuation and
after it), as vLLM's completions answer them. ``break_stream`` = (request, positions): that
request's stream drops its connection after that many positions.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import torch

from proxyclient.adapters.base import (
    Capabilities,
    Continuation,
    Prompt,
    StreamedPosition,
    TopLogprobs,
)
from proxyclient.errors import APIConnectionError, ServerError


class LocalBase:
    tokenizer = None

    def __init__(
        self,
        model,
        *,
        fail_at_request: int | None = None,
        drafts: bool = False,
        streams: bool | None = None,
        break_stream: tuple[int, int] | None = None,
    ) -> None:
        self.model = model
        self.name = "local-base"
        self.capabilities = Capabilities(
            max_k=-1,
            token_id_prompts=True,
            ids_in_response=True,
            prompt_scoring=drafts,
            logprobs="raw",
            drafts=drafts,
            streams=drafts if streams is None else streams,
        )
        self.requests: list[list[int]] = []
        self.fail_at_request = fail_at_request
        self.break_stream = break_stream
        self.streamed: list[int] = []  # positions each stream delivered before it was closed
        self.closed_early: list[bool] = []  # each stream: closed before its last position
        self.asked: list[int] = []  # each stream's n
        self.open_streams = 0

    def _ask(self, prompt_ids: list[int]) -> None:
        self.requests.append(prompt_ids)
        if self.fail_at_request is not None and len(self.requests) == self.fail_at_request:
            raise ServerError("HTTP 503: injected fault", status_code=503, body=None)

    @torch.inference_mode()
    def _logprobs(self, ids: list[int]) -> torch.Tensor:
        """[len(ids), V]: the next-token log-probs after each prefix of ``ids``."""
        logits = self.model(input_ids=torch.tensor([ids])).logits[0].double()
        return torch.log_softmax(logits, dim=-1)

    async def top_logprobs(self, prompt: Prompt, k: int) -> TopLogprobs:
        self._ask(list(prompt.ids))
        return _top(self._logprobs(list(prompt.ids))[-1], k)

    async def generate(
        self, prompt: Prompt, k: int, n: int, *, greedy: bool, seed: int | None = None
    ) -> Continuation:
        ids = list(prompt.ids)
        self._ask(list(ids))  # a copy: ids grows below
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        tokens, tops, own = [], [], []
        for _ in range(n):
            logprobs = self._logprobs(ids)[-1]
            if greedy:
                token = int(torch.argmax(logprobs))
            else:
                token = int(torch.multinomial(logprobs.exp(), 1, generator=generator))
            tokens.append(token)
            tops.append(_top(logprobs, k))
            own.append(float(logprobs[token]))
            ids.append(token)
        return Continuation(tuple(tokens), tuple(tops), tuple(own))

    async def stream_draft(
        self, prompt: Prompt, k: int, n: int, *, greedy: bool, seed: int | None = None
    ) -> AsyncIterator[StreamedPosition]:
        ids = list(prompt.ids)
        self._ask(list(ids))  # a copy: ids grows below
        request = len(self.requests)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.streamed.append(0)
        self.closed_early.append(True)
        self.asked.append(n)
        self.open_streams += 1
        try:
            async for position in self._stream(ids, request, k, n, greedy, generator):
                yield position
        finally:
            self.open_streams -= 1

    async def _stream(self, ids, request, k, n, greedy, generator):
        for position in range(n):
            if self.break_stream is not None and self.break_stream == (request, position):
                raise APIConnectionError("injected: the stream dropped its connection")
            logprobs = self._logprobs(ids)[-1]
            if greedy:
                token = int(torch.argmax(logprobs))
            else:
                token = int(torch.multinomial(logprobs.exp(), 1, generator=generator))
            self.streamed[-1] += 1
            yield StreamedPosition(token, float(logprobs[token]), _top(logprobs, k))
            ids.append(token)
            await asyncio.sleep(0)  # a network between positions: the verifier runs meanwhile
        self.closed_early[-1] = False

    async def score(self, prompt: Prompt, continuation, k: int) -> Continuation:
        ids = [*prompt.ids, *continuation]
        self._ask(list(ids))  # a copy: ids grows below
        rows = self._logprobs(ids)[len(prompt.ids) - 1 :]  # before each continuation token, after
        after = int(torch.argmax(rows[-1]))
        tokens = (*continuation, after)
        tops = tuple(_top(row, k) for row in rows)
        own = tuple(float(row[t]) for row, t in zip(rows, tokens, strict=True))
        return Continuation(tokens, tops, own)

    async def aclose(self) -> None:
        pass


def _top(logprobs: torch.Tensor, k: int) -> TopLogprobs:
    top = torch.topk(logprobs, logprobs.numel() if k == -1 else k)
    return TopLogprobs(
        token_ids=tuple(top.indices.tolist()),
        logprobs=tuple(top.values.tolist()),
        complete=k == -1,
    )
