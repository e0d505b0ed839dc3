"""The dialect servers are only useful if they answer like the real ones: these tests check their
shapes against openai-python's types, their numbers against transformers, and their error
bodies against the wording recorded from the real APIs."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import tiktoken
import torch
from openai.types import Completion
from openai.types.chat import ChatCompletion
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.support.dialect_servers import (
    DialectServer,
    char_offsets,
    mask_api_key,
    render_token,
    tgi_token_texts,
    token_bytes,
)

MODEL = "tiny-base"
PROMPT = "def main():\n    return"
EOS = 1
KEY_HELP = "You can find your API key at https://platform.openai.com/account/api-keys."


# ---------------------------------------------------------------------------------------------
# Fixtures and references
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_dir(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["base"]


def _serve(base_dir: Path, dialect: Any, **kwargs: Any) -> Iterator[DialectServer]:
    with DialectServer(dialect, base_dir, **kwargs) as server:
        yield server


@pytest.fixture(scope="module")
def completions(base_dir: Path) -> Iterator[DialectServer]:
    yield from _serve(base_dir, "openai")


@pytest.fixture(scope="module")
def chat(base_dir: Path) -> Iterator[DialectServer]:
    yield from _serve(base_dir, "openai-chat")


@pytest.fixture(scope="module")
def tgi(base_dir: Path) -> Iterator[DialectServer]:
    yield from _serve(base_dir, "tgi")


@pytest.fixture(scope="module")
def model(base_dir: Path) -> Any:
    """The reference: the same checkpoint, loaded apart from any server."""
    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tok(base_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(base_dir)


# One client for the module: building an httpx client costs ~30 ms, more than a request.
HTTP = httpx.Client(timeout=30)


@pytest.fixture(scope="module", autouse=True)
def _close_http() -> Iterator[None]:
    yield
    HTTP.close()


def post(server: DialectServer, path: str, body: dict[str, Any], **kwargs: Any) -> httpx.Response:
    return HTTP.post(server.base_url + path, json=body, **kwargs)


def get(server: DialectServer, path: str) -> httpx.Response:
    return HTTP.get(server.base_url + path)


@torch.inference_mode()
def local_logits(model: Any, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids])).logits[0, -1].double()


def local_logprobs(model: Any, ids: list[int]) -> torch.Tensor:
    return torch.log_softmax(local_logits(model, ids), dim=-1)


@torch.inference_mode()
def greedy(model: Any, ids: list[int], n: int) -> list[int]:
    """transformers' own greedy continuation (stops after EOS)."""
    input_ids = torch.tensor([ids])
    out = model.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False, max_new_tokens=n
    )
    return out[0, len(ids) :].tolist()


def without_eos(ids: list[int]) -> list[int]:
    return ids[:-1] if ids and ids[-1] == EOS else ids


# ---------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------


def test_partial_utf8_tokens_render_per_mode() -> None:
    assert render_token(b"\xe6\x97", "openai", bytes_prefix="bytes:") == "bytes:\\xe6\\x97"
    assert render_token(b" \xe6", "openai", bytes_prefix="") == " \\xe6"  # chat: no prefix
    assert render_token(b"\xe6", "replacement", bytes_prefix="bytes:") == "\ufffd"
    assert render_token(b"\xe6", "empty", bytes_prefix="bytes:") == ""
    assert render_token("日".encode(), "openai", bytes_prefix="bytes:") == "日"


def test_text_offsets_match_a_recorded_openai_answer() -> None:
    # gpt-3.5-turbo-instruct on "天气非常好": "，", "bytes:\xe9\x80", "bytes:\x82", "合".
    pieces = ["，".encode(), b"\xe9\x80", b"\x82", "合".encode()]
    assert char_offsets("天气非常好".encode(), pieces) == [5, 6, 6, 7]


def test_token_bytes_rebuild_the_text(tok: Any) -> None:
    for text in ("héllo 日本 🙂", "def main():\n    return 0\n"):
        ids = tok.encode(text, add_special_tokens=False)
        assert b"".join(token_bytes(tok, i) for i in ids) == text.encode()
    assert token_bytes(tok, 0) == b"<s>"


