"""The gemini adapter: payloads and parsing of literal JSON in the documented shape, its errors,
and, against a server that speaks Gemini's generateContent with the real tiny model
(tests/support/dialect_gemini.py), the same equivalence every adapter meets: with k = 20 and
`restrict`, proxy-tuned greedy output equals the local reference restricted to that top-k."""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
import pytest

from proxyclient import connect
from proxyclient.adapters.base import Prompt, ServerUsage
from proxyclient.adapters.gemini import GeminiGenerateContent
from proxyclient.errors import (
    AuthenticationError,
    BadRequestError,
    BaseModelError,
    ConfigError,
    ResponseFormatError,
    TopKTooLargeError,
)
from proxyclient.tokenizer import BaseTokenizer
from tests.support import dialect_gemini  # noqa: F401  (registers the "gemini" fixture dialect)
from tests.support.dialect_gemini import MODEL_TURN_REFUSED, NO_LOGPROBS, NO_PREFILL
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
KEY = "AIzaSy-dialect-test-0123456789"
MOCK_KEY = "AIzaSy-mock-key-9876"
MODEL = "tiny-base"
EOS = frozenset({1})


@pytest.fixture(scope="module")
def tokenizer(hf_models) -> BaseTokenizer:
    return BaseTokenizer(hf_models["tokenizer"])


@pytest.fixture(scope="module")
def gemini(tiny_models):
    with DialectServer("gemini", tiny_models["base"], api_key=KEY) as server:
        yield server


@pytest.fixture(scope="module")
def denying(tiny_models):
    """A key whose project may not read logprobs: 403 PERMISSION_DENIED."""
    with DialectServer("gemini", tiny_models["base"], refuse_logprobs=True) as server:
        yield server


def adapter(tokenizer, **options) -> GeminiGenerateContent:
    return connect(
        "gemini", "https://gemini.test/v1beta", "gemini-x", tokenizer=tokenizer, **options
    )


def mock(tokenizer, answer, **options) -> tuple[GeminiGenerateContent, list]:
    """An adapter whose server answers ``answer(request) -> (status, json)``; the first request
    (whether a trailing model turn is continued) is answered 200."""
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        seen.append((request.method, request.url.path, dict(request.headers), body))
        if body and body["contents"][-1]["parts"][0]["text"] == "Hello":
            return httpx.Response(200, json={"candidates": [{"finishReason": "MAX_TOKENS"}]})
        status, payload = answer(request)
        return httpx.Response(status, json=payload)

    base = adapter(
        tokenizer,
        api_key=MOCK_KEY,
        transport=httpx.MockTransport(handler),
        max_retries=0,
        **options,
    )
    return base, seen


def error(code: int, message: str, status: str) -> dict:
    return {"error": {"code": code, "message": message, "status": status}}


# ---------------------------------------------------------------------------------------------
# Payloads and parsing (literal JSON)
# ---------------------------------------------------------------------------------------------


def test_the_dialect_facts():
    assert GeminiGenerateContent.dialect == "gemini" and GeminiGenerateContent.needs_tokenizer
    assert GeminiGenerateContent.default_base_url == (
        "https://generativelanguage.googleapis.com/v1beta"
    )
    assert GeminiGenerateContent.api_key_env == "GEMINI_API_KEY"
    assert GeminiGenerateContent.api_key_header == ("x-goog-api-key", "{key}")


