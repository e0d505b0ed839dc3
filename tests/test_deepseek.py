"""The deepseek adapter: payloads and parsing of literal JSON in DeepSeek's documented shape, its
errors, and, against a server that speaks DeepSeek's beta chat prefix completion with the real tiny
model (tests/support/dialect_deepseek.py), the same equivalence every adapter meets: with k = 20 and
`restrict`, proxy-tuned greedy output equals the local reference restricted to that top-k."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from openai.types.chat import ChatCompletion

from proxyclient import connect
from proxyclient.adapters.base import Prompt, ServerUsage
from proxyclient.adapters.deepseek import DeepSeekChat, degenerate
from proxyclient.errors import (
    AuthenticationError,
    BadRequestError,
    BaseModelError,
    NotFoundError,
    ResponseFormatError,
    TopKTooLargeError,
)
from proxyclient.tokenizer import BaseTokenizer
from tests.support import dialect_deepseek  # noqa: F401  (registers the "deepseek" fixture dialect)
from tests.support.dialect_deepseek import DEGENERATE, REASONER, THINKING
from tests.support.dialect_servers import DialectServer
from tests.support.hosted import (
    alpha_0_text,
    assert_one_clear_error,
    connected,
    dialect_cli,
    dialect_tuner,
    headers_sent,
    ids_of,
    run_step,
)
from tests.support.reference import (
    assert_chat_tuner_equals_the_formula,
    assert_greedy_drafts,
    chat_server_sees,
)

PROMPTS = ["def main():", "import os\nclass Foo(object):\n    "]
N_TOKENS = 10
K = 20
KEY = "sk-deepseek-dialect-test-0123"
MODEL = "tiny-base"
EOS = frozenset({1})


@pytest.fixture(scope="module")
def tokenizer(hf_models) -> BaseTokenizer:
    return BaseTokenizer(hf_models["tokenizer"])


@pytest.fixture(scope="module")
def deepseek(tiny_models):
    with DialectServer("deepseek", tiny_models["base"], api_key=KEY) as server:
        yield server


def adapter(tokenizer, **options) -> DeepSeekChat:
    return connect("deepseek", None, "deepseek-chat", tokenizer=tokenizer, **options)


# ---------------------------------------------------------------------------------------------
# Payloads and parsing (literal JSON)
# ---------------------------------------------------------------------------------------------


def test_the_dialect_facts(tokenizer):
    assert DeepSeekChat.dialect == "deepseek" and DeepSeekChat.needs_tokenizer
    assert DeepSeekChat.default_base_url == "https://api.deepseek.com/beta"
    assert DeepSeekChat.api_key_env == "DEEPSEEK_API_KEY"
    assert DeepSeekChat.api_key_header == ("Authorization", "Bearer {key}")
    base = adapter(tokenizer)
    assert base.transport.base_url == "https://api.deepseek.com/beta"
    assert base.capabilities.multi_step and base.capabilities.drafts
    assert base.capabilities.max_k == 20 and not base.capabilities.prompt_scoring


def test_payload_continues_the_answer_as_an_assistant_prefix(tokenizer):
    ids = tuple(tokenizer.encode("Q?"))
    answer = tuple(tokenizer.encode(" A", add_special_tokens=False))
    path, first = adapter(tokenizer).build_request(Prompt(ids, len(ids)), 20)
    assert path == "/chat/completions"
    assert first == {
        "model": "deepseek-chat", "messages": [{"role": "user", "content": "Q?"}],
        "max_tokens": 1, "temperature": 1.0, "logprobs": True, "top_logprobs": 20,
        "thinking": {"type": "disabled"},
    }  # fmt: skip
    _, later = adapter(tokenizer).build_request(Prompt(ids + answer, len(ids)), 20)
    assert later["messages"][-1] == {"role": "assistant", "content": " A", "prefix": True}
    _, plain = adapter(tokenizer, thinking=None).build_request(Prompt(ids, len(ids)), 20)
    assert "thinking" not in plain


def test_a_conversation_goes_with_its_roles_and_the_answer_as_the_prefix(tokenizer):
    conversation = (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Q?"},
        {"role": "assistant", "content": "A."},
        {"role": "user", "content": "And?"},
    )
    # The prompt's ids (the base's rendering) are not what is sent: the messages are.
    _, first = adapter(tokenizer).build_request(Prompt((7, 8), 2, conversation), 20)
    assert first["messages"] == list(conversation)
    answer = tuple(tokenizer.encode(" B", add_special_tokens=False))
    prompt = Prompt((7, 8, *answer), 2, conversation, " So")
    _, later = adapter(tokenizer).build_generate(prompt, 20, 3, greedy=True, seed=None)
    assert later["messages"] == [
        *conversation,
        {"role": "assistant", "content": " So B", "prefix": True},
    ]
    _, prefixed = adapter(tokenizer).build_request(Prompt((7, 8), 2, conversation, " So"), 20)
    assert prefixed["messages"][-1] == {"role": "assistant", "content": " So", "prefix": True}


def test_drafts_are_greedy_or_sampled_and_send_no_seed(tokenizer):
    ids = tuple(tokenizer.encode("Q?"))
    base = adapter(tokenizer)
    _, greedy = base.build_generate(Prompt(ids, len(ids)), 5, 6, greedy=True, seed=3)
    assert (greedy["max_tokens"], greedy["temperature"], greedy["top_p"]) == (6, 0.0, 1.0)
    _, sampled = base.build_generate(Prompt(ids, len(ids)), 5, 6, greedy=False, seed=3)
    assert sampled["temperature"] == 1.0 and "seed" not in sampled


def chat_answer(positions, *, usage=None, message=None) -> dict:
    """DeepSeek's answer: OpenAI's chat shape, with DeepSeek's usage fields."""

    def entry(token, logprob):
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    content = [
        {**entry(*chosen), "top_logprobs": [entry(*e) for e in top]} for chosen, top in positions
    ]
    return {
        "id": "x", "object": "chat.completion", "created": 0, "model": "deepseek-chat",
        "choices": [{"index": 0, "finish_reason": "length",
                     "message": message or {"role": "assistant", "content": "x"},
                     "logprobs": {"content": content}}],
        "usage": usage or {"prompt_tokens": 70, "completion_tokens": 2, "total_tokens": 72,
                           "prompt_cache_hit_tokens": 64, "prompt_cache_miss_tokens": 6},
    }  # fmt: skip


