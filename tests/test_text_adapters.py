"""The OpenAI, OpenAI-chat, TGI and llama.cpp adapters: payloads as dicts, parsing of literal JSON
in each API's documented shape, and recovering ids from token text or bytes."""

import asyncio
import json

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
    vocab = tokenizer.vocab
    expected = [
        vocab.id_of(b"def"),
        vocab.id_of(b"("),
        vocab.id_of(b"\xe6"),
        vocab.id_of(b" return"),
    ]
    assert None not in expected
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
    emoji_first_byte = tokenizer.vocab.id_of(b"\xf0")
    body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "x"},
        "logprobs": {"content": [{"token": "x", "logprob": -0.1, "bytes": [120], "top_logprobs": [
            {"token": "x", "logprob": -0.1, "bytes": [120]},
            {"token": "\ufffd", "logprob": -2.0, "bytes": [240]},
            {"token": "def", "logprob": -3.0, "bytes": None},
        ]}]}, "finish_reason": "length"}]}  # fmt: skip
    top = adapter("openai-chat", tokenizer).parse_response(body, Prompt((0,), 1), 20)
    expected = [tokenizer.vocab.id_of(b"x"), emoji_first_byte, tokenizer.vocab.id_of(b"def")]
    assert list(top.token_ids) == [i for i in expected if i is not None]


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


def test_text_dialects_need_a_tokenizer():
    with pytest.raises(ConfigError, match="needs the base's tokenizer: pass --base-tokenizer"):
        connect("tgi", "http://server", "m")


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
    assert e.value.server_max == 5 and "pass --top-logprobs 5 or less" in str(e.value)
