"""Streamed drafts on the hosted dialects that stream with the top-k at each token: Fireworks'
completions, openai-chat (a server that continues), DeepSeek and Gemini.

Literal streams in each documented shape are read position by position; against the fixture
servers (tests/support/hosted.py's StreamingServer: each event sent as it is decoded, the real
tiny model), a stream reads as the non-streamed draft of the same request, a stream cut mid-way
gives what came then a connection error, closing a stream early closes the connection (the server
stops decoding), a refusal is explained as any request's, and greedy generation with
speculate="stream" equals speculate="off" token for token, a cut stream included."""

from __future__ import annotations

import asyncio
import contextlib
import json

import httpx
import pytest

from proxyclient import ProxyTuner, connect
from proxyclient.adapters.base import Prompt
from proxyclient.config import Speculate
from proxyclient.errors import APIConnectionError, TopKTooLargeError
from proxyclient.tokenizer import BaseTokenizer
from tests.support import dialect_deepseek, dialect_fireworks, dialect_gemini  # noqa: F401
from tests.support.hosted import StreamingServer

APIS = ["fireworks", "openai-chat", "deepseek", "gemini"]
K = {"fireworks": 5, "openai-chat": 20, "deepseek": 20, "gemini": 20}
OPTIONS = {"openai-chat": {"continue_final_message": True}}
PROMPT = "import os\nclass Foo(object):\n    "
# Generations compare with speculate="off", which sends the chat dialects the answer so far as
# text each step: on a prompt whose answer the server splits otherwise, a draft (base or
# streamed) conditions on other tokens than "off" does (PROMPT's 6th token on this model).
GENERATION_PROMPT = "def main():"
N_TOKENS = 12


@pytest.fixture(scope="module")
def tokenizer(hf_models) -> BaseTokenizer:
    return BaseTokenizer(hf_models["tokenizer"])


@pytest.fixture(scope="module")
def servers(tiny_models):
    with contextlib.ExitStack() as stack:
        yield {
            api: stack.enter_context(
                StreamingServer(api, tiny_models["base"], **OPTIONS.get(api, {}))
            )
            for api in APIS
        }


def base_for(api, server, tokenizer):
    return connect(api, server.base_url, "tiny-base", tokenizer=tokenizer, **OPTIONS.get(api, {}))


def prompt_of(tokenizer) -> Prompt:
    ids = tuple(tokenizer.encode(PROMPT))
    return Prompt(ids, len(ids))


async def read(base, prompt, k, n, *, stop_after=None):
    """The positions of one streamed draft (closed after ``stop_after``), and the error that
    ended it, if any."""
    got, error = [], None
    stream = base.stream_draft(prompt, k, n, greedy=True)
    try:
        async for position in stream:
            got.append(position)
            if stop_after is not None and len(got) == stop_after:
                break
    except APIConnectionError as exc:
        error = exc
    finally:
        await stream.aclose()
    return got, error


def run(base, coroutine):
    async def go():
        try:
            return await coroutine
        finally:
            await base.aclose()

    return asyncio.run(go())


# -- literal streams in each documented shape -----------------------------------------------------


def spelled(tokenizer, token_id):
    data = tokenizer.vocab.token_bytes[token_id]
    return data.decode("utf-8", "replace"), list(data)


