"""The together, fireworks, sglang and ollama adapters without a server: payloads as dicts,
parsing of literal JSON in each API's documented shape, and their errors (httpx.MockTransport)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from proxyclient.adapters import BUILTIN, connect, tokenizer_needed
from proxyclient.adapters.base import Prompt
from proxyclient.adapters.discovery import HUGE_K, probe
from proxyclient.errors import (
    ConfigError,
    ContextLengthError,
    NotFoundError,
    ResponseFormatError,
    TopKTooLargeError,
)
from proxyclient.tokenizer import BaseTokenizer

PROMPT = Prompt((0, 5, 6), 3)


@pytest.fixture(scope="module")
def tokenizer(hf_models):
    return BaseTokenizer(hf_models["tokenizer"])


def mock(handler):
    """A server answering POSTs with ``handler`` and every GET (dialect sniffing) with a 404."""

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404) if request.method == "GET" else handler(request)

    return httpx.MockTransport(answer)


def test_registered_with_their_facts():
    together, fireworks = BUILTIN["together"], BUILTIN["fireworks"]
    sglang, ollama = BUILTIN["sglang"], BUILTIN["ollama"]
    assert together.default_base_url == "https://api.together.xyz/v1"
    assert together.api_key_env == "TOGETHER_API_KEY"
    assert fireworks.default_base_url == "https://api.fireworks.ai/inference/v1"
    assert fireworks.api_key_env == "FIREWORKS_API_KEY"
    assert sglang.default_base_url is None and sglang.probe_ks == ()
    assert ollama.default_base_url == "http://127.0.0.1:11434" and ollama.api_key_env is None
    assert tokenizer_needed("together", "m") and tokenizer_needed("ollama", "m")
    assert not tokenizer_needed("fireworks", "m") and not tokenizer_needed("sglang", "m")
    with pytest.raises(ConfigError, match="no public endpoint"):
        connect("sglang", None, "m")
    assert connect("fireworks", None, "m").transport.base_url == fireworks.default_base_url


# -- sglang ------------------------------------------------------------------------------------

SGLANG_ANSWER = {
    "text": " x",
    "output_ids": [7, 1],
    "meta_info": {
        "id": "5f1c",
        "finish_reason": {"type": "stop", "matched": 1},
        "prompt_tokens": 5,
        "weight_version": "default",
        "input_token_logprobs": [[None, 5, None], [-0.4, 8, None], [-1.5, 9, None]],
        "output_token_logprobs": [[-0.2, 7, None], [-0.9, 1, None]],
        "output_token_logprobs_length": 2,
        "input_top_logprobs": [
            None,
            [[-0.4, 8, None], [-1.1, 3, None]],
            [[-0.7, 4, None], [-1.5, 9, None]],
        ],
        "output_top_logprobs": [
            [[-0.2, 7, None], [-2.0, 2, None]],
            [[-0.9, 1, None], [-1.0, 7, None]],
        ],
        "reasoning_tokens": 0,
        "completion_tokens": 2,
        "cached_tokens": 3,
    },
}


def test_sglang_payloads_send_ids_and_turn_every_warper_off():
    sglang = connect("sglang", "http://server", "m")
    caps = sglang.capabilities
    assert caps.drafts and caps.prompt_scoring and caps.token_id_prompts and caps.max_k is None
    no_warpers = {"top_p": 1.0, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0,
                  "frequency_penalty": 0.0, "presence_penalty": 0.0}  # fmt: skip
    common = {"input_ids": [0, 5, 6], "return_logprob": True, "top_logprobs_num": 20,
              "return_text_in_logprobs": False, "stream": False}  # fmt: skip
    assert sglang.build_request(PROMPT, 20) == (
        "/generate",
        common | {"sampling_params": {"max_new_tokens": 1, "temperature": 1.0, **no_warpers},
                  "logprob_start_len": -1},
    )  # fmt: skip
    _, sampled = sglang.build_generate(PROMPT, 20, 4, greedy=False, seed=3)
    assert sampled["sampling_params"] == {"max_new_tokens": 4, "temperature": 1.0,
                                          **no_warpers, "sampling_seed": 3}  # fmt: skip
    _, greedy = sglang.build_generate(PROMPT, 20, 4, greedy=True, seed=3)
    assert greedy["sampling_params"]["temperature"] == 0.0
    assert "sampling_seed" not in greedy["sampling_params"]
    _, scored = sglang.build_score(PROMPT, [8, 9], 20)
    assert scored["input_ids"] == [0, 5, 6, 8, 9] and scored["logprob_start_len"] == 2
    assert scored["sampling_params"]["max_new_tokens"] == 1
    with pytest.raises(ConfigError, match="no whole-vocabulary mode"):
        sglang.build_request(PROMPT, -1)


def test_sglang_parses_the_triples():
    sglang = connect("sglang", "http://server", "m")
    top = sglang.parse_response(SGLANG_ANSWER, PROMPT, 2)
    assert (top.token_ids, top.logprobs) == ((7, 2), (-0.2, -2.0))
    got = sglang.parse_generate(SGLANG_ANSWER, PROMPT, 2)
    assert got.tokens == (7, 1) and got.token_logprobs == (-0.2, -0.9)  # EOS included
    assert got.tops[1].token_ids == (1, 7)
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (5, 2)
    assert got.usage.cached_prompt_tokens == 3


def test_sglang_scores_the_last_prompt_positions():
    sglang = connect("sglang", "http://server", "m")
    prompt = Prompt((0, 5), 2)
    got = sglang.parse_score(SGLANG_ANSWER, prompt, [8, 9], 2)
    assert got.tokens == (8, 9, 7)
    assert [t.token_ids for t in got.tops] == [(8, 3), (4, 9), (7, 2)]
    assert got.token_logprobs == (-0.4, -1.5, -0.2)
    with pytest.raises(ResponseFormatError, match="--disable-radix-cache"):
        sglang.parse_score(SGLANG_ANSWER, prompt, [8, 10], 2)
    short = json.loads(json.dumps(SGLANG_ANSWER))
    short["meta_info"]["input_top_logprobs"] = [None]
    short["meta_info"]["input_token_logprobs"] = [[None, 9, None]]
    with pytest.raises(ResponseFormatError, match="got 1 prompt positions"):
        sglang.parse_score(short, prompt, [8, 9], 2)


def test_sglang_without_logprobs_is_a_clear_error():
    sglang = connect("sglang", "http://server", "m")
    for body in ({"text": "x", "meta_info": {"id": "1"}}, {"error": "x"}, []):
        with pytest.raises(ResponseFormatError, match="native /generate"):
            sglang.parse_response(body, PROMPT, 2)


def test_sglang_refuses_a_k_above_the_vocabulary_before_sending(tokenizer):
    sent = []

    def handler(request):
        sent.append(request)
        return httpx.Response(500)

    sglang = connect("sglang", "http://server", "m", tokenizer=tokenizer, transport=mock(handler))
    vocab = len(tokenizer.vocab)
    with pytest.raises(TopKTooLargeError, match=f"pass base_k={vocab} or less") as e:
        asyncio.run(sglang.top_logprobs(PROMPT, vocab + 1))
    assert e.value.server_max == vocab and not sent


def test_sglang_context_error_is_explained():
    message = ("The input (9000 tokens) is longer than the model's context length (8192 "
               "tokens).")  # fmt: skip
    answer = httpx.Response(400, json={"error": {"message": message}})
    sglang = connect("sglang", "http://server", "m", transport=mock(lambda r: answer))
    with pytest.raises(ContextLengthError, match="no longer fit the server's context window"):
        asyncio.run(sglang.top_logprobs(PROMPT, 5))


# -- fireworks ---------------------------------------------------------------------------------


def fireworks_entry(token_id, logprob, top):
    return {
        "token": f"t{token_id}", "logprob": logprob, "sampling_logprob": logprob,
        "bytes": [116], "token_id": token_id, "text_offset": 0,
        "top_logprobs": [{"token": f"t{i}", "logprob": lp, "token_id": i, "bytes": [116]}
                         for i, lp in top],
    }  # fmt: skip


FIREWORKS_ANSWER = {
    "id": "c9c1f727",
    "object": "text_completion",
    "created": 1758920354,
    "model": "accounts/fireworks/models/m",
    "choices": [{
        "index": 0,
        "text": "xy",
        "logprobs": {"content": [
            fireworks_entry(8, -0.4, [(8, -0.4), (3, -1.1)]),
            fireworks_entry(9, -1.5, [(4, -0.7), (9, -1.5)]),
            fireworks_entry(7, -0.2, [(7, -0.2), (2, -2.0)]),
        ]},
        "finish_reason": "length",
    }],
    "usage": {"prompt_tokens": 5, "total_tokens": 6, "completion_tokens": 1,
              "prompt_tokens_details": {"cached_tokens": 2}},
}  # fmt: skip


def test_fireworks_payloads_send_ids_and_ask_for_ids_back():
    fireworks = connect("fireworks", "http://server/inference/v1", "m")
    assert fireworks.capabilities.max_k == 5 and fireworks.capabilities.prompt_scoring
    common = {"model": "m", "prompt": [0, 5, 6], "top_p": 1.0, "logprobs": True,
              "top_logprobs": 5, "context_length_exceeded_behavior": "error"}  # fmt: skip
    assert fireworks.build_request(PROMPT, 5) == (
        "/completions",
        common | {"max_tokens": 1, "temperature": 1.0},
    )
    assert fireworks.build_generate(PROMPT, 5, 4, greedy=False, seed=3)[1] == common | {
        "max_tokens": 4, "temperature": 1.0, "seed": 3,
    }  # fmt: skip
    assert fireworks.build_generate(PROMPT, 5, 4, greedy=True, seed=3)[1]["temperature"] == 0.0
    _, scored = fireworks.build_score(PROMPT, [8, 9], 5)
    assert scored["prompt"] == [0, 5, 6, 8, 9] and scored["echo_last"] == 2


def test_fireworks_parses_the_content_entries():
    fireworks = connect("fireworks", "http://server/inference/v1", "m")
    got = fireworks.parse_score(FIREWORKS_ANSWER, PROMPT, [8, 9], 2)
    assert got.tokens == (8, 9, 7)
    assert [t.token_ids for t in got.tops] == [(8, 3), (4, 9), (7, 2)]
    assert got.usage.cached_prompt_tokens == 2
    generated = fireworks.parse_generate(FIREWORKS_ANSWER, PROMPT, 2)
    assert generated.tokens == (8, 9, 7) and generated.token_logprobs == (-0.4, -1.5, -0.2)
    assert fireworks.parse_response(FIREWORKS_ANSWER, PROMPT, 1).token_ids == (8,)
    with pytest.raises(ResponseFormatError, match="echo_last"):
        fireworks.parse_score(FIREWORKS_ANSWER, PROMPT, [8, 5], 2)


def test_fireworks_legacy_or_missing_logprobs_are_clear_errors():
    fireworks = connect("fireworks", "http://server/inference/v1", "m")
    legacy = {"choices": [{"index": 0, "text": "x", "logprobs": {
        "tokens": ["x"], "token_logprobs": [-0.1], "top_logprobs": [{"x": -0.1}],
        "text_offset": [0], "token_ids": [7]}}]}  # fmt: skip
    with pytest.raises(ResponseFormatError, match=r"logprobs\.content"):
        fireworks.parse_response(legacy, PROMPT, 5)
    with pytest.raises(ResponseFormatError, match="no choices"):
        fireworks.parse_response({"error": "x"}, PROMPT, 5)


def test_fireworks_cap_comes_from_the_validation_error():
    def handler(request):
        k = json.loads(request.content)["top_logprobs"]
        if k > 5:
            detail = {"loc": ["body", "top_logprobs"], "msg": "Input should be less than or "
                      "equal to 5", "type": "less_than_equal", "input": k}  # fmt: skip
            return httpx.Response(422, json={"detail": [detail]})
        return httpx.Response(200, json=FIREWORKS_ANSWER)

    fireworks = connect("fireworks", "http://server/inference/v1", "m", max_k=None,
                        transport=mock(handler))  # fmt: skip
    assert asyncio.run(probe(fireworks, PROMPT)).max_k == 5
    with pytest.raises(TopKTooLargeError, match="pass base_k=5 or less") as e:
        asyncio.run(fireworks.top_logprobs(PROMPT, 6))
    assert e.value.server_max == 5 and "deployment that allows more" in str(e.value)


# -- together ----------------------------------------------------------------------------------


def test_together_payload_sends_text_at_temperature_1_without_top_p(tokenizer):
    together = connect("together", None, "m", tokenizer=tokenizer)
    caps = together.capabilities
    assert caps.max_k == 20 and caps.drafts and not caps.prompt_scoring
    assert not caps.token_id_prompts
    ids = tuple(tokenizer.encode("def main():"))
    assert together.build_request(Prompt(ids, len(ids)), 20) == (
        "/completions",
        {"model": "m", "prompt": "def main():", "max_tokens": 1, "temperature": 1.0,
         "logprobs": 20},
    )  # fmt: skip
    _, sampled = together.build_generate(Prompt(ids, len(ids)), 20, 4, greedy=False, seed=3)
    assert (sampled["max_tokens"], sampled["temperature"], sampled["seed"]) == (4, 1.0, 3)
    assert "top_p" not in sampled
    assert together.transport.base_url == "https://api.together.xyz/v1"


def test_together_maps_text_to_ids_and_knows_the_generated_tokens(tokenizer):
    id_of = tokenizer.vocab.id_of
    partial = id_of(b"\xe6")  # a byte of a character: "\ufffd" as text, no id from the text
    body = {
        "id": "oBUszH9", "object": "text.completion", "created": 1758038918, "model": "m",
        "prompt": [],
        "choices": [{"index": 0, "text": "def", "seed": 1, "finish_reason": "length",
            "logprobs": {
                "token_ids": [partial, id_of(b"def")],
                "tokens": ["\ufffd", "def"],
                "token_logprobs": [-1.5, -0.5],
                "top_logprobs": [
                    {"(": -0.5, "\ufffd": -1.5, "x": -3.0},
                    {"def": -0.5, "\ufffd": -0.9, " return": -3.0},
                ],
            }}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }  # fmt: skip
    together = connect("together", None, "m", tokenizer=tokenizer)
    ids = tuple(tokenizer.encode("def main():"))
    got = together.parse_generate(body, Prompt(ids, len(ids)), 20)
    assert got.tokens == (partial, id_of(b"def")) and got.token_logprobs == (-1.5, -0.5)
    # The generated token's own "\ufffd" takes its id; another one (position 2) cannot.
    assert got.tops[0].token_ids == (id_of(b"("), partial, id_of(b"x"))
    assert got.tops[1].token_ids == (id_of(b"def"), id_of(b" return"))
    assert got.tops[1].unresolved == 1 and not got.tops[0].retokenized
    assert got.usage.prompt_tokens == 3
    assert together.parse_response(body, Prompt(ids, len(ids)), 2).token_ids == (
        id_of(b"("),
        partial,
    )
    with pytest.raises(ResponseFormatError, match="no top_logprobs"):
        together.parse_response({"choices": [{"logprobs": {"tokens": ["x"]}}]}, PROMPT, 5)


def test_together_cap_and_unknown_model_errors(tokenizer):
    def handler(request):
        body = json.loads(request.content)
        if body["model"] != "m":
            error = {"message": f"Unable to access model {body['model']}. Please visit "
                     "https://api.together.ai/models to view the list of supported models.",
                     "type": "invalid_request_error", "param": None,
                     "code": "model_not_available"}  # fmt: skip
            return httpx.Response(404, json={"error": error})
        error = {"message": f"{body['logprobs']} is greater than the maximum of 20 - 'logprobs'",
                 "type": "invalid_request_error", "param": "logprobs", "code": None}  # fmt: skip
        return httpx.Response(400, json={"error": error})

    ids = tuple(tokenizer.encode("x"))
    together = connect("together", None, "m", tokenizer=tokenizer, transport=mock(handler))
    with pytest.raises(TopKTooLargeError, match="pass base_k=20 or less") as e:
        asyncio.run(together.top_logprobs(Prompt(ids, len(ids)), 21))
    assert e.value.server_max == 20
    other = connect("together", None, "nope", tokenizer=tokenizer, transport=mock(handler))
    with pytest.raises(NotFoundError, match="Unable to access model nope"):
        asyncio.run(other.top_logprobs(Prompt(ids, len(ids)), 5))


# -- ollama ------------------------------------------------------------------------------------


def ollama_entry(text, logprob, top=(), raw=None):
    return {"token": text, "logprob": logprob,
            "bytes": list(raw if raw is not None else text.encode()),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())}
                             for t, lp in top]}  # fmt: skip


def ollama_answer(logprobs):
    return {"model": "m", "created_at": "2025-10-17T23:14:07.414671Z", "response": "def",
            "done": True, "done_reason": "length", "prompt_eval_count": 4, "eval_count": 1,
            "logprobs": logprobs}  # fmt: skip


def test_ollama_payload_is_raw_text_with_every_sampler_off(tokenizer):
    ollama = connect("ollama", None, "m", tokenizer=tokenizer)
    assert ollama.transport.base_url == "http://127.0.0.1:11434"
    ids = tuple(tokenizer.encode("def main():"))
    options = {"num_predict": 1, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0,
               "repeat_penalty": 1.0}  # fmt: skip
    assert ollama.build_request(Prompt(ids, len(ids)), 20) == (
        "/api/generate",
        {"model": "m", "prompt": "def main():", "raw": True, "stream": False, "logprobs": True,
         "top_logprobs": 20, "options": options},
    )  # fmt: skip
    _, greedy = ollama.build_generate(Prompt(ids, len(ids)), 20, 6, greedy=True, seed=4)
    assert greedy["options"] == options | {"num_predict": 6, "temperature": 0.0}
    _, sampled = ollama.build_generate(Prompt(ids, len(ids)), 20, 6, greedy=False, seed=4)
    assert sampled["options"] == options | {"num_predict": 6, "seed": 4}


def test_ollama_maps_text_and_raw_bytes_to_ids(tokenizer):
    id_of = tokenizer.vocab.id_of
    ollama = connect("ollama", None, "m", tokenizer=tokenizer)
    top = [("def", -0.5), ("\ufffd", -1.0), ("(", -2.0)]
    body = ollama_answer([ollama_entry("def", -0.5, top)])
    got = ollama.parse_generate(body, PROMPT, 20)
    assert got.tokens == (id_of(b"def"),)
    assert got.tops[0].token_ids == (id_of(b"def"), id_of(b"(")) and got.tops[0].unresolved == 1
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (4, 1)
    # A build that keeps a partial character's own bytes: those name the token.
    raw = ollama_entry("\ufffd", -1.0, raw=b"\xe6")
    assert ollama._token_id(raw) == id_of(b"\xe6")


def test_ollama_asks_again_when_only_the_end_of_the_text_came_back(tokenizer):
    seeds = []
    good = ollama_answer([ollama_entry("(", -0.3, [("(", -0.3), (":", -1.3)])])

    def handler(request):
        seeds.append(json.loads(request.content)["options"]["seed"])
        ended = ollama_answer([]) | {"response": "", "done_reason": "stop"}
        return httpx.Response(200, json=ended if len(seeds) < 3 else good)

    ollama = connect("ollama", None, "m", tokenizer=tokenizer, transport=mock(handler))
    id_of = tokenizer.vocab.id_of
    assert asyncio.run(ollama.top_logprobs(PROMPT, 2)).token_ids == (id_of(b"("), id_of(b":"))
    assert seeds == [0, 1, 2]


def test_ollama_errors_say_what_to_do(tokenizer):
    def handler(request):
        body = json.loads(request.content)
        if body["model"] != "m":
            return httpx.Response(404, json={"error": f"model '{body['model']}' not found"})
        if body["top_logprobs"] > 20:
            return httpx.Response(400, json={"error": "top_logprobs must be between 0 and 20"})
        return httpx.Response(200, json={"model": "m", "response": "x", "done": True})

    ollama = connect(
        "ollama", None, "m", tokenizer=tokenizer, transport=mock(handler), max_retries=0
    )
    with pytest.raises(TopKTooLargeError, match="pass base_k=20 or less"):
        asyncio.run(ollama.top_logprobs(PROMPT, 21))
    with pytest.raises(ResponseFormatError, match=r"0\.12\.11 or later"):
        asyncio.run(ollama.top_logprobs(PROMPT, 5))
    missing = connect("ollama", None, "llama9", tokenizer=tokenizer, transport=mock(handler))
    with pytest.raises(NotFoundError, match=r"model 'llama9' not found.*ollama pull"):
        asyncio.run(missing.top_logprobs(PROMPT, 5))


def test_probe_ks():
    assert BUILTIN["together"].probe_ks == BUILTIN["fireworks"].probe_ks == (HUGE_K,)
    assert BUILTIN["ollama"].probe_ks == (HUGE_K,)
