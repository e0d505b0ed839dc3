"""The llamacpp adapter against llama.cpp's own server (llama-server, built by
scripts/setup_llamacpp.sh), serving the tiny base converted to an f32 GGUF: one-token steps,
drafts, and streamed drafts (equal to speculate="off"; closing the stream stops the server)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import torch

from proxyclient import GenerationConfig, ProxyTuner, connect
from proxyclient.adapters.base import Prompt, TopLogprobs
from proxyclient.adapters.discovery import probe
from proxyclient.tokenizer import BaseTokenizer
from scripts.managed_server import fetch_metric
from tests.support.reference import assert_same_tokens, proxy_tuned_greedy

pytestmark = pytest.mark.integration

PROMPTS = ["def main():", "import os\nclass Foo(object):\n    "]
N_TOKENS = 12
K = 20
# With an f32 KV cache and flash attention off (LlamaCppServer's defaults) llama.cpp's logprobs
# differ from transformers' by up to ~1.1e-5 on these models; a closer call may go either way.
LLAMACPP_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def llama_server(tiny_models, tmp_path_factory):
    from scripts.llamacpp_server import LlamaCppServer
    from scripts.make_gguf import build_gguf

    gguf = build_gguf(tiny_models["base"], tiny_models["base"].parent / "base-f32.gguf")
    logs = tmp_path_factory.mktemp("llamacpp-logs")
    # --metrics: /metrics shows whether the server is still decoding (the streamed-draft tests).
    with LlamaCppServer(
        gguf, "tiny-base", log_path=logs / "server.log", extra_args=["--metrics"]
    ) as server:
        yield server


@pytest.mark.parametrize("prompt", PROMPTS)
def test_llamacpp_equals_the_formula_on_the_top_k(llama_server, tiny_models, hf_models, prompt):
    base = connect("llamacpp", llama_server.base_url, "tiny-base")
    with ProxyTuner(base, tiny_models["expert"], tiny_models["anti_expert"], device="cpu") as t:
        got = t.generate(prompt, max_new_tokens=N_TOKENS, unseen="restrict", base_k=K)
        expected = proxy_tuned_greedy(
            hf_models["base"], hf_models["expert"], hf_models["anti_expert"],
            t.tokenizer(prompt).input_ids, alpha=1.0, max_new_tokens=N_TOKENS,
            eos_ids=t.eos_ids, restrict_to_top_k=K,
        )  # fmt: skip
    assert got.usage.dropped_candidates == 0
    assert_same_tokens(got.token_ids, expected, t.eos_ids, tolerance=LLAMACPP_TOLERANCE)


def test_llamacpp_capabilities(llama_server):
    base = connect("llamacpp", llama_server.base_url, "tiny-base")
    capabilities = asyncio.run(probe(base, Prompt((0, 321), 2)))
    assert capabilities.token_id_prompts and capabilities.ids_in_response
    assert capabilities.logprobs == "raw"


# generate: several positions from one request (speculation).

GENERATE_N = 6


@torch.inference_mode()
def raw_logprobs(model, ids):
    return torch.log_softmax(model(torch.tensor([list(ids)])).logits[0, -1].double(), dim=-1)


def assert_close_tops(got, expected, tolerance=LLAMACPP_TOLERANCE):
    """The same k entries with logprobs within ``tolerance``; entries may trade places (or one
    leave the top-k for another) only where their logprobs are that close."""
    mine, theirs = (
        dict(zip(got.token_ids, got.logprobs, strict=True)),
        dict(zip(expected.token_ids, expected.logprobs, strict=True)),
    )
    assert len(mine) == len(theirs)
    for token in mine.keys() & theirs.keys():
        assert mine[token] == pytest.approx(theirs[token], abs=tolerance), token
    for token in mine.keys() - theirs.keys():
        assert mine[token] <= min(theirs.values()) + tolerance, token
    for token in theirs.keys() - mine.keys():
        assert theirs[token] <= min(mine.values()) + tolerance, token


def assert_raw_top(top, model, ids, k):
    reference = raw_logprobs(model, ids)
    values, indices = torch.topk(reference, k)
    assert_close_tops(top, TopLogprobs(tuple(indices.tolist()), tuple(values.tolist())))


def server_tokens(server, payload):
    """The ids the server generated for ``payload`` (all of them: ``return_tokens``)."""
    body = {**payload, "return_tokens": True}
    return httpx.post(f"{server.base_url}/completion", json=body, timeout=60).json()["tokens"]


def incomplete_utf8(data: bytes) -> bool:
    """llama-server's rule (validate_utf8): the text ends inside a multi-byte character."""
    for distance, byte in enumerate(reversed(data[-4:]), start=1):
        if 0xC0 <= byte < 0xE0:
            length = 2
        elif 0xE0 <= byte < 0xF0:
            length = 3
        elif 0xF0 <= byte < 0xF8:
            length = 4
        else:
            continue
        if distance < length:
            return True
    return False


