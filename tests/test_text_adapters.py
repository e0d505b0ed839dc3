"""The OpenAI, OpenAI-chat, TGI and llama.cpp adapters: payloads as dicts, parsing of literal JSON
in each API's documented shape, and recovering ids from token text or bytes."""

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from proxyclient.adapters import connect
from proxyclient.adapters.base import Prompt
from proxyclient.errors import ConfigError, ResponseFormatError, TopKTooLargeError
from proxyclient.tokenizer import BaseTokenizer


@pytest.fixture(scope="module")
def tokenizer(hf_models):
    return BaseTokenizer(hf_models["tokenizer"])


def adapter(api, tokenizer, **options):
    return connect(api, "http://server/v1", "m", tokenizer=tokenizer, **options)


def test_openai_payload_sends_token_ids_and_asks_for_k(tokenizer):
    path, payload = adapter("openai", tokenizer).build_request(Prompt((0, 5, 6), 3), 5)
    assert (path, payload) == (
        "/completions",
        {"model": "m", "prompt": [0, 5, 6], "max_tokens": 1, "temperature": 1.0, "logprobs": 5},
    )


def test_openai_can_send_text_instead(tokenizer):
    ids = tuple(tokenizer.encode("def main():"))
    openai = adapter("openai", tokenizer, token_id_prompts=False)
    assert openai.build_request(Prompt(ids, len(ids)), 5)[1]["prompt"] == "def main():"


def test_openai_parse_maps_token_text_to_ids_and_keeps_k(tokenizer):
    # OpenAI's shape; 6 entries for logprobs=5 (the sampled token is added); a partial UTF-8
    # token written as bytes:, one that decodes to "" (other hosts) and cannot be resolved.
    body = {
        "choices": [{
            "text": "def",
            "index": 0,
            "logprobs": {
                "tokens": ["def"],
                "token_logprobs": [-0.5],
                "top_logprobs": [{
                    "def": -0.5, "(": -1.0, "bytes:\\xe6": -2.0, "": -2.5, " return": -3.0,
                    "x": -7.0,
                }],
                "text_offset": [11],
            },
            "finish_reason": "length",
        }]
    }  # fmt: skip
    top = adapter("openai", tokenizer).parse_response(body, Prompt((0,), 1), 5)
    # Expected ids from the HF tokenizer's own token strings (GPT-2 byte-level spelling: the
    # byte 0xe6 is "æ", a space is "Ġ"), not from the byte vocabulary under test.
    expected = tokenizer.inner.convert_tokens_to_ids(["def", "(", "æ", "Ġreturn"])
    assert tokenizer.inner.unk_token_id not in expected
    assert list(top.token_ids) == expected
    assert top.logprobs == (-0.5, -1.0, -2.0, -3.0)
    assert top.unresolved == 1


@pytest.mark.parametrize(
    "body",
    [
        {"error": "x"},
        {"choices": [{"text": "x", "logprobs": None}]},
        {"choices": [{"text": "x", "logprobs": {"top_logprobs": [{}]}}]},
    ],
)
def test_openai_without_logprobs_is_a_clear_error(tokenizer, body):
    with pytest.raises(ResponseFormatError, match=r"no choices|returned no top logprobs"):
        adapter("openai", tokenizer).parse_response(body, Prompt((0,), 1), 5)


def test_chat_payload_continues_the_answer_only_when_allowed(tokenizer):
    ids = tuple(tokenizer.encode("Q?")) + tuple(tokenizer.encode("A", add_special_tokens=False))
    plain = adapter("openai-chat", tokenizer)
    assert not plain.capabilities.multi_step
    path, first = plain.build_request(Prompt(ids[:-1], len(ids) - 1), 20)
    assert path == "/chat/completions"
    assert first == {
        "model": "m", "messages": [{"role": "user", "content": "Q?"}], "max_tokens": 1,
        "temperature": 1.0, "logprobs": True, "top_logprobs": 20,
    }  # fmt: skip
    vllm_chat = adapter("openai-chat", tokenizer, continue_final_message=True)
    assert vllm_chat.capabilities.multi_step
    _, later = vllm_chat.build_request(Prompt(ids, len(ids) - 1), 20)
    assert later["messages"][-1] == {"role": "assistant", "content": "A"}
    assert later["continue_final_message"] is True and later["add_generation_prompt"] is False