def test_payload_puts_the_prompt_in_a_user_turn_and_the_answer_in_a_model_turn(tokenizer):
    ids = tuple(tokenizer.encode("Q?"))
    answer = tuple(tokenizer.encode(" A", add_special_tokens=False))
    gemini = adapter(tokenizer)
    assert gemini.capabilities.multi_step and gemini.capabilities.drafts
    assert gemini.capabilities.max_k == 20 and not gemini.capabilities.ids_in_response
    path, first = gemini.build_request(Prompt(ids, len(ids)), 20)
    assert path == "/models/gemini-x:generateContent"
    assert first == {
        "contents": [{"role": "user", "parts": [{"text": "Q?"}]}],
        "generationConfig": {
            "responseLogprobs": True, "logprobs": 20, "maxOutputTokens": 1, "temperature": 1.0,
            "topP": 1.0, "candidateCount": 1,
        },
    }  # fmt: skip
    _, later = gemini.build_request(Prompt(ids + answer, len(ids)), 20)
    assert later["contents"][-1] == {"role": "model", "parts": [{"text": " A"}]}
    # A "models/" prefix, as ListModels names them, is not doubled in the path.
    assert adapter_named(tokenizer, "models/gemini-x").path == "/models/gemini-x:generateContent"


CONVERSATION = (
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Q?"},
    {"role": "assistant", "content": "A."},
    {"role": "user", "content": "And?"},
)


def test_a_conversation_goes_as_system_instruction_and_turns(tokenizer):
    gemini = adapter(tokenizer)
    # The prompt's ids (the base's rendering) are not what is sent: the messages are.
    _, first = gemini.build_request(Prompt((7, 8), 2, CONVERSATION), 20)
    assert first["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert first["contents"] == [
        {"role": "user", "parts": [{"text": "Q?"}]},
        {"role": "model", "parts": [{"text": "A."}]},
        {"role": "user", "parts": [{"text": "And?"}]},
    ]
    answer = tuple(tokenizer.encode(" B", add_special_tokens=False))
    _, later = gemini.build_generate(
        Prompt((7, 8, *answer), 2, CONVERSATION, " So"), 20, 3, greedy=True, seed=None
    )
    assert later["contents"][-1] == {"role": "model", "parts": [{"text": " So B"}]}
    _, prefixed = gemini.build_request(Prompt((7, 8), 2, CONVERSATION, " So"), 20)
    assert prefixed["contents"][-1] == {"role": "model", "parts": [{"text": " So"}]}
    # A text prompt has no system instruction.
    assert "systemInstruction" not in gemini.build_request(Prompt((7, 8), 2), 20)[1]
    with pytest.raises(ConfigError, match="end them with a user turn"):
        gemini.build_request(Prompt((7, 8), 2, CONVERSATION[:3]), 20)


def test_a_response_prefix_needs_a_model_that_continues(tokenizer):
    good = answer_with([[("def", 1, -0.1)]], [("def", 1, -0.1)])
    base, _ = mock(tokenizer, lambda r: (200, good), continue_model_turn=False)
    with pytest.raises(ConfigError, match="response_prefix is a partial answer too"):
        run_step(base, Prompt((7, 8), 2, CONVERSATION, " So"))
    base, _ = mock(tokenizer, lambda r: (200, good), continue_model_turn=False)
    assert run_step(base, Prompt((7, 8), 2, CONVERSATION)).token_ids


def adapter_named(tokenizer, model: str) -> GeminiGenerateContent:
    return connect("gemini", "https://gemini.test/v1beta", model, tokenizer=tokenizer)


def test_drafts_are_greedy_or_seeded_samples(tokenizer):
    ids = tuple(tokenizer.encode("Q?"))
    gemini = adapter(tokenizer, thinking_budget=0)
    _, greedy = gemini.build_generate(Prompt(ids, len(ids)), 5, 6, greedy=True, seed=3)
    config = greedy["generationConfig"]
    assert (config["maxOutputTokens"], config["temperature"], config["logprobs"]) == (6, 0.0, 5)
    assert "seed" not in config and config["thinkingConfig"] == {"thinkingBudget": 0}
    _, sampled = gemini.build_generate(Prompt(ids, len(ids)), 5, 6, greedy=False, seed=3)
    assert {"temperature": 1.0, "topP": 1.0, "seed": 3}.items() <= sampled[
        "generationConfig"
    ].items()


