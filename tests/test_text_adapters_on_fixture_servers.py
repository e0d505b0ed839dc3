"""The openai, openai-chat and tgi adapters against servers that speak exactly those dialects
(tests/support/dialect_servers.py: OpenAI and TGI cannot run here), backed by the real tiny base
model.

For each, greedy output with the dialect's largest k and `restrict` equals the local reference
restricted to that top-k; plus caps, retries, refusals and capability discovery.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest
import torch

from proxyclient import ProxyTuner, TopKTooLargeError, connect
from proxyclient.adapters.base import Prompt, TopLogprobs
from proxyclient.adapters.discovery import probe
from proxyclient.errors import APIStatusError, ResponseFormatError
from proxyclient.tokenizer import BaseTokenizer
from tests.support.dialect_servers import DialectServer
from tests.support.reference import assert_same_tokens, proxy_tuned_greedy

PROMPTS = ["def main():", "import os\nclass Foo(object):\n    "]
N_TOKENS = 10
KEY = "sk-dialect-test-0123456789"


@pytest.fixture(scope="module")
def dialect_servers(tiny_models):
    servers = {
        "openai": DialectServer("openai", tiny_models["base"], api_key=KEY),
        "openai-chat": DialectServer("openai-chat", tiny_models["base"]),
        "tgi": DialectServer("tgi", tiny_models["base"]),
        "refusing": DialectServer("openai-chat", tiny_models["base"], refuse_logprobs=True),
        # vLLM-style chat: continues a partial assistant answer (continue_final_message).
        "continuing-chat": DialectServer(
            "openai-chat", tiny_models["base"], continue_final_message=True
        ),
    }
    for server in servers.values():
        server.start()
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="module")
def base_tokenizer(hf_models):
    return BaseTokenizer(hf_models["tokenizer"])


def tuner_for(server, tiny_models, base_tokenizer, api, **options):
    base = connect(api, server.base_url, "tiny-base", tokenizer=base_tokenizer, **options)
    return ProxyTuner(base, tiny_models["expert"], tiny_models["anti_expert"], device="cpu")


def reference(hf_models, prompt_ids, k, **options):
    return proxy_tuned_greedy(
        hf_models["base"], hf_models["expert"], hf_models["anti_expert"], prompt_ids,
        alpha=1.0, max_new_tokens=N_TOKENS, eos_ids=frozenset({1}), restrict_to_top_k=k,
        **options,
    )  # fmt: skip


@pytest.mark.parametrize("prompt", PROMPTS)
def test_openai_equals_the_formula_on_its_top_5(
    dialect_servers, tiny_models, hf_models, base_tokenizer, prompt
):
    server = dialect_servers["openai"]
    with tuner_for(server, tiny_models, base_tokenizer, "openai", api_key=KEY) as tuner:
        got = tuner.generate(prompt, max_new_tokens=N_TOKENS, unseen="restrict", base_k=5)
        ids = tuner.tokenizer(prompt).input_ids
    # OpenAI writes partial UTF-8 tokens as bytes:\xNN, so every token is identifiable.
    assert got.usage.dropped_candidates == 0
    assert_same_tokens(got.token_ids, reference(hf_models, ids, 5), frozenset({1}))
    # Token ids go out as the prompt (one per request, or drafts: speculation).
    sent = server.requests[-1][2]
    assert len(sent["prompt"]) >= len(ids) and sent["logprobs"] == 5
    assert sent["prompt"] == (ids + got.token_ids)[: len(sent["prompt"])]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_tgi_equals_the_formula_on_its_top_5(
    dialect_servers, tiny_models, hf_models, base_tokenizer, prompt
):
    server = dialect_servers["tgi"]
    tokenizer = hf_models["tokenizer"]

    def tgi_sees(generated):  # TGI tokenizes the text we send, BOS included
        return tokenizer(tokenizer.decode(tokenizer(prompt).input_ids[1:] + generated)).input_ids

    with tuner_for(server, tiny_models, base_tokenizer, "tgi") as tuner:
        got = tuner.generate(prompt, max_new_tokens=N_TOKENS, unseen="restrict", base_k=5)
        ids = tuner.tokenizer(prompt).input_ids
    assert_same_tokens(
        got.token_ids, reference(hf_models, ids, 5, base_ids_for=tgi_sees), frozenset({1})
    )
    parameters = server.requests[-1][2]["parameters"]
    assert not {"temperature", "top_p", "top_k", "repetition_penalty", "do_sample"} & set(
        parameters
    ), "TGI's logprobs come after its warpers: send none"


def test_plain_chat_scores_one_step_and_chooses(
    dialect_servers, tiny_models, hf_models, base_tokenizer
):
    server = dialect_servers["openai-chat"]
    tokenizer = hf_models["tokenizer"]
    with tuner_for(server, tiny_models, base_tokenizer, "openai-chat") as tuner:
        # After the chat prompt the base's top 20 hold the first four, not the last two.
        options = ["rror", " def", " will", " Return", "(", ":"]
        choice = tuner.choose(PROMPTS[0], options, base_k=20, unseen="restrict")
    chat_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPTS[0]}], add_generation_prompt=True, tokenize=False
    )
    chat_prompt = tokenizer(chat_ids, add_special_tokens=False).input_ids
    prompt_ids = tokenizer(PROMPTS[0]).input_ids
    step = reference(hf_models, prompt_ids, 20, base_ids_for=lambda _: chat_prompt)[0]
    option_ids = [tokenizer(o, add_special_tokens=False).input_ids[0] for o in options]
    finite = [i for i in option_ids if step.scores[i] > -float("inf")]
    assert [options[option_ids.index(i)] for i in finite] == options[:4]
    expected = step.scores[finite].softmax(dim=0).tolist()
    got = [choice.probabilities[options[option_ids.index(i)]] for i in finite]
    assert got == pytest.approx(expected, abs=1e-5)
    assert sorted(choice.missing) == sorted(o for o, i in zip(options, option_ids, strict=True)
                                            if i not in finite)  # fmt: skip
    assert choice.missing == ["(", ":"]


def test_top_k_over_the_cap_names_it(dialect_servers, tiny_models, base_tokenizer):
    for api, server, cap in (
        ("openai", dialect_servers["openai"], 5),
        ("tgi", dialect_servers["tgi"], 5),
        ("openai-chat", dialect_servers["openai-chat"], 20),
    ):
        options = {"api_key": KEY} if api == "openai" else {}
        with (
            tuner_for(server, tiny_models, base_tokenizer, api, **options) as tuner,
            pytest.raises(TopKTooLargeError, match=f"pass base_k={cap} or less") as e,
        ):
            tuner.generate(PROMPTS[0], max_new_tokens=1, unseen="restrict", base_k=cap + 1)
        assert e.value.server_max == cap


def test_retries_honour_429s_with_and_without_retry_after(
    dialect_servers, tiny_models, base_tokenizer
):
    for api, options in (("openai", {"api_key": KEY}), ("tgi", {})):
        server = dialect_servers[api]
        server.fail_next(429, 503)
        with tuner_for(server, tiny_models, base_tokenizer, api, **options) as tuner:
            got = tuner.generate(PROMPTS[0], max_new_tokens=3, unseen="restrict", base_k=5)
        assert len(got.token_ids) == 3


def test_without_k_a_generation_asks_for_the_servers_cap_where_it_is_below_20(
    dialect_servers, tiny_models, base_tokenizer
):
    for api, options, field in (("openai", {"api_key": KEY}, "logprobs"), ("tgi", {}, None)):
        server = dialect_servers[api]
        server.requests.clear()
        with tuner_for(server, tiny_models, base_tokenizer, api, **options) as tuner:
            got = tuner.generate(PROMPTS[0], max_new_tokens=2)
        assert len(got.token_ids) == 2 and got.unseen_policy == "residual"
        bodies = [body for _, _, body in server.requests]
        asked = [b[field] if field else b["parameters"]["top_n_tokens"] for b in bodies]
        assert asked and set(asked) == {5}, asked  # one request per token, or a draft


def test_a_model_that_refuses_logprobs_says_so(dialect_servers, tiny_models, base_tokenizer):
    refusing = dialect_servers["refusing"]
    with (
        tuner_for(refusing, tiny_models, base_tokenizer, "openai-chat") as tuner,
        pytest.raises(APIStatusError, match="does not give logprobs"),
    ):
        tuner.generate(PROMPTS[0], max_new_tokens=1)


def test_the_wrong_dialect_is_named(dialect_servers, tiny_models, base_tokenizer):
    with (
        tuner_for(dialect_servers["tgi"], tiny_models, base_tokenizer, "vllm") as tuner,
        pytest.raises(APIStatusError, match="seems to speak tgi, not vllm: try --api tgi"),
    ):
        tuner.generate(PROMPTS[0], max_new_tokens=1)
    chat_url = dialect_servers["openai-chat"].base_url
    with pytest.raises((APIStatusError, ResponseFormatError), match="try --api openai"):
        tgi = connect("tgi", chat_url.removesuffix("/v1"), "tiny-base", tokenizer=base_tokenizer)
        asyncio.run(tgi.top_logprobs(Prompt((0, 321), 2), 5))


@pytest.mark.parametrize(
    ("api", "expected"),
    [("openai", 5), ("openai-chat", 20), ("tgi", 5)],
)
def test_probe_discovers_the_cap(dialect_servers, base_tokenizer, api, expected):
    options = {"api_key": KEY} if api == "openai" else {}
    base = connect(api, dialect_servers[api].base_url, "tiny-base", tokenizer=base_tokenizer,
                   max_k=None, **options)  # fmt: skip
    capabilities = asyncio.run(probe(base, Prompt((0, 321), 2)))
    assert capabilities.max_k == expected
    assert capabilities.multi_step == (api != "openai-chat")


@pytest.mark.subprocess
def test_cli_inspect_prints_the_capabilities(dialect_servers, tiny_models):
    run = subprocess.run(
        [sys.executable, "-m", "proxyclient.cli", "inspect", "--api", "tgi",
         "--base-url", dialect_servers["tgi"].base_url, "--base-model", "tiny-base",
         "--base-tokenizer", str(tiny_models["base"])],
        capture_output=True, text=True, timeout=120, env=dict(os.environ),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["max_k"] == 5 and report["logprobs"] == "processed"
    assert report["default_k"] == 5  # what a generation asks for when not told
    assert report["token_id_prompts"] is False and report["ids_in_response"] is True
    assert report["steering"] == "multi-token steering; speculation: base drafts"


def test_tgi_conditions_on_the_text_whatever_our_split(dialect_servers, base_tokenizer):
    tgi = connect("tgi", dialect_servers["tgi"].base_url, "tiny-base", tokenizer=base_tokenizer)
    canonical = (0, *base_tokenizer.encode("def main", add_special_tokens=False))
    split = (0, *[base_tokenizer.vocab.id_of(c.encode()) for c in "def main"])
    assert canonical != split and base_tokenizer.decode(split) == "def main"

    async def both():
        return (
            await tgi.top_logprobs(Prompt(canonical, len(canonical)), 5),
            await tgi.top_logprobs(Prompt(split, len(split)), 5),
        )

    plain, resplit = asyncio.run(both())
    assert resplit.retokenized and not plain.retokenized
    assert resplit.token_ids == plain.token_ids
    assert dialect_servers["tgi"].requests[-1][2]["inputs"] == "def main"


def test_openai_recovers_ids_with_a_tiktoken_encoding(dialect_servers, tiny_models, hf_models):
    from tests.support.other_tokenizers import tiktoken_twin

    encoding = BaseTokenizer(tiktoken_twin(hf_models["tokenizer"]))
    assert encoding.is_tiktoken
    server = dialect_servers["openai"]
    with tuner_for(server, tiny_models, encoding, "openai", api_key=KEY) as tuner:
        got = tuner.generate(PROMPTS[1], max_new_tokens=N_TOKENS, unseen="restrict", base_k=5)
        ids = tuner.tokenizer(PROMPTS[1]).input_ids
    assert got.usage.dropped_candidates == 0
    assert_same_tokens(got.token_ids, reference(hf_models, ids, 5), frozenset({1}))


@pytest.mark.subprocess
def test_cli_choose_with_a_one_step_chat_api(dialect_servers, tiny_models):
    run = subprocess.run(
        [sys.executable, "-m", "proxyclient.cli", "choose", "--api", "openai-chat",
         "--base-url", dialect_servers["openai-chat"].base_url, "--base-model", "tiny-base",
         "--expert", str(tiny_models["expert"]), "--anti-expert", str(tiny_models["anti_expert"]),
         "--prompt", PROMPTS[0], "--choices", "(,:,def, return", "--threads", "1",
         "--unseen", "floor"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    choice = json.loads(run.stdout)
    assert set(choice["probabilities"]) == {"(", ":", "def", " return"}
    # Under `floor` every option is a candidate; those outside the top-k are still reported.
    assert sum(choice["probabilities"].values()) == pytest.approx(1.0)
    assert choice["option"] == max(choice["probabilities"], key=choice["probabilities"].get)
    assert choice["unseen_policy"] == "floor" and isinstance(choice["missing"], list)


# generate: several positions from one request (speculation).

GENERATE_N = 6
GENERATE_SERVERS = {  # api -> (server, adapter options, k)
    "openai": ("openai", {"api_key": KEY}, 5),
    "openai-chat": ("continuing-chat", {"continue_final_message": True}, 20),
    "tgi": ("tgi", {}, 5),
}


def context_seen(api, prompt, hf_tokenizer, answer=None):
    """The ids the server conditions on for ``prompt`` and, one step at a time, the partial
    ``answer`` (text): our ids (openai), the chat template, continued (openai-chat), TGI's own
    tokenization of the text (tgi)."""
    if api == "openai-chat":
        messages = [{"role": "user", "content": prompt}]
        if answer:
            messages.append({"role": "assistant", "content": answer})
        chat = hf_tokenizer.apply_chat_template(
            messages, add_generation_prompt=not answer, continue_final_message=bool(answer),
            tokenize=False,
        )  # fmt: skip
        return hf_tokenizer(chat, add_special_tokens=False).input_ids
    return hf_tokenizer(prompt + (answer or "")).input_ids


@torch.inference_mode()
def raw_logprobs(model, ids):
    return torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), dim=-1)


def hf_greedy(model, ids, n, eos_id):
    tokens = []
    while len(tokens) < n:
        tokens.append(int(raw_logprobs(model, list(ids) + tokens).argmax()))
        if tokens[-1] == eos_id:
            break
    return tokens


def generate_and_singles(base, prompt, k, *, greedy, seed=None, singles=True):
    """One generate, then (``singles``) each position's top-k asked one step at a time."""

    async def run():
        try:
            got = await base.generate(prompt, k, GENERATE_N, greedy=greedy, seed=seed)
            steps = [
                Prompt(prompt.ids + got.tokens[:i], prompt.prompt_len) for i in range(len(got))
            ]
            return got, [await base.top_logprobs(step, k) for step in steps if singles]
        finally:
            await base.aclose()

    return asyncio.run(run())