def test_api_keys_are_masked_like_openai() -> None:
    assert mask_api_key("sk-WRQsP" + "a" * 39 + "xQBt") == "sk-WRQsP" + "*" * 39 + "xQBt"
    assert mask_api_key("sk-xxxxxx") == "sk-xxxxxx"


def test_tgi_streams_split_characters_whole(tok: Any) -> None:
    ids = tok.encode("日本", add_special_tokens=False)
    assert len(ids) == 6  # one byte per token
    assert tgi_token_texts(tok, [0], ids) == ["", "", "日", "", "", "本"]


# ---------------------------------------------------------------------------------------------
# OpenAI legacy completions
# ---------------------------------------------------------------------------------------------


def test_completion_validates_and_greedy_text_matches_transformers(
    completions: DialectServer, model: Any, tok: Any
) -> None:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 5}
    response = post(completions, "/completions", body)
    assert response.status_code == 200
    completion = Completion.model_validate(response.json())
    ids = tok.encode(PROMPT, add_special_tokens=False)  # OpenAI adds no BOS
    expected = greedy(model, ids, 8)
    choice = completion.choices[0]
    assert choice.text == tok.decode(without_eos(expected))
    assert choice.finish_reason == ("stop" if expected[-1] == EOS else "length")
    assert completion.usage is not None and completion.usage.prompt_tokens == len(ids)
    assert choice.logprobs is not None and choice.logprobs.text_offset is not None
    assert choice.logprobs.text_offset[0] == len(PROMPT)
    path, headers, recorded = completions.requests[-1]
    assert (path, recorded, headers["content-type"]) == (
        "/v1/completions",
        body,
        "application/json",
    )


def test_completion_logprobs_match_a_local_log_softmax(
    completions: DialectServer, model: Any
) -> None:
    ids = [0, 330, 74, 120]
    body = {"model": MODEL, "prompt": ids, "max_tokens": 5, "temperature": 0, "logprobs": 5}
    logprobs = post(completions, "/completions", body).json()["choices"][0]["logprobs"]
    context = list(ids)
    for position, top in enumerate(logprobs["top_logprobs"]):
        local = local_logprobs(model, context)
        chosen = int(local.argmax())
        assert logprobs["token_logprobs"][position] == pytest.approx(float(local[chosen]), abs=1e-5)
        expected = torch.topk(local, 5).values.tolist()
        assert sorted(top.values(), reverse=True) == pytest.approx(expected, abs=1e-5)
        context.append(chosen)


def test_the_sampled_token_joins_the_top_k(completions: DialectServer, base_dir: Path) -> None:
    body = {"model": MODEL, "prompt": "x", "max_tokens": 12, "temperature": 1.0, "seed": 3}
    body["logprobs"] = 1
    logprobs = post(completions, "/completions", body).json()["choices"][0]["logprobs"]
    assert {len(top) for top in logprobs["top_logprobs"]} == {1, 2}  # k+1 where not the best
    pairs = zip(logprobs["tokens"], logprobs["top_logprobs"], strict=True)
    assert all(token in top for token, top in pairs)
    with DialectServer("openai", base_dir, sampled_in_top=False) as server:
        logprobs = post(server, "/completions", body).json()["choices"][0]["logprobs"]
    assert {len(top) for top in logprobs["top_logprobs"]} == {1}