def answer_with(tops, chosen, **extra) -> dict:
    def entry(token, token_id, logprob):
        return {"token": token, "tokenId": token_id, "logProbability": logprob}

    return {
        "candidates": [{
            "content": {"role": "model", "parts": [{"text": "".join(c[0] for c in chosen)}]},
            "finishReason": "MAX_TOKENS",
            "avgLogprobs": -0.5,
            "logprobsResult": {
                "topCandidates": [{"candidates": [entry(*e) for e in top]} for top in tops],
                "chosenCandidates": [entry(*c) for c in chosen],
            },
            "index": 0,
        }],
        "usageMetadata": {"promptTokenCount": 7, "candidatesTokenCount": len(chosen),
                          "totalTokenCount": 7 + len(chosen)},
        "modelVersion": "gemini-x",
        **extra,
    }  # fmt: skip


def test_parse_maps_token_text_to_ids_whatever_tokenid_says(tokenizer):
    # tokenId is Gemini's own vocabulary: the ids come from the text. A token that is part of a
    # character comes back as U+FFFD and is counted, not guessed.
    body = answer_with(
        [[("def", 9001, -0.5), (" return", 9002, -1.0), ("\ufffd", 9003, -2.0), ("(", 9004, -3.0)]],
        [("def", 9001, -0.5)],
    )
    top = adapter(tokenizer).parse_response(body, Prompt((0,), 1), 20)
    assert list(top.token_ids) == ids_of(tokenizer, "def", "Ġreturn", "(")
    assert top.logprobs == (-0.5, -1.0, -3.0) and top.unresolved == 1
    assert adapter(tokenizer).parse_response(body, Prompt((0,), 1), 2).token_ids == tuple(
        ids_of(tokenizer, "def", "Ġreturn")
    )


def test_parse_generate_gives_every_position_and_the_usage(tokenizer):
    body = answer_with(
        [[("def", 1, -0.1), ("(", 2, -2.5)], [(" return", 3, -0.2), (":", 4, -1.9)]],
        [("def", 1, -0.1), (" return", 3, -0.2)],
    )
    body["usageMetadata"]["cachedContentTokenCount"] = 4
    got = adapter(tokenizer).parse_generate(body, Prompt((0,), 1), 20)
    assert list(got.tokens) == ids_of(tokenizer, "def", "Ġreturn")
    assert [list(t.token_ids) for t in got.tops] == [
        ids_of(tokenizer, "def", "("), ids_of(tokenizer, "Ġreturn", ":")
    ]  # fmt: skip
    assert got.token_logprobs == (-0.1, -0.2)
    assert got.usage == ServerUsage(7, 2, 4)
    stopped = {"candidates": [{"content": {"role": "model"}, "finishReason": "STOP"}]}
    assert len(adapter(tokenizer).parse_generate(stopped, Prompt((0,), 1), 20)) == 0


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({"candidates": [{"content": {"parts": [{"text": "x"}]}, "finishReason": "MAX_TOKENS"}]},
         "no logprobsResult.topCandidates .*MAX_TOKENS.* allow logprobs"),
        ({"candidates": [{"content": {"role": "model"}, "finishReason": "STOP"}]},
         "ended before its first token"),
        ({"promptFeedback": {"blockReason": "SAFETY"}}, r"no candidates: the prompt was blocked"),
        ({"error": "x"}, "no candidates"),
    ],
)  # fmt: skip
def test_answers_without_logprobs_are_clear_errors(tokenizer, body, match):
    with pytest.raises(ResponseFormatError, match=match):
        adapter(tokenizer).parse_response(body, Prompt((0,), 1), 5)


def test_an_answer_after_thoughts_is_refused(tokenizer):
    body = answer_with([[("def", 1, -0.1)]], [("def", 1, -0.1)])
    body["usageMetadata"]["thoughtsTokenCount"] = 12
    with pytest.raises(BaseModelError, match=r"thought \(12 tokens\).*thinking_budget=0"):
        adapter(tokenizer).parse_response(body, Prompt((0,), 1), 5)