# The fixtures decode with a KV cache; one step recomputes the whole prompt: float32 differences
# of up to ~1.5e-5 in the logprobs.
GENERATE_TOLERANCE = 5e-5


def reference_top(model, ids, k):
    values, indices = torch.topk(raw_logprobs(model, ids), k)
    return TopLogprobs(tuple(indices.tolist()), tuple(values.tolist()))


def assert_same_top(got, expected, tolerance=GENERATE_TOLERANCE):
    assert got.token_ids == expected.token_ids
    assert got.logprobs == pytest.approx(expected.logprobs, abs=tolerance)


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("api", list(GENERATE_SERVERS))
def test_generate_greedy_is_the_servers_continuation_with_each_steps_top_k(
    dialect_servers, base_tokenizer, hf_models, api, prompt
):
    name, options, k = GENERATE_SERVERS[api]
    server = dialect_servers[name]
    base = connect(api, server.base_url, "tiny-base", tokenizer=base_tokenizer, **options)
    assert base.capabilities.drafts
    ids = tuple(base_tokenizer.encode(prompt))
    server.requests.clear()
    got, singles = generate_and_singles(base, Prompt(ids, len(ids)), k, greedy=True)
    sent = server.requests[0][2]  # one request for the whole draft
    asked = sent["parameters"]["max_new_tokens"] if api == "tgi" else sent["max_tokens"]
    assert asked == GENERATE_N and len(server.requests) == 1 + len(got)
    context = context_seen(api, prompt, hf_models["tokenizer"])
    expected = hf_greedy(hf_models["base"], context, GENERATE_N, eos_id=1)
    generated = len(expected)
    if api != "tgi" and expected[-1:] == [1]:
        expected.pop()  # OpenAI's answers leave the stop token out; TGI's include it
    assert list(got.tokens) == expected
    assert len(got.tops) == len(got.token_logprobs) == len(got)
    same_ids = 0
    for i, (top, single) in enumerate(zip(got.tops, singles, strict=True)):
        drafted = context + list(got.tokens[:i])
        assert_same_top(top, reference_top(hf_models["base"], drafted, k))
        # A text API (chat, TGI) tokenizes the text we send again: where its split differs from
        # the generated ids, a single step is conditioned on other ids.
        answer = base_tokenizer.decode(got.tokens[:i])
        if api == "openai" or context_seen(api, prompt, hf_models["tokenizer"], answer) == drafted:
            assert_same_top(top, single)
            same_ids += 1
    assert same_ids >= min(3, len(got)), same_ids
    for token, top, own in zip(got.tokens, got.tops, got.token_logprobs, strict=True):
        assert token == top.token_ids[0] and own == pytest.approx(top.logprobs[0], abs=1e-9)
    if api != "tgi":  # TGI reports only the generated tokens
        assert got.usage.prompt_tokens == len(context)
    assert got.usage.completion_tokens == generated