def test_chat_parse_rebuilds_tokens_from_bytes(tokenizer):
    emoji_first_byte = tokenizer.inner.convert_tokens_to_ids("ð")  # the byte 0xf0, byte-level
    body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "x"},
        "logprobs": {"content": [{"token": "x", "logprob": -0.1, "bytes": [120], "top_logprobs": [
            {"token": "x", "logprob": -0.1, "bytes": [120]},
            {"token": "\ufffd", "logprob": -2.0, "bytes": [240]},
            {"token": "def", "logprob": -3.0, "bytes": None},
        ]}]}, "finish_reason": "length"}]}  # fmt: skip
    top = adapter("openai-chat", tokenizer).parse_response(body, Prompt((0,), 1), 20)
    expected = [tokenizer.inner.convert_tokens_to_ids("x"), emoji_first_byte,
                tokenizer.inner.convert_tokens_to_ids("def")]  # fmt: skip
    assert list(top.token_ids) == expected


def test_chat_without_logprobs_is_a_clear_error(tokenizer):
    body = {"choices": [{"message": {"content": "x"}, "logprobs": None}]}
    with pytest.raises(ResponseFormatError, match="reasoning models"):
        adapter("openai-chat", tokenizer).parse_response(body, Prompt((0,), 1), 5)


def test_tgi_payload_sends_text_and_no_warpers(tokenizer):
    ids = tuple(tokenizer.encode("def main():"))
    path, payload = adapter("tgi", tokenizer).build_request(Prompt(ids, len(ids)), 5)
    assert (path, payload) == (
        "/generate",
        {"inputs": "def main():", "parameters": {
            "max_new_tokens": 1, "details": True, "top_n_tokens": 5,
            "decoder_input_details": False,
        }},
    )  # fmt: skip


def test_tgi_parse_and_retokenization(tokenizer):
    body = {"generated_text": " x", "details": {"finish_reason": "length", "generated_tokens": 1,
        "seed": None, "prefill": [], "tokens": [{"id": 7, "text": "x", "logprob": -0.2,
        "special": False}], "top_tokens": [[
            {"id": 7, "text": "x", "logprob": -0.2, "special": False},
            {"id": 9, "text": "y", "logprob": -1.9, "special": False},
        ]]}}  # fmt: skip
    canonical = tuple(tokenizer.encode("def main():"))
    tgi = adapter("tgi", tokenizer)
    top = tgi.parse_response(body, Prompt(canonical, len(canonical)), 5)
    assert top.token_ids == (7, 9) and not top.retokenized
    # "def" spelled as single characters: the same text, a split TGI would not make.
    split = (0, *[tokenizer.vocab.id_of(c.encode()) for c in "def"])
    assert tokenizer.decode(split) == "def"
    assert tgi.parse_response(body, Prompt(split, len(split)), 5).retokenized


def test_llamacpp_payload_and_parse():
    llama = connect("llamacpp", "http://server", "m")
    assert llama.build_request(Prompt((1, 2), 2), 3) == (
        "/completion",
        {"prompt": [1, 2], "n_predict": 1, "n_probs": 3, "temperature": 1.0,
         "post_sampling_probs": False, "cache_prompt": True},
    )  # fmt: skip
    body = {"content": "x", "completion_probabilities": [{"id": 5, "token": "x", "bytes": [120],
        "logprob": -0.3, "top_logprobs": [
            {"id": 5, "token": "x", "bytes": [120], "logprob": -0.3},
            {"id": 8, "token": "y", "bytes": [121], "logprob": -1.3},
        ]}]}  # fmt: skip
    assert llama.parse_response(body, Prompt((1,), 1), 3).token_ids == (5, 8)