def literal_stream(api, tokenizer, positions) -> bytes:
    """A stream in ``api``'s documented shape of ``positions`` [(token, logprob, [(id, lp)])],
    with the events that hold no position (role, finish, usage) where the dialect sends them."""

    def chat_entry(token_id, logprob, top=()):
        text, data = spelled(tokenizer, token_id)
        entry = {"token": text, "logprob": logprob, "bytes": data}
        if top:
            entry["top_logprobs"] = [chat_entry(t, lp) for t, lp in top]
        return entry

    events = []
    if api == "fireworks":
        head = {"id": "f-1", "object": "text_completion", "created": 1, "model": "tiny-base"}
        for token, logprob, top in positions:
            entry = chat_entry(token, logprob, top) | {
                "token_id": token, "sampling_logprob": logprob, "text_offset": 0,
            }  # fmt: skip
            for alternative, (t, _) in zip(entry["top_logprobs"], top, strict=True):
                alternative["token_id"] = t
            choice = {"index": 0, "text": entry["token"], "logprobs": {"content": [entry]}}
            events.append(head | {"choices": [choice | {"finish_reason": None}], "usage": None})
        last = {"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}
        usage = {"prompt_tokens": 3, "completion_tokens": len(positions), "total_tokens": 9}
        events.append(head | {"choices": [last], "usage": usage})
    elif api in ("openai-chat", "deepseek"):
        head = {"id": "c-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}

        def chunk(delta, logprobs=None, finish=None):
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return head | {"choices": [choice]}

        events.append(chunk({"role": "assistant", "content": ""}))
        for token, logprob, top in positions:
            entry = chat_entry(token, logprob, top)
            events.append(chunk({"content": entry["token"]}, {"content": [entry]}))
        events.append(chunk({}, None, "length"))
        events.append(head | {"choices": [], "usage": {"prompt_tokens": 3}})
    else:  # gemini: the first event holds two tokens, the last none

        def entry(token_id, logprob):
            return {"token": spelled(tokenizer, token_id)[0], "tokenId": token_id,
                    "logProbability": logprob}  # fmt: skip

        for group in (positions[:2], positions[2:]):
            result = {
                "chosenCandidates": [entry(t, lp) for t, lp, _ in group],
                "topCandidates": [{"candidates": [entry(*e) for e in top]} for _, _, top in group],
            }
            candidate = {"content": {"parts": [{"text": "x"}], "role": "model"}, "index": 0}
            events.append({"candidates": [candidate | {"logprobsResult": result}]})
        finish = {"content": {"parts": [{"text": ""}], "role": "model"}, "finishReason": "STOP"}
        events.append({"candidates": [finish | {"index": 0}]})
    body = "".join(f"data: {json.dumps(event)}\n\n" for event in events)
    return (body + ("" if api == "gemini" else "data: [DONE]\n\n")).encode()


@pytest.mark.parametrize("api", APIS)
def test_a_literal_stream_is_read_position_by_position(tokenizer, api):
    def plain(text):  # ids with bytes of their own (no BOS)
        return [t for t in tokenizer.encode(text) if tokenizer.vocab.token_bytes[t]]

    ids, others = plain("def main(): return")[:3], plain(" x y z")[:2]
    positions = [
        (t, -0.5 - i, [(t, -0.5 - i), (others[0], -1.5 - i), (others[1], -2.5 - i)])
        for i, t in enumerate(ids)
    ]
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        stream = literal_stream(api, tokenizer, positions)
        return httpx.Response(200, content=stream, headers={"content-type": "text/event-stream"})

    options = OPTIONS.get(api, {}) | ({"continue_model_turn": True} if api == "gemini" else {})
    base = connect(
        api, "http://hosted.test/v1", "tiny-base", tokenizer=tokenizer,
        transport=httpx.MockTransport(handler), **options,
    )  # fmt: skip
    got, error = run(base, read(base, Prompt((1, *ids), 1), 3, 3))
    assert error is None and [p.token for p in got] == ids
    assert [p.logprob for p in got] == [-0.5, -1.5, -2.5]
    assert [p.top.token_ids for p in got] == [(t, *others) for t in ids]
    assert got[2].top.logprobs == (-2.5, -3.5, -4.5)
    sent = json.loads(seen[0].read())
    if api == "gemini":
        assert seen[0].url.path.endswith(":streamGenerateContent")
        assert seen[0].url.params["alt"] == "sse" and "stream" not in sent
    else:
        assert sent["stream"] is True and sent["max_tokens"] == 3


# -- the fixture servers ------------------------------------------------------------------------


@pytest.mark.parametrize("api", APIS)
def test_a_stream_reads_as_the_draft_of_the_same_request(servers, tokenizer, api):
    base = base_for(api, servers[api], tokenizer)
    prompt = prompt_of(tokenizer)
    before = len(servers[api].wait_for_streams(0))

    async def both():
        draft = await base.generate(prompt, K[api], 6, greedy=True)
        return draft, await read(base, prompt, K[api], 6)

    draft, (got, error) = run(base, both())
    assert error is None and len(got) == len(draft) == 6
    assert [p.token for p in got] == list(draft.tokens)
    assert [p.logprob for p in got] == list(draft.token_logprobs)
    assert [p.top for p in got] == list(draft.tops) and all(len(p.top) == K[api] for p in got)
    # (the server records a stream once it has written the end, which the client may read first)
    assert servers[api].wait_for_streams(before + 1)[-1].ended == "done"


@pytest.mark.parametrize("api", APIS)
def test_a_stream_cut_mid_way_gives_what_came_then_a_connection_error(servers, tokenizer, api):
    server, prompt = servers[api], prompt_of(tokenizer)
    before = len(server.wait_for_streams(0))
    whole, _ = run(base := base_for(api, server, tokenizer), read(base, prompt, K[api], 6))
    server.wait_for_streams(before + 1)  # the whole stream's record, before the broken one's
    server.break_next_stream(after=4)
    got, error = run(base := base_for(api, server, tokenizer), read(base, prompt, K[api], 6))
    assert isinstance(error, APIConnectionError) and "the stream broke" in str(error)
    assert server.wait_for_streams(before + 2)[-1].ended == "broken"
    # Four events: chat streams a role chunk first.
    came = 3 if api in ("openai-chat", "deepseek") else 4
    assert [p.token for p in got] == [p.token for p in whole[:came]]


@pytest.mark.parametrize("api", APIS)
def test_closing_a_stream_early_closes_the_connection(servers, tokenizer, api):
    server = servers[api]
    before = len(server.wait_for_streams(0))
    base = base_for(api, server, tokenizer)
    got, _ = run(base, read(base, prompt_of(tokenizer), K[api], 1000, stop_after=1))
    records = server.wait_for_streams(before + 1)
    assert len(got) == 1 and len(records) == before + 1
    # The server stopped decoding when the client went: far fewer than 1000 events.
    assert records[-1].ended == "closed" and records[-1].sent < 1000


@pytest.mark.parametrize("api", APIS)
def test_a_refused_stream_is_explained_like_any_request(servers, tokenizer, api):
    base = base_for(api, servers[api], tokenizer)
    with pytest.raises(TopKTooLargeError) as info:
        run(base, read(base, prompt_of(tokenizer), K[api] + 1, 4))
    assert info.value.server_max == K[api]


def tuner_for(api, server, tiny_models, tokenizer):
    base = base_for(api, server, tokenizer)
    return ProxyTuner(base, tiny_models["expert"], tiny_models["anti_expert"], device="cpu")


@pytest.mark.parametrize("alpha", [0.0, 1.5])
@pytest.mark.parametrize("api", APIS)
def test_greedy_streamed_drafts_equal_off(servers, tiny_models, tokenizer, api, alpha):
    server = servers[api]
    options = dict(max_new_tokens=N_TOKENS, alpha=alpha, unseen="restrict", base_k=K[api])
    with tuner_for(api, server, tiny_models, tokenizer) as tuner:
        assert tuner.speculation_modes()[0] is Speculate.STREAM  # auto streams
        off = tuner.generate(GENERATION_PROMPT, speculate="off", **options)
        before = len(server.streams)
        got = tuner.generate(GENERATION_PROMPT, speculate="stream", **options)
    assert got.token_ids == off.token_ids and got.text == off.text
    assert len(server.wait_for_streams(before + 1)) > before
    assert got.usage.requests <= off.usage.requests
    if alpha == 0:  # every streamed token is the base's own, so each was received and kept
        assert got.usage.requests == 1
        assert got.usage.base_completion_tokens == len(got.token_ids) == N_TOKENS


@pytest.mark.parametrize("api", APIS)
def test_a_cut_stream_goes_on_from_what_was_verified(servers, tiny_models, tokenizer, api):
    server = servers[api]
    options = dict(max_new_tokens=N_TOKENS, alpha=0.0, unseen="restrict", base_k=K[api])
    with tuner_for(api, server, tiny_models, tokenizer) as tuner:
        off = tuner.generate(GENERATION_PROMPT, speculate="off", **options)
        before = len(server.streams)
        server.break_next_stream(after=5)
        got = tuner.generate(GENERATION_PROMPT, speculate="stream", **options)
    assert got.token_ids == off.token_ids and got.text == off.text
    records = server.wait_for_streams(before + 2)[before:]
    # The second stream ends, or is closed once its last token is in (its finish unread).
    assert len(records) == 2 and records[0].ended == "broken"
    assert records[1].ended in ("done", "closed") and got.usage.requests == 2