def test_parse_rebuilds_tokens_from_bytes_and_reads_the_cache_hits(tokenizer):
    body = chat_answer([
        (("def", -0.1), [("def", -0.1), (" return", -2.5), ("(", -3.0)]),
        ((" return", -0.2), [(" return", -0.2), (":", -1.9)]),
    ])  # fmt: skip
    base = adapter(tokenizer)
    top = base.parse_response(body, Prompt((0,), 1), 2)
    assert list(top.token_ids) == ids_of(tokenizer, "def", "Ġreturn")
    got = base.parse_generate(body, Prompt((0,), 1), 20)
    assert list(got.tokens) == ids_of(tokenizer, "def", "Ġreturn")
    assert got.token_logprobs == (-0.1, -0.2)
    assert got.usage == ServerUsage(70, 2, 64)  # prompt_cache_hit_tokens


@pytest.mark.parametrize(
    ("logprobs", "expected"),
    [
        ([0.0, -9999.0, -9999.0], True),
        ([0.0, 0.0], True),
        ([-9999.0, -9999.0], True),
        ([0.0], False),  # one entry of probability 1 can be true
        ([0.0, -12.5], False),
        ([-0.1, -9999.0], False),
    ],
)
def test_degenerate_top_logprobs_are_recognised(logprobs, expected):
    assert degenerate([{"token": str(i), "logprob": lp} for i, lp in enumerate(logprobs)]) is (
        expected
    )


def test_an_answer_without_information_is_an_error_not_a_step(tokenizer):
    body = chat_answer([(("def", 0.0), [("def", 0.0), (" return", -9999.0), ("(", -9999.0)])])
    with pytest.raises(ResponseFormatError, match=r"carry no information .*0 or -9999"):
        adapter(tokenizer).parse_response(body, Prompt((0,), 1), 3)


def test_a_thinking_answer_names_the_model_and_the_fix(tokenizer):
    message = {"role": "assistant", "content": "x", "reasoning_content": "Hmm, the user..."}
    body = chat_answer([(("x", -0.1), [("x", -0.1), ("y", -2.0)])], message=message)
    with pytest.raises(BaseModelError, match=r"'deepseek-chat' answered in thinking mode.*"
                       r"use deepseek-chat \(not deepseek-reasoner\)"):  # fmt: skip
        adapter(tokenizer).parse_response(body, Prompt((0,), 1), 2)


@pytest.mark.parametrize(
    "body",
    [
        {"choices": [{"message": {"content": "x"}, "logprobs": None}]},
        {"choices": [{"message": {"content": "x"}, "logprobs": {"content": [{"token": "x"}]}}]},
    ],
)
def test_an_answer_without_logprobs_is_a_clear_error(tokenizer, body):
    with pytest.raises(ResponseFormatError, match="deepseek-reasoner does not; deepseek-chat"):
        adapter(tokenizer).parse_response(body, Prompt((0,), 1), 5)