def test_a_text_dialect_without_a_tokenizer_waits_for_one():
    """connect() leaves it to ProxyTuner, which lends the proxies' (test_tuner.py); probing it
    alone says what to pass."""
    from proxyclient.adapters.discovery import probe

    base = connect("tgi", "http://server", "m")
    assert base.tokenizer is None
    with pytest.raises(ConfigError, match="names tokens by text, so probing it needs the base"):
        asyncio.run(probe(base, Prompt((1,), 1)))


def test_llamacpp_asks_again_when_the_sampled_token_was_held_back():
    seeds = []
    good = {"content": "x", "completion_probabilities": [{"id": 5, "logprob": -0.3,
            "top_logprobs": [{"id": 5, "logprob": -0.3}, {"id": 8, "logprob": -1.3}]}]}  # fmt: skip

    def handler(request):
        seeds.append(json.loads(request.content)["seed"])
        # llama-server sends no probabilities when it sampled an incomplete UTF-8 character
        held_back = {"content": "\ufffd", "completion_probabilities": []}
        return httpx.Response(200, json=held_back if len(seeds) < 3 else good)

    llama = connect("llamacpp", "http://server", "m", transport=httpx.MockTransport(handler))
    top = asyncio.run(llama.top_logprobs(Prompt((1, 2), 2), 2))
    assert top.token_ids == (5, 8)
    assert seeds == [0, 1, 2]


def test_tgi_k_over_its_cap_says_which_option_raises_it(tokenizer):
    error = {
        "error": "Input validation error: `top_n_tokens` must be >= 0 and <= 5. Given: 6",
        "error_type": "validation",
    }
    transport = httpx.MockTransport(lambda request: httpx.Response(422, json=error))
    tgi = connect("tgi", "http://server", "m", tokenizer=tokenizer, transport=transport)
    ids = tuple(tokenizer.encode("x"))
    with pytest.raises(
        TopKTooLargeError, match="restart TGI with a larger --max-top-n-tokens"
    ) as e:
        asyncio.run(tgi.top_logprobs(Prompt(ids, len(ids)), 6))
    assert e.value.server_max == 5 and "pass base_k=5 or less" in str(e.value)


# generate: several positions from one request (speculation).


def test_openai_generate_payload(tokenizer):
    openai = adapter("openai", tokenizer)
    assert openai.capabilities.drafts
    common = {"model": "m", "prompt": [0, 5, 6], "max_tokens": 4, "logprobs": 5, "top_p": 1.0}
    prompt = Prompt((0, 5, 6), 3)
    assert openai.build_generate(prompt, 5, 4, greedy=True, seed=7) == (
        "/completions",
        common | {"temperature": 0.0},
    )
    assert openai.build_generate(prompt, 5, 4, greedy=False, seed=7) == (
        "/completions",
        common | {"temperature": 1.0, "seed": 7},
    )


def test_openai_generate_parses_every_position(tokenizer):
    # Asked for 4 tokens, 3 came back (a stop). The third is "" (a host that cannot spell a
    # partial UTF-8 token): its id is unknown, its position's top-k still holds.
    body = {
        "choices": [{
            "text": "def(",
            "index": 0,
            "logprobs": {
                "tokens": ["def", "(", ""],
                "token_logprobs": [-0.5, -0.25, -2.5],
                "top_logprobs": [
                    {"def": -0.5, "(": -1.0, "bytes:\\xe6": -2.0},
                    {"(": -0.25, ")": -2.0},
                    {":": -0.5, "": -2.5, " return": -3.0},
                ],
                "text_offset": [0, 3, 4],
            },
            "finish_reason": "stop",
        }],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
    }  # fmt: skip
    openai = adapter("openai", tokenizer)
    got = openai.parse_generate(body, Prompt((0,), 1), 2)
    id_of = tokenizer.vocab.id_of
    assert got.tokens == (id_of(b"def"), id_of(b"("), None)
    assert got.token_logprobs == (-0.5, -0.25, -2.5)
    assert got.tops[0] == openai.parse_response(body, Prompt((0,), 1), 2)
    assert got.tops[0].token_ids == (id_of(b"def"), id_of(b"("))
    assert got.tops[1].token_ids == (id_of(b"("), id_of(b")"))
    assert got.tops[2].token_ids == (id_of(b":"),) and got.tops[2].unresolved == 1
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (3, 4)