# ---------------------------------------------------------------------------------------------
# Errors, as Gemini words them
# ---------------------------------------------------------------------------------------------


def test_k_over_the_cap_names_it(tokenizer):
    message = (
        "Unable to submit request because it has a logprobs value of 25 but the supported range "
        "is from 0 (inclusive) to 21 (exclusive). Update the value and try again."
    )
    base, _ = mock(tokenizer, lambda r: (400, error(400, message, "INVALID_ARGUMENT")))
    with pytest.raises(TopKTooLargeError, match="pass base_k=20 or less") as e:
        run_step(base, Prompt((0, 5), 2), 25)
    assert e.value.server_max == 20


@pytest.mark.parametrize(
    ("status", "message", "kind"),
    [
        (400, "Logprobs is not enabled for models/gemini-x", BadRequestError),
        (400, "Unable to submit request because Logprobs is not supported for this model.",
         BadRequestError),
        (403, "Permission denied: logprobs are not allowed for models/gemini-x.",
         AuthenticationError),
    ],
)  # fmt: skip
def test_a_model_without_logprobs_says_to_pick_another(tokenizer, status, message, kind):
    state = "INVALID_ARGUMENT" if status == 400 else "PERMISSION_DENIED"
    base, _ = mock(tokenizer, lambda r: (status, error(status, message, state)))
    with pytest.raises(kind, match="gives no logprobs, and proxy-tuning needs them") as e:
        run_step(base, Prompt((0, 5), 2))
    assert "\n" not in str(e.value)


def test_a_bad_key_says_where_keys_come_from(tokenizer):
    message = "API key not valid. Please pass a valid API key."
    base, seen = mock(tokenizer, lambda r: (400, error(400, message, "INVALID_ARGUMENT")))
    base.continues = True  # the key fails on any request; ask for logprobs straight away
    with pytest.raises(AuthenticationError, match="set GEMINI_API_KEY"):
        run_step(base, Prompt((0, 5), 2))
    assert seen[0][2]["x-goog-api-key"] == MOCK_KEY and "authorization" not in seen[0][2]


def test_a_refused_model_turn_met_mid_generation_turns_the_adapter_to_one_step(tokenizer):
    base, _ = mock(
        tokenizer,
        lambda r: (400, error(400, MODEL_TURN_REFUSED, "INVALID_ARGUMENT")),
        continue_model_turn=True,
    )
    with pytest.raises(BadRequestError, match=r"cannot continue a partial answer.*choose\(\)"):
        run_step(base, Prompt((0, 5, 6), 2))
    assert not base.capabilities.multi_step and not base.capabilities.drafts


def test_whether_a_model_continues_is_asked_once(tokenizer):
    good = answer_with([[("def", 1, -0.1)]], [("def", 1, -0.1)])
    base, seen = mock(tokenizer, lambda r: (200, good))

    async def steps():
        for prompt in (Prompt((0, 5), 2), Prompt((0, 5, 6), 2), Prompt((0, 5, 6, 7), 2)):
            await base.top_logprobs(prompt, 5)

    asyncio.run(steps())
    probes = [s for s in seen if s[3]["contents"][-1]["parts"][0]["text"] == "Hello"]
    assert len(probes) == 1 and len(seen) == 4 and base.continues is True
    assert probes[0][3]["contents"][-1]["role"] == "model"
    assert "responseLogprobs" not in probes[0][3]["generationConfig"]


# ---------------------------------------------------------------------------------------------
# Against the fixture server
# ---------------------------------------------------------------------------------------------