@pytest.mark.parametrize("prompt", PROMPTS)
def test_llamacpp_generate_greedy_is_the_servers_continuation_with_each_steps_top_k(
    llama_server, hf_models, prompt
):
    base = connect("llamacpp", llama_server.base_url, "tiny-base")
    assert base.capabilities.drafts
    ids = tuple(hf_models["tokenizer"](prompt).input_ids)

    async def run():
        try:
            got = await base.generate(Prompt(ids, len(ids)), K, GENERATE_N, greedy=True)
            singles = [
                await base.top_logprobs(Prompt(ids + got.tokens[:i], len(ids)), K)
                for i in range(len(got))
            ]
            return got, singles
        finally:
            await base.aclose()

    got, singles = asyncio.run(run())
    # The server's own greedy decoding (its default sampler chain at temperature 0).
    greedy = {"prompt": list(ids), "n_predict": GENERATE_N, "temperature": 0.0}
    own = server_tokens(llama_server, greedy)
    assert list(got.tokens) == own and len(got) == GENERATE_N
    for i, (token, top, single) in enumerate(zip(got.tokens, got.tops, singles, strict=True)):
        assert len(top) == K and token == top.token_ids[0]
        assert_close_tops(top, single)
        assert_raw_top(top, hf_models["base"], ids + got.tokens[:i], K)
    assert got.token_logprobs == pytest.approx([top.logprobs[0] for top in got.tops], abs=1e-9)
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(ids), GENERATE_N)


def test_llamacpp_generate_sampled_keeps_the_positions_before_a_held_back_token(
    llama_server, hf_models
):
    """Sampled at temperature 1 from the raw distribution. llama-server gives no entry for a
    token that leaves an incomplete UTF-8 character (it folds its bytes into the next entry);
    the positions before it are kept, and one whose first token was held back is asked again."""
    base = connect("llamacpp", llama_server.base_url, "tiny-base")
    ids = tuple(hf_models["tokenizer"](PROMPTS[0]).input_ids)
    prompt, n, k = Prompt(ids, len(ids)), 8, 5
    vocab = BaseTokenizer(hf_models["tokenizer"]).vocab

    async def draws():
        try:
            return [await base.generate(prompt, k, n, greedy=False, seed=s) for s in range(40)]
        finally:
            await base.aclose()

    cut_short = first_held_back = 0
    for seed, got in enumerate(asyncio.run(draws())):
        _, payload = base.build_generate(prompt, k, n, greedy=False, seed=seed)
        generated = server_tokens(llama_server, payload)  # the same draw, every id
        assert 1 <= len(got) <= len(generated) and list(got.tokens) == generated[: len(got)]
        if incomplete_utf8(vocab.bytes_of(generated[:1])):  # no entry for the first token
            assert len(got) == 1, (seed, generated, got.tokens)
            first_held_back += 1
        elif len(got) < len(generated):  # the first token without an entry was held back
            assert incomplete_utf8(vocab.bytes_of(generated[: len(got) + 1])), (seed, generated)
            cut_short += 1
        for i, top in enumerate(got.tops):
            assert_raw_top(top, hf_models["base"], ids + got.tokens[:i], k)
            own = float(raw_logprobs(hf_models["base"], ids + got.tokens[:i])[got.tokens[i]])
            assert got.token_logprobs[i] is None or got.token_logprobs[i] == pytest.approx(
                own, abs=LLAMACPP_TOLERANCE
            )
    assert cut_short > 0, f"no draw was cut short ({first_held_back} held back the first)"