# ---------------------------------------------------------------------------------------------
# Errors, as DeepSeek words them
# ---------------------------------------------------------------------------------------------


def failing(tokenizer, status: int, message: str, type_: str = "invalid_request_error"):
    body = {"error": {"message": message, "type": type_, "param": None, "code": type_}}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":  # GET /models
            models = {"object": "list", "data": [{"id": "deepseek-chat", "object": "model"}]}
            return httpx.Response(200, json=models)
        return httpx.Response(status, json=body)

    return adapter(
        tokenizer, api_key="sk-mock-key-0000", transport=httpx.MockTransport(handler), max_retries=0
    )


@pytest.mark.parametrize(
    ("status", "message", "kind", "advice"),
    [
        (400, "Invalid top_logprobs value, the valid range of top_logprobs is [0, 20]",
         TopKTooLargeError, "pass base_k=20 or less"),
        (400, "deepseek-reasoner does not support the parameter `logprobs`", BadRequestError,
         "use deepseek-chat (not deepseek-reasoner)"),
        (400, "Model Not Exist", NotFoundError,
         "has no model 'deepseek-chat': the server serves ['deepseek-chat']"),
        (401, "Authentication Fails, Your api key: ****0000 is invalid", AuthenticationError,
         "set DEEPSEEK_API_KEY"),
        (402, "Insufficient Balance", Exception, "top it up"),
    ],
)  # fmt: skip
def test_errors_say_what_to_do(tokenizer, status, message, kind, advice):
    with pytest.raises(kind) as e:
        run_step(failing(tokenizer, status, message), Prompt((0, 5), 2), 25)
    assert message in str(e.value) and advice in str(e.value) and "\n" not in str(e.value)
    if kind is TopKTooLargeError:
        assert e.value.server_max == 20


# ---------------------------------------------------------------------------------------------
# Against the fixture server
# ---------------------------------------------------------------------------------------------


def connect_deepseek(server, tokenizer, model=MODEL, **options):
    options.setdefault("api_key", KEY)
    return connected("deepseek", server, tokenizer, model, **options)


def tuner_for(server, tiny_models, tokenizer, model=MODEL, **options):
    return dialect_tuner("deepseek", server, tiny_models, tokenizer, model, api_key=KEY, **options)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_deepseek_equals_the_formula_on_its_top_20(
    deepseek, tiny_models, hf_models, tokenizer, prompt
):
    with tuner_for(deepseek, tiny_models, tokenizer) as tuner:
        got = assert_chat_tuner_equals_the_formula(
            tuner, hf_models, prompt, max_new_tokens=N_TOKENS, k=K, eos_ids=EOS
        )
    # Tokens come with their bytes, so even part of a character is identified.
    assert got.usage.dropped_candidates == 0


def fixture_greedy_text(server, prompt: str, n: int) -> str:
    answer = httpx.post(
        f"{server.base_url}/chat/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={
            "model": MODEL, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": n, "temperature": 0.0, "thinking": {"type": "disabled"},
        },
        timeout=60,
    ).json()  # fmt: skip
    return answer["choices"][0]["message"]["content"]


def test_the_fixture_answers_in_openais_chat_shape_with_deepseeks_usage(deepseek):
    answer = httpx.post(
        f"{deepseek.base_url}/chat/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={
            "model": MODEL, "messages": [{"role": "user", "content": PROMPTS[0]}],
            "max_tokens": 3, "logprobs": True, "top_logprobs": 3, "thinking": {"type": "disabled"},
        },
        timeout=60,
    ).json()  # fmt: skip
    completion = ChatCompletion.model_validate(answer)
    content = completion.choices[0].logprobs.content
    assert content and all(len(position.top_logprobs) == 3 for position in content)
    usage = answer["usage"]
    assert (
        usage["prompt_cache_hit_tokens"] + usage["prompt_cache_miss_tokens"]
        == (usage["prompt_tokens"])
    )


@pytest.mark.parametrize("speculate", ["off", "base"])
def test_alpha_0_greedy_is_the_servers_own_greedy_text(deepseek, tiny_models, tokenizer, speculate):
    tuner = tuner_for(deepseek, tiny_models, tokenizer)
    got = alpha_0_text(tuner, PROMPTS[0], N_TOKENS, K, speculate)
    assert got == fixture_greedy_text(deepseek, PROMPTS[0], N_TOKENS)