def tuner_for(server, tiny_models, tokenizer, model=MODEL, **options):
    return dialect_tuner("gemini", server, tiny_models, tokenizer, model, api_key=KEY, **options)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_gemini_equals_the_formula_on_its_top_20(gemini, tiny_models, hf_models, tokenizer, prompt):
    # The fixture's tokenId are the tiny base's ids: every token is known, part of a character
    # (text U+FFFD) too.
    with tuner_for(gemini, tiny_models, tokenizer) as tuner:
        assert_chat_tuner_equals_the_formula(
            tuner, hf_models, prompt, max_new_tokens=N_TOKENS, k=K, eos_ids=EOS
        )
        assert tuner.base.token_ids and tuner.base.capabilities.ids_in_response


def fixture_greedy_text(server, prompt: str, n: int) -> str:
    answer = httpx.post(
        f"{server.base_url}/models/{MODEL}:generateContent",
        headers={"x-goog-api-key": KEY},
        json={
            "contents": [{"role": "user", "parts": [{"text": prompt}]}],
            "generationConfig": {"maxOutputTokens": n, "temperature": 0.0},
        },
        timeout=60,
    ).json()
    return answer["candidates"][0]["content"]["parts"][0]["text"]


@pytest.mark.parametrize("speculate", ["off", "base"])
def test_alpha_0_greedy_is_the_servers_own_greedy_text(gemini, tiny_models, tokenizer, speculate):
    tuner = tuner_for(gemini, tiny_models, tokenizer)
    got = alpha_0_text(tuner, PROMPTS[0], N_TOKENS, K, speculate)
    assert got == fixture_greedy_text(gemini, PROMPTS[0], N_TOKENS)


def test_the_key_travels_as_google_sends_it(gemini, tiny_models, tokenizer):
    headers = headers_sent(gemini, tuner_for(gemini, tiny_models, tokenizer), PROMPTS[0], K)
    assert headers and all(h.get("x-goog-api-key") == KEY for h in headers)
    assert not any("authorization" in h for h in headers)
    with (
        connect_gemini(gemini, tokenizer, api_key="wrong") as base,
        pytest.raises(AuthenticationError, match=r"API key not valid.*set GEMINI_API_KEY"),
    ):
        run_step(base, Prompt(tuple(tokenizer.encode("x")), 2))


def connect_gemini(server, tokenizer, model=MODEL, **options):
    options.setdefault("api_key", KEY)
    return connected("gemini", server, tokenizer, model, **options)


def test_generate_drafts_the_servers_greedy_continuation_with_each_top_k(
    gemini, tokenizer, hf_models
):
    ids = tuple(tokenizer.encode(PROMPTS[1]))
    with connect_gemini(gemini, tokenizer) as base:
        got = asyncio.run(base.generate(Prompt(ids, len(ids)), K, 6, greedy=True))
    context = chat_server_sees(hf_models["tokenizer"], PROMPTS[1])([])
    assert_greedy_drafts(got, hf_models["base"], context, n=6, k=K, eos_ids=EOS)
    assert got.usage.prompt_tokens == len(context)


def test_sampled_drafts_follow_the_seed(gemini, tokenizer):
    ids = tuple(tokenizer.encode(PROMPTS[1]))

    def draw(seed):
        with connect_gemini(gemini, tokenizer) as base:
            prompt = Prompt(ids, len(ids))
            return asyncio.run(base.generate(prompt, 5, 6, greedy=False, seed=seed)).tokens

    assert draw(1) == draw(1) and draw(1) != draw(2)
    sent = gemini.requests[-1][2]["generationConfig"]
    assert (sent["temperature"], sent["topP"], sent["seed"]) == (1.0, 1.0, 2)