@pytest.mark.parametrize(
    ("mode", "piece"), [("openai", None), ("replacement", "\ufffd"), ("empty", "")]
)
def test_echo_spells_split_characters_per_mode(
    base_dir: Path, tok: Any, mode: Any, piece: str | None
) -> None:
    ids = tok.encode("日本", add_special_tokens=False)
    body = {"model": MODEL, "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 1}
    with DialectServer("openai", base_dir, partial_tokens=mode) as server:
        choice = post(server, "/completions", body).json()["choices"][0]
    logprobs = choice["logprobs"]
    hexes = ["e6", "97", "a5", "e6", "9c", "ac"]
    expected = [f"bytes:\\x{h}" for h in hexes] if piece is None else [piece] * 6
    assert logprobs["tokens"] == expected
    assert logprobs["text_offset"] == [0, 0, 0, 1, 1, 1]
    # The first prompt token has no context (real answers carry null, which openai-python's
    # types do not admit).
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert choice["text"] == "日本" and choice["finish_reason"] == "length"


def test_logprob_caps_answer_in_each_dialect_s_words(
    completions: DialectServer, chat: DialectServer, tgi: DialectServer
) -> None:
    response = post(completions, "/completions", {"model": MODEL, "prompt": "x", "logprobs": 6})
    assert response.status_code == 400
    assert response.json() == {
        "error": {
            "message": "Invalid 'logprobs': integer above maximum value. Expected a value <= 5, "
            "but got 6 instead.",
            "type": "invalid_request_error",
            "param": "logprobs",
            "code": "integer_above_max_value",
        }
    }
    messages = [{"role": "user", "content": "hi"}]
    body = {"model": MODEL, "messages": messages, "logprobs": True, "top_logprobs": 21}
    response = post(chat, "/chat/completions", body)
    assert response.status_code == 400
    assert response.json()["error"]["message"] == (
        "Invalid 'top_logprobs': integer above maximum value. Expected a value <= 20, "
        "but got 21 instead."
    )
    params = {"max_new_tokens": 1, "details": True, "top_n_tokens": 6}
    response = post(tgi, "/generate", {"inputs": "x", "parameters": params})
    assert response.status_code == 422
    assert response.json() == {
        "error": "Input validation error: `top_n_tokens` must be >= 0 and <= 5. Given: 6",
        "error_type": "validation",
    }
    body = {"model": MODEL, "prompt": "x", "logprobs": 5, "max_tokens": 1}
    assert post(completions, "/completions", body).status_code == 200


def test_auth_answers_like_openai(base_dir: Path) -> None:
    key = "sk-proj-right-key-0123456789"
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2, "logprobs": 2, "temperature": 0}
    with DialectServer("openai", base_dir, api_key=key) as server:
        missing = post(server, "/completions", body)
        wrong_key = "sk-wrong-0123456789abcdefWXYZ"
        auth = {"Authorization": f"Bearer {wrong_key}"}
        wrong = post(server, "/completions", body, headers=auth)
        client = openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0)
        completion = client.completions.create(**body)
        models = client.models.list()
        with pytest.raises(openai.AuthenticationError):
            client.with_options(api_key="sk-nope").completions.create(**body)
        assert server.requests[-1][1]["authorization"] == "Bearer sk-nope"
    assert missing.status_code == 401
    assert missing.json()["error"]["message"].startswith("You didn't provide an API key.")
    assert wrong.status_code == 401
    assert wrong.json() == {
        "error": {
            "message": f"Incorrect API key provided: sk-wrong{'*' * 17}WXYZ. {KEY_HELP}",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
    assert completion.choices[0].logprobs is not None
    assert [m.id for m in models.data] == [MODEL]


def test_refused_logprobs_and_unknown_models(base_dir: Path, completions: DialectServer) -> None:
    refusal = {
        "error": {
            "message": "You are not allowed to request logprobs from this model",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }
    with DialectServer("openai", base_dir, refuse_logprobs=True) as server:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
        assert post(server, "/completions", {**body, "logprobs": 0}).json() == refusal
        assert post(server, "/completions", {**body, "logprobs": 0}).status_code == 403
        assert post(server, "/completions", body).status_code == 200
    response = post(completions, "/completions", {"model": "gpt-4", "prompt": "x"})
    assert response.status_code == 404
    assert response.json()["error"] == {
        "message": "The model `gpt-4` does not exist or you do not have access to it.",
        "type": "invalid_request_error",
        "param": None,
        "code": "model_not_found",
    }
    response = post(completions, "/completions", {"model": MODEL, "prompt": "x", "top_k": 3})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "Unrecognized request argument supplied: top_k"


def test_context_length_is_enforced(base_dir: Path) -> None:
    with DialectServer("openai", base_dir, max_context=8) as server:
        body = {"model": MODEL, "prompt": [5, 6, 7, 8, 9, 10], "max_tokens": 4}
        response = post(server, "/completions", body)
    assert response.status_code == 400
    assert response.json()["error"]["message"] == (
        "This model's maximum context length is 8 tokens, however you requested 10 tokens "
        "(6 in your prompt; 4 for the completion). Please reduce your prompt; or completion length."
    )
    with DialectServer("openai-chat", base_dir, max_context=8) as server:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        error = post(server, "/chat/completions", body).json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert error["message"].startswith("This model's maximum context length is 8 tokens.")


def test_a_tiktoken_encoding_can_stand_in_for_the_tokenizer(
    base_dir: Path, completions: DialectServer, tok: Any
) -> None:
    # The tiny vocabulary as a tiktoken Encoding: byte strings ranked by id.
    ranks = {token_bytes(tok, i): i for i in range(3, len(tok))}
    encoding = tiktoken.Encoding(
        "tiny",
        pat_str=r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
        mergeable_ranks=ranks,
        special_tokens={"<s>": 0, "</s>": 1, "<pad>": 2},
    )
    body = {"model": MODEL, "prompt": "héllo 日本", "max_tokens": 4, "temperature": 0}
    body["logprobs"] = 3
    with DialectServer("openai", base_dir, tokenizer=encoding) as server:
        plugged = post(server, "/completions", body).json()["choices"]
    assert plugged == post(completions, "/completions", body).json()["choices"]


def test_fail_next_uses_each_dialect_s_error_shape(
    completions: DialectServer, tgi: DialectServer
) -> None:
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    completions.fail_next(429, 503)
    limited = post(completions, "/completions", body)
    overloaded = post(completions, "/completions", body)
    assert post(completions, "/completions", body).status_code == 200
    assert limited.status_code == 429
    assert (limited.headers["retry-after-ms"], limited.headers["retry-after"]) == ("20", "1")
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert limited.json()["error"]["type"] == "requests"
    assert overloaded.status_code == 503
    assert overloaded.json()["error"]["type"] == "server_error"

    tgi.fail_next(429, 500)
    assert get(tgi, "/info").status_code == 200  # only generation fails
    generate = {"inputs": "x", "parameters": {"max_new_tokens": 1}}
    limited = post(tgi, "/generate", generate)
    failed = post(tgi, "/generate", generate)
    assert limited.status_code == 429
    assert limited.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
    assert "retry-after" not in limited.headers and "retry-after-ms" not in limited.headers
    assert failed.status_code == 500
    assert failed.json() == {
        "error": "Incomplete generation",
        "error_type": "incomplete_generation",
    }
    assert post(tgi, "/generate", generate).status_code == 200


# ---------------------------------------------------------------------------------------------
# OpenAI chat completions
# ---------------------------------------------------------------------------------------------


def test_chat_validates_and_matches_transformers(chat: DialectServer, model: Any, tok: Any) -> None:
    # A trailing assistant message is not continued: a fresh assistant turn is opened after it.
    messages = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hel"}]
    body = {"model": MODEL, "messages": messages, "max_completion_tokens": 6, "temperature": 0}
    response = post(chat, "/chat/completions", {**body, "logprobs": True, "top_logprobs": 3})
    completion = ChatCompletion.model_validate(response.json())
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok.encode(rendered, add_special_tokens=False)
    assert rendered.endswith("Hel\n<|assistant|>\n")
    assert chat.conversations[-1] == messages  # rendered with the roles received
    assert completion.usage is not None and completion.usage.prompt_tokens == len(ids)
    expected = without_eos(greedy(model, ids, 6))
    choice = completion.choices[0]
    assert choice.message.content == tok.decode(expected)
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert [bytes(c.bytes or []) for c in content] == [token_bytes(tok, t) for t in expected]
    local = local_logprobs(model, ids)
    assert content[0].logprob == pytest.approx(float(local[expected[0]]), abs=1e-5)
    top = [t.logprob for t in content[0].top_logprobs]
    assert top == pytest.approx(torch.topk(local, 3).values.tolist(), abs=1e-5)
    assert all(len(c.top_logprobs) == 3 for c in content)
    plain = post(chat, "/chat/completions", body).json()["choices"][0]
    assert plain["logprobs"] is None


def test_chat_refuses_logprobs_when_told(base_dir: Path) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    with DialectServer("openai-chat", base_dir, refuse_logprobs=True) as server:
        assert post(server, "/chat/completions", {**body, "logprobs": True}).status_code == 403
        assert post(server, "/chat/completions", body).status_code == 200


# ---------------------------------------------------------------------------------------------
# TGI
# ---------------------------------------------------------------------------------------------


def test_tgi_greedy_details_match_transformers(tgi: DialectServer, model: Any, tok: Any) -> None:
    params = {"max_new_tokens": 6, "details": True, "top_n_tokens": 3}
    response = post(tgi, "/generate", {"inputs": PROMPT, "parameters": params})
    assert response.status_code == 200
    answer = response.json()
    ids = tok.encode(PROMPT)  # TGI adds the BOS
    expected = greedy(model, ids, 6)
    details = answer["details"]
    assert set(answer) == {"generated_text", "details"}
    fields = {"finish_reason", "generated_tokens", "seed", "prefill", "tokens", "top_tokens"}
    assert set(details) == fields
    assert [t["id"] for t in details["tokens"]] == expected
    assert answer["generated_text"] == tok.decode(expected, skip_special_tokens=True)
    assert details["seed"] is None and details["prefill"] == []
    assert details["finish_reason"] == ("eos_token" if expected[-1] == EOS else "length")
    context = list(ids)
    for token, top in zip(details["tokens"], details["top_tokens"], strict=True):
        local = local_logprobs(model, context)
        assert token["logprob"] == pytest.approx(float(local[token["id"]]), abs=1e-5)
        values = [t["logprob"] for t in top]
        assert values == pytest.approx(torch.topk(local, 3).values.tolist(), abs=1e-5)
        context.append(token["id"])


def test_tgi_reports_logprobs_after_its_warpers(tgi: DialectServer, model: Any, tok: Any) -> None:
    logits = local_logits(model, tok.encode(PROMPT))
    params = {"max_new_tokens": 1, "details": True, "top_n_tokens": 5, "seed": 7}
    warm = post(tgi, "/generate", {"inputs": PROMPT, "parameters": {**params, "temperature": 0.5}})
    details = warm.json()["details"]
    token = details["tokens"][0]
    tempered = torch.log_softmax(logits / 0.5, dim=-1)
    assert token["logprob"] == pytest.approx(float(tempered[token["id"]]), abs=1e-5)
    assert token["logprob"] != pytest.approx(float(torch.log_softmax(logits, -1)[token["id"]]))
    assert details["seed"] == 7  # a warper turns sampling on

    top_k = post(tgi, "/generate", {"inputs": PROMPT, "parameters": {**params, "top_k": 2}})
    top = top_k.json()["details"]["top_tokens"][0]
    assert len(top) == 2  # masked tokens never come back, so fewer than top_n
    assert sum(math.exp(t["logprob"]) for t in top) == pytest.approx(1.0)


def test_tgi_info_prefill_and_validation(tgi: DialectServer, base_dir: Path) -> None:
    info = get(tgi, "/info").json()
    assert "max_top_n_tokens" not in info
    assert (info["max_input_tokens"], info["max_total_tokens"]) == (2047, 2048)
    params = {"max_new_tokens": 1, "decoder_input_details": True}
    prefill = post(tgi, "/generate", {"inputs": "日本", "parameters": params}).json()
    prefill = prefill["details"]["prefill"]
    assert [p["text"] for p in prefill] == ["<s>"] + ["\ufffd"] * 6
    assert prefill[0]["logprob"] is None and all(p["logprob"] < 0 for p in prefill[1:])
    bad = post(tgi, "/generate", {"inputs": "x", "parameters": {"temperature": 0}})
    assert bad.status_code == 422
    assert bad.json()["error"] == "Input validation error: `temperature` must be strictly positive"
    with DialectServer("tgi", base_dir, api_key="secret") as server:
        generate = {"inputs": "x", "parameters": {"max_new_tokens": 1}}
        unauthorized = post(server, "/generate", generate)
        assert (unauthorized.status_code, unauthorized.content) == (401, b"")
        assert get(server, "/info").status_code == 200
        ok = post(server, "/generate", generate, headers={"Authorization": "bearer SECRET"})
        assert ok.status_code == 200  # TGI compares the header case-insensitively