@pytest.mark.parametrize("api", list(GENERATE_SERVERS))
def test_generate_sampled_gives_the_raw_distribution_at_each_position(
    dialect_servers, base_tokenizer, hf_models, api
):
    name, options, k = GENERATE_SERVERS[api]
    server = dialect_servers[name]
    ids = tuple(base_tokenizer.encode(PROMPTS[1]))
    prompt = Prompt(ids, len(ids))

    def draw(seed):
        base = connect(api, server.base_url, "tiny-base", tokenizer=base_tokenizer, **options)
        return generate_and_singles(base, prompt, k, greedy=False, seed=seed, singles=False)[0]

    draws = [draw(1), draw(2)]
    assert draw(1).tokens == draws[0].tokens, "the same seed, the same draw"
    assert draws[0].tokens != draws[1].tokens
    sent = server.requests[-1][2]
    if api == "tgi":  # TGI's logprobs come after its warpers: do_sample alone
        assert sent["parameters"]["do_sample"] is True and sent["parameters"]["seed"] == 1
        assert not {"temperature", "top_p", "top_k", "repetition_penalty"} & set(sent["parameters"])
    else:
        assert (sent["temperature"], sent["top_p"], sent["seed"]) == (1.0, 1.0, 1)
    context = context_seen(api, PROMPTS[1], hf_models["tokenizer"])
    for sample in draws:
        assert len(sample) > 0
        for i, top in enumerate(sample.tops):
            drafted = context + list(sample.tokens[:i])
            assert_same_top(top, reference_top(hf_models["base"], drafted, k))
            own = float(raw_logprobs(hf_models["base"], drafted)[sample.tokens[i]])
            assert sample.token_logprobs[i] == pytest.approx(own, abs=GENERATE_TOLERANCE)


