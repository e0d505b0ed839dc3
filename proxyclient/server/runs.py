"""The generations of one request, running as tasks on the server's loop.

Each choice (a prompt, an index, a GenerationConfig) iterates ``tuner.astream`` in its own task
and reports to one queue: ``Piece`` (text, and the new tokens' traces when logprobs were asked
for) and ``End`` (the Generation, and the error that ended it, if one did). Concurrent choices, of
this request and of others, share the local models through the tuner's batched forwards.
Cancelling a run (the client went away) cancels its tasks: each stream closes, which frees its
sequence's KV caches, and the metrics count it as cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from proxyclient.chat import Chat
from proxyclient.config import GenerationConfig
from proxyclient.errors import ProxyClientError
from proxyclient.result import Generation
from proxyclient.server.metrics import Metrics
from proxyclient.server.served import ServedTuner

# How often a request whose response has not started checks that its client is still there.
DISCONNECT_POLL_S = 0.25


@dataclass(frozen=True)
class Job:
    """One choice: what to generate from, under which config, at which index of the answer."""

    index: int
    prompt: str | Chat
    config: GenerationConfig


@dataclass(frozen=True)
class Piece:
    index: int
    text: str
    traces: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class End:
    index: int
    generation: Generation
    traces: list[Any] = field(default_factory=list)  # traced tokens not sent with a piece yet
    error: BaseException | None = None


class Disconnected(Exception):
    """The client went away before its response started."""


class Run:
    """The choices of one request. Streams are created at once, so a bad option fails the
    request (400) before anything runs; ``start`` launches them."""

    def __init__(self, tuner: ServedTuner, jobs: list[Job], metrics: Metrics) -> None:
        self.metrics = metrics
        self.jobs = jobs
        self.streams = [tuner.astream(job.prompt, job.config) for job in jobs]
        self.queue: asyncio.Queue[Piece | End] = asyncio.Queue()
        self.tasks: list[asyncio.Task[None]] = []
        self.started = time.perf_counter()
        self.first_piece_s: float | None = None
        self.open = len(jobs)
        self._get: asyncio.Task[Piece | End] | None = None
        self._checked = time.monotonic()  # when the client was last seen connected

    def start(self) -> Run:
        self.tasks = [
            asyncio.create_task(self._one(job, stream))
            for job, stream in zip(self.jobs, self.streams, strict=True)
        ]
        return self

    async def _one(self, job: Job, stream: Any) -> None:
        traced = job.config.trace is not None
        sent, outcome = 0, "cancelled"
        self.metrics.generation_started()
        try:
            error: BaseException | None = None
            try:
                async for text in stream:
                    if self.first_piece_s is None:
                        self.first_piece_s = time.perf_counter() - self.started
                    traces = (stream.generation.steps or [])[sent:] if traced else []
                    sent += len(traces)
                    self.queue.put_nowait(Piece(job.index, text, traces))
                outcome = "finished"
            except ProxyClientError as exc:
                outcome, error = "error", exc
            except Exception as exc:  # a bug: the app logs it (redacted), the client gets a 500
                outcome, error = "error", exc
            generation = stream.generation
            rest = (generation.steps or [])[sent:] if traced else []
            self.queue.put_nowait(End(job.index, generation, rest, error))
        finally:
            with contextlib.suppress(Exception):
                await stream.aclose()
            self.metrics.generation_ended(outcome, stream.generation)

    async def next(self, request: Request | None = None) -> Piece | End:
        """The next event; with ``request``, Disconnected when its client goes away first."""
        if self._get is None:
            self._get = asyncio.ensure_future(self.queue.get())
        while True:
            if request is not None and time.monotonic() - self._checked >= DISCONNECT_POLL_S:
                self._checked = time.monotonic()
                if await request.is_disconnected():
                    raise Disconnected
            done, _ = await asyncio.wait(
                {self._get}, timeout=DISCONNECT_POLL_S if request is not None else None
            )
            if done:
                event, self._get = self._get.result(), None
                if isinstance(event, End):
                    self.open -= 1
                return event

    async def collect(self, request: Request) -> list[End]:
        """Every choice's end, in index order; the first error is raised (the rest cancelled)."""
        ends: dict[int, End] = {}
        while self.open:
            event = await self.next(request)
            if isinstance(event, End):
                if event.error is not None:
                    raise event.error
                ends[event.index] = event
        return [ends[i] for i in sorted(ends)]

    async def cancel(self) -> None:
        """Stop every choice still running and wait until each has released its caches."""
        if self._get is not None:
            self._get.cancel()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