def test_the_key_travels_as_a_bearer_token(deepseek, tiny_models, tokenizer):
    headers = headers_sent(deepseek, tuner_for(deepseek, tiny_models, tokenizer), PROMPTS[0], K)
    assert headers and all(h.get("authorization") == f"Bearer {KEY}" for h in headers)
    with (
        connect_deepseek(deepseek, tokenizer, api_key="sk-wrong-key-1234") as base,
        pytest.raises(AuthenticationError, match=r"\*\*\*\*1234 is invalid.*DEEPSEEK_API_KEY"),
    ):
        run_step(base, Prompt(tuple(tokenizer.encode("x")), 2))


def test_generate_drafts_the_servers_greedy_continuation_with_each_top_k(
    deepseek, tokenizer, hf_models
):
    ids = tuple(tokenizer.encode(PROMPTS[1]))
    with connect_deepseek(deepseek, tokenizer) as base:
        got = asyncio.run(base.generate(Prompt(ids, len(ids)), K, 6, greedy=True))
    context = chat_server_sees(hf_models["tokenizer"], PROMPTS[1])([])
    assert_greedy_drafts(got, hf_models["base"], context, n=6, k=K, eos_ids=EOS)
    assert got.usage.prompt_tokens == len(context)


def test_the_prefix_cache_hits_reach_the_usage(deepseek, tokenizer):
    long_prompt = "def f(x):\n    return x + 1\n" * 12  # well over one 64-token cache unit
    ids = tuple(tokenizer.encode(long_prompt))

    async def twice(base):
        first = await base.generate(Prompt(ids, len(ids)), 5, 2, greedy=True)
        second = await base.generate(Prompt(ids, len(ids)), 5, 2, greedy=True)
        return first.usage, second.usage

    with connect_deepseek(deepseek, tokenizer) as base:
        first, second = asyncio.run(twice(base))
    assert second.prompt_tokens == first.prompt_tokens > 128
    assert second.cached_prompt_tokens == second.prompt_tokens // 64 * 64 > 0


@pytest.mark.parametrize(
    ("model", "kind", "match"),
    [
        (REASONER, BadRequestError,
         r"HTTP 400: deepseek-reasoner does not support the parameter `logprobs` — model "
         r"'deepseek-reasoner' thinks before it answers, .*: use deepseek-chat"),
        (MODEL + THINKING, BaseModelError,
         r"'tiny-base-thinking' answered in thinking mode .*use deepseek-chat"),
        (MODEL + DEGENERATE, ResponseFormatError,
         r"carry no information \(every entry is 0 or -9999: .*\b2 attempts"),
        ("deepseek-v9", NotFoundError, r"HTTP 400: Model Not Exist — DeepSeek has no model"),
    ],
)  # fmt: skip
def test_models_without_usable_logprobs_are_named_with_the_fix(
    deepseek, tokenizer, model, kind, match
):
    ids = tuple(tokenizer.encode(PROMPTS[0]))
    with (
        connect_deepseek(deepseek, tokenizer, model=model, max_retries=1) as base,
        pytest.raises(kind, match=match),
    ):
        run_step(base, Prompt(ids, len(ids)), K)


def test_thinking_left_on_is_refused(deepseek, tokenizer):
    ids = tuple(tokenizer.encode(PROMPTS[0]))
    with (
        connect_deepseek(deepseek, tokenizer, thinking=None) as base,
        pytest.raises(BaseModelError, match="answered in thinking mode"),
    ):
        run_step(base, Prompt(ids, len(ids)), K)


# ---------------------------------------------------------------------------------------------
# The CLI
# ---------------------------------------------------------------------------------------------


def cli(tiny_models, *args):
    return dialect_cli("deepseek", "DEEPSEEK_API_KEY", KEY, tiny_models, *args)


@pytest.mark.subprocess
def test_cli_inspect_reports_what_deepseek_can_do(deepseek, tiny_models):
    run = cli(tiny_models, "inspect", "--base-url", deepseek.base_url, "--base-model", MODEL)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["api"] == "deepseek" and report["max_k"] == 20 and report["default_k"] == 20
    assert report["multi_step"] is True and report["drafts"] is True
    assert report["prompt_scoring"] is False and report["token_id_prompts"] is False


@pytest.mark.subprocess
@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (REASONER, "use deepseek-chat (not deepseek-reasoner)"),
        ("deepseek-v9", "HTTP 400: Model Not Exist — DeepSeek has no model 'deepseek-v9'"),
    ],
)
def test_cli_bad_models_exit_2_with_one_clear_message(deepseek, tiny_models, model, expected):
    run = cli(tiny_models, "inspect", "--base-url", deepseek.base_url, "--base-model", model)
    assert_one_clear_error(run, expected)