# Streamed drafts (speculate="stream").


@pytest.mark.parametrize("alpha", [0.0, 1.0, 2.0])
def test_streamed_drafts_through_llamacpp_equal_off(llama_server, tiny_models, alpha):
    base = connect("llamacpp", llama_server.base_url, "tiny-base")
    assert base.capabilities.streams
    with ProxyTuner(base, tiny_models["expert"], tiny_models["anti_expert"], device="cpu") as t:
        options = dict(max_new_tokens=24, alpha=alpha, base_k=K)
        off = t.generate(PROMPTS[0], speculate="off", **options)
        got = t.generate(PROMPTS[0], speculate="stream", **options)
        auto = t.generate(PROMPTS[0], **options)
    assert got.token_ids == off.token_ids and got.text == off.text
    assert auto.token_ids == off.token_ids and auto.usage.requests == got.usage.requests
    assert got.usage.requests <= off.usage.requests
    if alpha == 0:  # the base's own text: one stream per stream_tokens
        assert got.usage.requests == -(-24 // GenerationConfig().stream_tokens)


def metric(server, name: str) -> float:
    return fetch_metric(server.base_url, name)


def decodes_after(server, run) -> float:
    """The llama_decode calls ``run()`` caused, once the server is idle and the count stands."""
    before = metric(server, "llamacpp:n_decode_total")
    run()
    deadline = time.monotonic() + 10
    while metric(server, "llamacpp:requests_processing") > 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert metric(server, "llamacpp:requests_processing") == 0
    settled = metric(server, "llamacpp:n_decode_total")
    time.sleep(0.5)
    assert metric(server, "llamacpp:n_decode_total") == settled
    return settled - before


def test_closing_the_stream_stops_llamacpp_generating(llama_server, hf_models):
    # Unstopped, this request decodes 1420 tokens (greedy reaches EOS there; about 1-2 s here).
    # Each event carries k = 1000 candidates (~80 kB), so llama-server cannot run far ahead of
    # a reader; closed after 3 positions it stopped after 25-38 decodes, idle within 0.2 s of
    # the close (measured). A loaded machine may stall the reader: up to three attempts, each
    # must leave the server idle with its count standing; one short of the whole shows the stop.
    ids = tuple(hf_models["tokenizer"](PROMPTS[0]).input_ids)
    prompt, asked = Prompt(ids, len(ids)), 2000
    base = connect("llamacpp", llama_server.base_url, "tiny-base")

    async def whole():
        return len(await base.generate(prompt, 1, asked, greedy=True))

    async def closed_after_three():
        stream = base.stream_draft(prompt, 1000, asked, greedy=True)
        got = []
        try:
            async for position in stream:
                got.append(position)
                if len(got) == 3:
                    break
        finally:
            await stream.aclose()
        assert len(got) == 3 and all(len(p.top) == 1000 for p in got)

    unstopped = decodes_after(llama_server, lambda: asyncio.run(whole()))
    assert unstopped > 1000  # the whole generation is long enough to show a stop
    decoded = []
    for _ in range(3):
        decoded.append(decodes_after(llama_server, lambda: asyncio.run(closed_after_three())))
        if decoded[-1] < unstopped:
            break
    asyncio.run(base.aclose())
    assert decoded[-1] < unstopped, f"decodes each time: {decoded}, unstopped: {unstopped}"