def test_openai_generate_without_logprobs_is_a_clear_error_and_a_bare_stop_is_empty(tokenizer):
    openai = adapter("openai", tokenizer)
    with pytest.raises(ResponseFormatError, match="returned no top logprobs"):
        openai.parse_generate({"choices": [{"text": "x", "logprobs": None}]}, Prompt((0,), 1), 5)
    stopped = {"choices": [{"text": "", "finish_reason": "stop", "logprobs": {
        "tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}}]}  # fmt: skip
    assert len(openai.parse_generate(stopped, Prompt((0,), 1), 5)) == 0


def test_chat_generate_payload_and_capabilities(tokenizer):
    ids = tuple(tokenizer.encode("Q?")) + tuple(tokenizer.encode("A", add_special_tokens=False))
    assert not adapter("openai-chat", tokenizer).capabilities.drafts
    chat = adapter("openai-chat", tokenizer, continue_final_message=True)
    assert chat.capabilities.drafts
    path, first = chat.build_generate(Prompt(ids[:-1], len(ids) - 1), 20, 6, greedy=True, seed=3)
    assert (path, first) == ("/chat/completions", {
        "model": "m", "messages": [{"role": "user", "content": "Q?"}], "max_tokens": 6,
        "temperature": 0.0, "top_p": 1.0, "logprobs": True, "top_logprobs": 20,
    })  # fmt: skip
    _, later = chat.build_generate(Prompt(ids, len(ids) - 1), 20, 6, greedy=False, seed=3)
    assert later["messages"][-1] == {"role": "assistant", "content": "A"}
    assert later["continue_final_message"] is True and later["add_generation_prompt"] is False
    assert (later["temperature"], later["top_p"], later["seed"]) == (1.0, 1.0, 3)


def test_chat_generate_parses_every_position(tokenizer):
    # 3 of the 5 tokens asked for; the second is a partial UTF-8 token that vLLM spells with
    # U+FFFD's bytes, so its id is unknown.
    fffd = list("\ufffd".encode())
    body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "x\ufffd("},
        "logprobs": {"content": [
            {"token": "x", "logprob": -0.1, "bytes": [120], "top_logprobs": [
                {"token": "x", "logprob": -0.1, "bytes": [120]},
                {"token": "def", "logprob": -3.0, "bytes": None}]},
            {"token": "\ufffd", "logprob": -0.7, "bytes": fffd, "top_logprobs": [
                {"token": "(", "logprob": -0.5, "bytes": [40]},
                {"token": "\ufffd", "logprob": -0.7, "bytes": fffd}]},
            {"token": "(", "logprob": -0.2, "bytes": [40], "top_logprobs": [
                {"token": "(", "logprob": -0.2, "bytes": [40]}]},
        ]}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13,
                  "prompt_tokens_details": {"cached_tokens": 8}}}  # fmt: skip
    chat = adapter("openai-chat", tokenizer, continue_final_message=True)
    got = chat.parse_generate(body, Prompt((0,), 1), 20)
    id_of = tokenizer.vocab.id_of
    assert got.tokens == (id_of(b"x"), None, id_of(b"("))
    assert got.token_logprobs == (-0.1, -0.7, -0.2)
    assert got.tops[0] == chat.parse_response(body, Prompt((0,), 1), 20)
    assert got.tops[0].token_ids == (id_of(b"x"), id_of(b"def"))
    assert got.tops[1].token_ids == (id_of(b"("),) and got.tops[1].unresolved == 1
    assert got.usage.cached_prompt_tokens == 8


def test_chat_generate_without_logprobs_is_a_clear_error(tokenizer):
    body = {"choices": [{"message": {"content": "x"}, "logprobs": None}]}
    with pytest.raises(ResponseFormatError, match="reasoning models"):
        adapter("openai-chat", tokenizer).parse_generate(body, Prompt((0,), 1), 5)


def test_tgi_generate_payload_sends_no_warpers(tokenizer):
    ids = tuple(tokenizer.encode("def main():"))
    tgi = adapter("tgi", tokenizer)
    assert tgi.capabilities.drafts
    parameters = {"max_new_tokens": 6, "details": True, "top_n_tokens": 5,
                  "decoder_input_details": False}  # fmt: skip
    assert tgi.build_generate(Prompt(ids, len(ids)), 5, 6, greedy=True, seed=4) == (
        "/generate",
        {"inputs": "def main():", "parameters": parameters},  # do_sample: false by default
    )
    assert tgi.build_generate(Prompt(ids, len(ids)), 5, 6, greedy=False, seed=4) == (
        "/generate",
        {"inputs": "def main():", "parameters": parameters | {"do_sample": True, "seed": 4}},
    )


def test_tgi_generate_parses_every_position_eos_included(tokenizer):
    # 3 of the 6 tokens asked for: TGI sends the EOS that stopped it (special) as the last one.
    body = {"generated_text": "x(", "details": {"finish_reason": "eos_token",
        "generated_tokens": 3, "seed": None, "prefill": [], "tokens": [
            {"id": 90, "text": "x", "logprob": -0.2, "special": False},
            {"id": 10, "text": "(", "logprob": -0.9, "special": False},
            {"id": 1, "text": "</s>", "logprob": None, "special": True}],
        "top_tokens": [
            [{"id": 90, "text": "x", "logprob": -0.2, "special": False},
             {"id": 9, "text": "y", "logprob": -1.9, "special": False}],
            [{"id": 10, "text": "(", "logprob": -0.9, "special": False}],
            [{"id": 1, "text": "</s>", "logprob": -0.01, "special": True},
             {"id": 11, "text": ")", "logprob": -5.0, "special": False}]]}}  # fmt: skip
    tgi = adapter("tgi", tokenizer)
    canonical = tuple(tokenizer.encode("def main():"))
    got = tgi.parse_generate(body, Prompt(canonical, len(canonical)), 5)
    assert got.tokens == (90, 10, 1)
    assert got.token_logprobs == (-0.2, -0.9, None)
    assert got.tops[0] == tgi.parse_response(body, Prompt(canonical, len(canonical)), 5)
    assert [top.token_ids for top in got.tops] == [(90, 9), (10,), (1, 11)]
    assert not any(top.retokenized for top in got.tops)
    assert got.usage.completion_tokens == 3
    split = (0, *[tokenizer.vocab.id_of(c.encode()) for c in "def"])
    assert all(top.retokenized for top in tgi.parse_generate(body, Prompt(split, 4), 5).tops)


def test_tgi_generate_without_top_tokens_is_a_clear_error(tokenizer):
    body = {"generated_text": "x", "details": {"tokens": [{"id": 90, "logprob": -0.2}]}}
    with pytest.raises(ResponseFormatError, match=r"no details\.top_tokens"):
        adapter("tgi", tokenizer).parse_generate(body, Prompt((0,), 1), 5)


LLAMACPP_FIXTURES = Path(__file__).parent / "fixtures" / "llamacpp"  # requests.json: what was sent


def llamacpp_fixture(name):
    return json.loads((LLAMACPP_FIXTURES / name).read_text())


def test_llamacpp_generate_payload_samples_from_the_raw_distribution():
    llama = connect("llamacpp", "http://server", "m")
    assert llama.capabilities.drafts
    requests = llamacpp_fixture("requests.json")
    prompt = Prompt((0, 321, 530, 264, 827), 5)
    greedy = llama.build_generate(prompt, 3, 6, greedy=True, seed=None)
    assert greedy == ("/completion", requests["generate_greedy_k3_n6.json"]["json"])
    assert greedy[1] == {
        "prompt": [0, 321, 530, 264, 827], "n_predict": 6, "n_probs": 3, "temperature": 0.0,
        "post_sampling_probs": False, "cache_prompt": True, "samplers": ["temperature"],
        "return_tokens": True,
    }  # fmt: skip
    sampled = llama.build_generate(prompt, 3, 8, greedy=False, seed=12)
    assert sampled == ("/completion", requests["generate_sampled_held_back.json"]["json"])


def test_llamacpp_generate_parses_a_captured_answer():
    llama = connect("llamacpp", "http://server", "m")
    body = llamacpp_fixture("generate_greedy_k3_n6.json")
    got = llama.parse_generate(body, Prompt((0, 321, 530, 264, 827), 5), 3)
    assert got.tokens == (729, 729, 729, 729, 729, 411) == tuple(body["tokens"])
    assert got.tops[0] == llama.parse_response(body, Prompt((0, 321, 530, 264, 827), 5), 3)
    assert all(
        len(top) == 3 and top.token_ids[0] == t for top, t in zip(got.tops, got.tokens, strict=True)
    )
    assert got.token_logprobs == tuple(p["logprob"] for p in body["completion_probabilities"])
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (5, 6)


def test_llamacpp_generate_stops_where_the_server_left_a_position_out():
    # llama-server held back token 127 (byte 0xC0, an incomplete UTF-8 character): no entry for
    # it, and the next entry (330, "ro") carries its byte too. The 5 positions before it hold.
    body = llamacpp_fixture("generate_sampled_held_back.json")
    assert body["tokens"][5] == 127 and body["completion_probabilities"][5]["id"] == 330
    assert body["completion_probabilities"][5]["bytes"] == [192, 114, 111]
    llama = connect("llamacpp", "http://server", "m")
    got = llama.parse_generate(body, Prompt((0, 321, 530, 264, 827), 5), 3)
    assert got.tokens == (629, 753, 236, 649, 649) == tuple(body["tokens"][:5])
    assert len(got.tops) == len(got.token_logprobs) == 5
    # A server that ignores return_tokens: the entries' ids are trusted when none is missing.
    no_gap = llamacpp_fixture("generate_greedy_k3_n6.json") | {"tokens": []}
    assert llama.parse_generate(no_gap, Prompt((1,), 1), 3).tokens == (729,) * 5 + (411,)


def test_llamacpp_generate_asks_for_the_first_position_when_it_was_held_back():
    sent = []
    held_back = {
        "content": "x",
        "tokens": [127, 330, 106],
        "tokens_predicted": 3,
        "tokens_evaluated": 2,
        "completion_probabilities": [
            {"id": 330, "logprob": -1.0, "top_logprobs": [{"id": 330, "logprob": -1.0}]},
            {"id": 106, "logprob": -0.5, "top_logprobs": [{"id": 106, "logprob": -0.5}]},
        ],
    }
    one = {"content": "x", "completion_probabilities": [{"id": 5, "logprob": -0.3,
        "top_logprobs": [{"id": 5, "logprob": -0.3}, {"id": 127, "logprob": -1.3}]}]}  # fmt: skip

    def handler(request):
        sent.append(json.loads(request.content))
        return httpx.Response(200, json=held_back if len(sent) == 1 else one)

    llama = connect("llamacpp", "http://server", "m", transport=httpx.MockTransport(handler))
    got = asyncio.run(llama.generate(Prompt((1, 2), 2), 2, 3, greedy=True))
    assert got.tokens == (127,) and got.token_logprobs == (-1.3,)
    assert got.tops[0].token_ids == (5, 127)
    assert got.usage.prompt_tokens == 2 and got.usage.completion_tokens == 3
    assert [body["n_predict"] for body in sent] == [3, 1]