def cli_generate(server, tiny_models, *extra):
    return subprocess.run(
        [sys.executable, "-m", "proxyclient", "generate", "--api", "openai",
         "--base-url", server.base_url, "--base-model", "tiny-base", "--base-api-key", KEY,
         "--expert", str(tiny_models["expert"]), "--anti-expert", str(tiny_models["anti_expert"]),
         "--prompt", PROMPTS[0], "--max-new-tokens", "6", "--threads", "1", *extra],
        capture_output=True, text=True, timeout=300, env=dict(os.environ),
    )  # fmt: skip


@pytest.mark.subprocess
def test_cli_speculate_expert_without_scoring_names_the_supported_modes(
    dialect_servers, tiny_models
):
    run = cli_generate(dialect_servers["openai"], tiny_models, "--speculate", "expert")
    assert run.returncode == 2
    assert "--speculate 'expert'" in run.stderr
    assert "cannot score a continuation; supported here: off, base, auto" in run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.subprocess
@pytest.mark.parametrize(
    ("bad", "said"),
    [("0", "--draft-tokens must be an integer >= 1"), ("-3", "--draft-tokens must be an integer"),
     ("two", "argument --draft-tokens: invalid int value: 'two'")],
)  # fmt: skip
def test_cli_draft_tokens_below_one_exits_2(dialect_servers, tiny_models, bad, said):
    run = cli_generate(dialect_servers["openai"], tiny_models, "--draft-tokens", bad)
    assert run.returncode == 2
    assert said in run.stderr


@pytest.mark.subprocess
def test_cli_verbose_prints_one_cost_line(dialect_servers, tiny_models):
    run = cli_generate(
        dialect_servers["openai"], tiny_models, "-v", "--json", "--speculate", "base"
    )
    assert run.returncode == 0, run.stderr
    usage = json.loads(run.stdout)["usage"]
    lines = [line for line in run.stderr.splitlines() if "requests (" in line]
    assert len(lines) == 1
    assert f"6 tokens in {usage['requests']} requests" in lines[0]
    assert f"{usage['base_completion_tokens']} base completion tokens" in lines[0]