def test_a_model_that_refuses_a_model_turn_falls_back_to_one_step(
    gemini, tiny_models, tokenizer, caplog
):
    with (
        caplog.at_level(logging.WARNING, logger="proxyclient.adapters.gemini"),
        tuner_for(gemini, tiny_models, tokenizer, model=MODEL + NO_PREFILL) as tuner,
    ):
        choice = tuner.choose(PROMPTS[0], ["(", ":", " def"], base_k=K, unseen="floor")
        assert choice.option in {"(", ":", " def"}
        assert not tuner.base.capabilities.multi_step
        with pytest.raises(ConfigError, match="can score only the first token"):
            tuner.generate(PROMPTS[0], max_new_tokens=4, base_k=K, speculate="off")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "cannot continue a partial answer (a trailing model turn is refused: HTTP 400: Requests "
        "ending with a model turn are not supported"
        in w
        and "ProxyTuner.choose()" in w
        for w in warnings
    ), warnings
    with connect_gemini(gemini, tokenizer, model=MODEL + NO_PREFILL) as base:
        ids = tuple(tokenizer.encode("x"))
        with pytest.raises(ConfigError, match="scores only the first token"):
            run_step(base, Prompt((*ids, 7), len(ids)))


# ---------------------------------------------------------------------------------------------
# The CLI
# ---------------------------------------------------------------------------------------------


def cli(tiny_models, *args, key=KEY):
    return dialect_cli("gemini", "GEMINI_API_KEY", key, tiny_models, *args)


@pytest.mark.subprocess
def test_cli_inspect_reports_what_each_model_can_do(gemini, tiny_models):
    for model, multi_step in ((MODEL, True), (MODEL + NO_PREFILL, False)):
        run = cli(tiny_models, "inspect", "--base-url", gemini.base_url, "--base-model", model)
        assert run.returncode == 0, run.stderr
        report = json.loads(run.stdout)
        assert report["api"] == "gemini" and report["max_k"] == 20 and report["default_k"] == 20
        assert report["multi_step"] is multi_step and report["drafts"] is multi_step
        # The fixture's tokenId are the base tokenizer's ids: seen on the first answer.
        assert report["token_id_prompts"] is False and report["ids_in_response"] is True
        assert report["prompt_scoring"] is False and report["logprobs"] == "processed"
        assert ("cannot continue a partial answer" in run.stderr) is not multi_step
        if multi_step:
            assert report["steering"] == "multi-token steering; speculation: base drafts"
        else:
            assert report["steering"].startswith("one-step choice only")


@pytest.mark.subprocess
@pytest.mark.parametrize(
    ("server", "model", "expected"),
    [
        ("gemini", MODEL + NO_LOGPROBS, "HTTP 400: Logprobs is not enabled for models/"),
        ("denying", MODEL, "HTTP 403: Permission denied: logprobs are not allowed"),
        ("gemini", "gemini-1.0-pro", "HTTP 404: models/gemini-1.0-pro is not found"),
    ],
)
def test_cli_bad_models_exit_2_with_one_clear_message(
    request, tiny_models, server, model, expected
):
    url = request.getfixturevalue(server).base_url
    run = cli(tiny_models, "inspect", "--base-url", url, "--base-model", model)
    line = assert_one_clear_error(run, expected)
    advice = {
        "HTTP 404": f"pass one of {MODEL}, {MODEL}{NO_PREFILL}, {MODEL}{NO_LOGPROBS}",
        "HTTP 400": "gives no logprobs, and proxy-tuning needs them",
        "HTTP 403": "gives no logprobs, and proxy-tuning needs them",
    }
    assert next(v for k, v in advice.items() if k in expected) in line


@pytest.mark.subprocess
def test_cli_generate_on_a_model_that_refuses_a_model_turn_exits_2(gemini, tiny_models):
    run = cli(
        tiny_models, "generate", "--base-url", gemini.base_url, "--base-model", MODEL + NO_PREFILL,
        "--expert", str(tiny_models["expert"]), "--anti-expert", str(tiny_models["anti_expert"]),
        "--prompt", PROMPTS[0], "--max-new-tokens", "4", "--threads", "1", "--speculate", "off",
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert "Requests ending with a model turn are not supported" in run.stderr
    assert "proxyclient: error:" in run.stderr and "can score only the first token" in run.stderr
    assert "Traceback" not in run.stderr
