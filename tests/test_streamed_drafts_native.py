"""Streamed drafts in the native dialects. llama.cpp: events captured from llama-server
(tests/fixtures/llamacpp/stream_*.sse, with stream_requests.json: what was sent), over
httpx.MockTransport. TGI, SGLang and Ollama: their fixture servers (tests/support), sending each
event as it is made (hosted.StreamingServer). For each: the positions read one event at a time
are the unstreamed draft's, a stream that breaks mid-way gives what came then a connection
error, closing a stream early closes the connection (the server stops generating), a refused
stream is explained like any request, and a generation with speculate="stream" equals
speculate="off" token for token, over a broken stream too. The real llama-server's checks are in
tests/test_integration_llamacpp.py."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxyclient import GenerationConfig, ProxyTuner, connect
from proxyclient.adapters.base import Continuation, Prompt
from proxyclient.errors import APIConnectionError, ContextLengthError, TopKTooLargeError
from proxyclient.tokenizer import BaseTokenizer
from tests.support import dialect_ollama, dialect_sglang  # noqa: F401  (registers the dialects)
from tests.support.hosted import StreamingServer

LLAMACPP = Path(__file__).parent / "fixtures" / "llamacpp"
IDS = (0, 321, 530, 264, 827)  # "def main():" in the tiny tokenizer, BOS first
PROMPT = Prompt(IDS, len(IDS))
FIXTURE_APIS = ["tgi", "sglang", "ollama"]
K = {"tgi": 5, "sglang": 20, "ollama": 20}  # each server's default cap (TGI's: 5)
LONG = 400  # tokens asked of a stream that is closed after one


async def read(stream: Any, stop_after: int | None = None) -> list:
    """The positions of ``stream``; closed after ``stop_after`` of them, if given."""
    got = []
    try:
        async for position in stream:
            got.append(position)
            if stop_after is not None and len(got) == stop_after:
                break
    finally:
        await stream.aclose()
    return got


def same_positions(streamed: list, draft: Any, tolerance: float = 0.0) -> None:
    assert [p.token for p in streamed] == list(draft.tokens)
    for position, top, logprob in zip(streamed, draft.tops, draft.token_logprobs, strict=True):
        assert position.top.token_ids == top.token_ids
        assert position.top.logprobs == pytest.approx(top.logprobs, abs=tolerance)
        assert position.logprob == pytest.approx(logprob, abs=tolerance)
        assert position.top.retokenized == top.retokenized


# -- llama.cpp: captured events -----------------------------------------------------------------


def captured(name: str) -> bytes:
    return (LLAMACPP / name).read_bytes()


class Events(httpx.AsyncByteStream):
    """A captured answer, one event at a time; optionally dropping the connection after
    ``break_after`` events, or repeating the token events (a long generation). ``closed``:
    whether the client closed it."""

    def __init__(self, raw: bytes, break_after: int | None = None, repeat: int = 1) -> None:
        self.events = [e for e in raw.split(b"\n\n") if e.strip()]
        self.break_after = break_after
        self.repeat = repeat
        self.closed = False
        self.sent = 0

    async def __aiter__(self):
        tokens, last = self.events[:-1], self.events[-1:]
        for event in tokens * self.repeat + last:
            if self.break_after is not None and self.sent == self.break_after:
                raise httpx.ReadError("connection reset by peer")
            self.sent += 1
            yield event + b"\n\n"
            await asyncio.sleep(0.001 if self.repeat > 1 else 0)

    async def aclose(self) -> None:
        self.closed = True


def llamacpp(events: Events, seen: list | None = None, error: dict | None = None):
    def handler(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(json.loads(request.content))
        if error is not None:
            return httpx.Response(error["status"], json=error["body"])
        return httpx.Response(200, stream=events, headers={"content-type": "text/event-stream"})

    return connect(
        "llamacpp", "http://llama.test", "tiny-base", transport=httpx.MockTransport(handler)
    )


def unstreamed(name: str, k: int) -> Continuation:
    body = json.loads(captured(name))
    return connect("llamacpp", "http://llama.test", "tiny-base").parse_generate(body, PROMPT, k)


def first(draft: Continuation, n: int) -> Continuation:
    return Continuation(draft.tokens[:n], draft.tops[:n], draft.token_logprobs[:n])


def test_llamacpp_streamed_events_are_the_unstreamed_positions():
    seen: list = []
    base = llamacpp(Events(captured("stream_greedy_k3_n6.sse")), seen)
    got = asyncio.run(read(base.stream_draft(PROMPT, 3, 6, greedy=True)))
    asyncio.run(base.aclose())
    sent = json.loads(captured("stream_requests.json"))["stream_greedy_k3_n6.sse"]["json"]
    assert seen == [sent] and sent["stream"] is True and sent["n_predict"] == 6
    # The same request unstreamed (another run of the same server: logprobs within 1e-5).
    same_positions(got, unstreamed("generate_greedy_k3_n6.json", 3), tolerance=1e-5)
    assert [p.token for p in got] == [729, 729, 729, 729, 729, 411]


def test_llamacpp_a_held_back_token_ends_the_stream_before_it():
    # Seed 12 samples token 127, an incomplete character: llama-server sends no event for it,
    # and the next event (330) says tokens_predicted 7 after 5 positions.
    seen: list = []
    base = llamacpp(Events(captured("stream_sampled_held_back.sse")), seen)
    got = asyncio.run(read(base.stream_draft(PROMPT, 3, 8, greedy=False, seed=12)))
    asyncio.run(base.aclose())
    assert (
        seen[0]
        == json.loads(captured("stream_requests.json"))["stream_sampled_held_back.sse"]["json"]
    )
    expected = unstreamed("generate_sampled_held_back.json", 3)
    assert [p.token for p in got] == [629, 753, 236, 649, 649] == list(expected.tokens)
    same_positions(got, expected, tolerance=1e-5)


def test_llamacpp_a_stream_that_breaks_gives_what_came_then_a_connection_error():
    base = llamacpp(Events(captured("stream_greedy_k3_n6.sse"), break_after=2))
    got = []

    async def run():
        async for position in base.stream_draft(PROMPT, 3, 6, greedy=True):
            got.append(position)

    with pytest.raises(APIConnectionError, match="the stream broke"):
        asyncio.run(run())
    asyncio.run(base.aclose())
    assert [p.token for p in got] == [729, 729]


def test_llamacpp_closing_a_stream_early_closes_the_connection():
    events = Events(captured("stream_greedy_k3_n6.sse"), repeat=100)
    base = llamacpp(events)
    got = asyncio.run(read(base.stream_draft(PROMPT, 3, 600, greedy=True), stop_after=1))
    deadline = time.monotonic() + 5
    while not events.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    asyncio.run(base.aclose())
    assert len(got) == 1 and events.closed and events.sent < 600


def test_llamacpp_a_refused_stream_is_explained_like_any_request():
    error = json.loads(captured("error_prompt_too_long.json"))
    base = llamacpp(Events(b""), error=error)
    with pytest.raises(ContextLengthError, match="exceeds the available context size"):
        asyncio.run(read(base.stream_draft(PROMPT, 3, 6, greedy=True)))
    asyncio.run(base.aclose())


def test_llamacpp_an_error_event_is_explained_like_an_error_answer():
    event = {"error": {"code": 400, "message": "request (2100 tokens) exceeds the available "
                       "context size (2048 tokens), try increasing it"}}  # fmt: skip
    base = llamacpp(Events(b"data: " + json.dumps(event).encode() + b"\n\n"))
    with pytest.raises(ContextLengthError) as info:
        asyncio.run(read(base.stream_draft(PROMPT, 3, 6, greedy=True)))
    asyncio.run(base.aclose())
    assert info.value.status_code == 400


# -- TGI, SGLang, Ollama: fixture servers -------------------------------------------------------


@pytest.fixture(scope="module")
def servers(tiny_models):
    running = {api: StreamingServer(api, tiny_models["base"]).start() for api in FIXTURE_APIS}
    yield running
    for server in running.values():
        server.stop()


@pytest.fixture(scope="module")
def base_tokenizer(hf_models):
    return BaseTokenizer(hf_models["tokenizer"])


def base_for(api: str, servers: dict, base_tokenizer: BaseTokenizer) -> Any:
    return connect(api, servers[api].base_url, "tiny-base", tokenizer=base_tokenizer)


@pytest.mark.parametrize("api", FIXTURE_APIS)
@pytest.mark.parametrize("greedy", [True, False])
def test_streamed_positions_are_the_unstreamed_draft(servers, base_tokenizer, api, greedy):
    server, base, k = servers[api], base_for(api, servers, base_tokenizer), K[api]

    async def run():
        try:
            got = await read(base.stream_draft(PROMPT, k, 8, greedy=greedy, seed=3))
            path, body = server.requests[-1][0], server.requests[-1][2]
            draft = await base.generate(PROMPT, k, 8, greedy=greedy, seed=3)
            return got, path, body, draft
        finally:
            await base.aclose()

    before = len(server.streams)
    got, path, body, draft = asyncio.run(run())
    assert len(got) == 8 and len(draft) == 8
    same_positions(got, draft)
    assert all(len(p.top) + p.top.unresolved == k for p in got)  # Ollama: U+FFFD unmapped
    assert path == "/generate_stream" if api == "tgi" else body["stream"] is True
    ended = server.wait_for_streams(before + 1)[before:]
    assert [r.ended for r in ended] == ["done"]


@pytest.mark.parametrize("api", FIXTURE_APIS)
def test_a_stream_that_breaks_gives_what_came_then_a_connection_error(servers, base_tokenizer, api):
    server, base, k = servers[api], base_for(api, servers, base_tokenizer), K[api]
    got: list = []

    async def run():
        try:
            async for position in base.stream_draft(PROMPT, k, 8, greedy=True):
                got.append(position)
        finally:
            await base.aclose()

    async def unbroken():
        try:
            return await base.generate(PROMPT, k, 8, greedy=True)
        finally:
            await base.aclose()

    before = len(server.streams)
    server.break_next_stream(after=3)
    with pytest.raises(APIConnectionError, match="the stream broke"):
        asyncio.run(run())
    draft = asyncio.run(unbroken())
    assert len(got) == 3
    same_positions(got, first(draft, 3))
    assert [r.ended for r in server.wait_for_streams(before + 1)[before:]] == ["broken"]


@pytest.mark.parametrize("api", FIXTURE_APIS)
def test_closing_a_stream_early_stops_the_server_generating(servers, base_tokenizer, api):
    server, base = servers[api], base_for(api, servers, base_tokenizer)
    before = len(server.streams)

    async def run():
        try:
            return await read(base.stream_draft(PROMPT, K[api], LONG, greedy=True), stop_after=1)
        finally:
            await base.aclose()

    assert len(asyncio.run(run())) == 1
    # The server writes events until one fails; it decodes each only after the last went out.
    record = server.wait_for_streams(before + 1)[before]
    assert record.ended == "closed" and record.sent < LONG, record


def test_tgi_a_refused_stream_is_explained_like_any_request(servers, base_tokenizer):
    base = base_for("tgi", servers, base_tokenizer)
    with pytest.raises(TopKTooLargeError, match="top_n_tokens") as info:
        asyncio.run(read(base.stream_draft(PROMPT, 6, 4, greedy=True)))
    asyncio.run(base.aclose())
    # TGI refuses inside the 200 stream, as the event {"error", "error_type": "validation"}.
    assert info.value.server_max == 5 and info.value.status_code == 422


def test_sglang_a_refused_stream_is_explained_like_any_request(servers, base_tokenizer):
    base = base_for("sglang", servers, base_tokenizer)
    with pytest.raises(ContextLengthError, match="maximum context length") as info:
        asyncio.run(read(base.stream_draft(PROMPT, 5, 4000, greedy=True)))
    asyncio.run(base.aclose())
    # SGLang checks the request as it runs it: the refusal is an event of the 200 stream.
    assert info.value.status_code == 400 and info.value.body["error"]["message"]


def test_ollama_a_refused_stream_is_explained_like_any_request(servers, base_tokenizer):
    base = base_for("ollama", servers, base_tokenizer)
    with pytest.raises(TopKTooLargeError, match="between 0 and 20") as info:
        asyncio.run(read(base.stream_draft(PROMPT, 21, 4, greedy=True)))
    asyncio.run(base.aclose())
    assert info.value.server_max == 20 and info.value.status_code == 400


def test_sglang_reads_incremental_streaming_output(servers, base_tokenizer):
    """SGLang's default streams every position so far in each event; with
    --incremental-streaming-output only the new ones. Both read as the same positions."""
    base = base_for("sglang", servers, base_tokenizer)
    _, body = base.build_generate(PROMPT, 4, 5, greedy=True, seed=None)
    answer = httpx.post(servers["sglang"].base_url + "/generate", json=body | {"stream": True})
    lines = answer.text.splitlines()
    events = [json.loads(line[len("data: ") :]) for line in lines if line.startswith("data: {")]
    assert len(events) == 5
    keys = ("output_token_logprobs", "output_top_logprobs")
    incremental = [
        e | {"meta_info": e["meta_info"] | {key: e["meta_info"][key][i:] for key in keys}}
        for i, e in enumerate(events)
    ]
    assert all(len(e["meta_info"]["output_top_logprobs"]) == 1 for e in incremental)

    def positions(stream: list) -> list:
        seen, got = 0, []
        for event in stream:
            part = base.parse_streamed(event, PROMPT, 4, seen)
            seen += len(part)
            got.append(part)
        return got

    cumulative, sliced = positions(events), positions(incremental)
    assert [len(p) for p in cumulative] == [1] * 5 == [len(p) for p in sliced]
    assert cumulative == sliced
    assert [p.tokens[0] for p in cumulative] == events[-1]["output_ids"]


# -- generations ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tuners(servers, tiny_models, base_tokenizer):
    made = {
        api: ProxyTuner(
            base_for(api, servers, base_tokenizer),
            tiny_models["expert"],
            tiny_models["anti_expert"],
            device="cpu",
        )
        for api in FIXTURE_APIS
    }
    yield made
    for tuner in made.values():
        tuner.close()


@pytest.mark.parametrize("api", FIXTURE_APIS)
@pytest.mark.parametrize("alpha", [0.0, 1.0, 2.0])
def test_greedy_stream_equals_off(servers, tuners, api, alpha):
    tuner, server = tuners[api], servers[api]
    options = dict(max_new_tokens=24, alpha=alpha, base_k=K[api])
    off = tuner.generate("def main():", speculate="off", **options)
    before = len(server.streams)
    got = tuner.generate("def main():", speculate="stream", **options)
    streams = len(server.wait_for_streams(before + 1)) - before
    auto = tuner.generate("def main():", **options)
    assert got.token_ids == off.token_ids and got.text == off.text
    assert auto.token_ids == off.token_ids and auto.usage.requests == got.usage.requests
    assert streams >= 1 and got.usage.requests <= off.usage.requests
    if alpha == 0:  # the base's own text: one stream per stream_tokens
        assert got.usage.requests == -(-24 // GenerationConfig().stream_tokens)


@pytest.mark.parametrize("api", FIXTURE_APIS)
def test_a_generation_over_a_broken_stream_goes_on_from_what_was_verified(servers, tuners, api):
    # alpha 0: the proxies never disagree, so no stream is closed before the break comes.
    tuner, server = tuners[api], servers[api]
    options = dict(max_new_tokens=24, alpha=0.0, base_k=K[api])
    off = tuner.generate("def main():", speculate="off", **options)
    before = len(server.streams)
    server.break_next_stream(after=5)
    got = tuner.generate("def main():", speculate="stream", **options)
    records = server.wait_for_streams(before + 2)[before:]
    assert got.token_ids == off.token_ids and got.text == off.text
    assert records[0].ended == "broken" and records[0].sent == 5
    # The next stream starts after the 5 verified tokens: two streams of 16 would have done.
    assert got.usage.requests == 1 + -(-(24 - 5) // GenerationConfig().stream_tokens)
