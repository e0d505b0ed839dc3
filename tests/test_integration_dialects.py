"""The openai, openai-chat and tgi adapters against servers that speak exactly those dialects
(tests/dialect_servers.py: OpenAI and TGI cannot run here), backed by the real tiny base model.

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
from dialect_servers import DialectServer
from reference import assert_same_tokens, proxy_tuned_greedy

from proxyclient import ProxyTuner, TopKTooLargeError, connect
from proxyclient.adapters.base import Prompt
from proxyclient.adapters.discovery import probe
from proxyclient.errors import APIStatusError, ResponseFormatError
from proxyclient.tokenizer import BaseTokenizer

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
        got = tuner.generate(prompt, max_new_tokens=N_TOKENS, unseen="restrict", top_logprobs=5)
        ids = tuner.tokenizer(prompt).input_ids
    # OpenAI writes partial UTF-8 tokens as bytes:\xNN, so every token is identifiable.
    assert got.usage.dropped_candidates == 0
    assert_same_tokens(got.token_ids, reference(hf_models, ids, 5), frozenset({1}))
    sent = server.requests[-1][2]
    assert sent["prompt"] == ids + got.token_ids[:-1] and sent["logprobs"] == 5


@pytest.mark.parametrize("prompt", PROMPTS)
def test_tgi_equals_the_formula_on_its_top_5(
    dialect_servers, tiny_models, hf_models, base_tokenizer, prompt
):
    server = dialect_servers["tgi"]
    tokenizer = hf_models["tokenizer"]

    def tgi_sees(generated):  # TGI tokenizes the text we send, BOS included
        return tokenizer(tokenizer.decode(tokenizer(prompt).input_ids[1:] + generated)).input_ids

    with tuner_for(server, tiny_models, base_tokenizer, "tgi") as tuner:
        got = tuner.generate(prompt, max_new_tokens=N_TOKENS, unseen="restrict", top_logprobs=5)
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
        options = ["(", ":", " return", "def"]
        choice = tuner.choose(PROMPTS[0], options, top_logprobs=20, unseen="restrict")
    chat_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPTS[0]}], add_generation_prompt=True, tokenize=False
    )
    chat_prompt = tokenizer(chat_ids, add_special_tokens=False).input_ids
    prompt_ids = tokenizer(PROMPTS[0]).input_ids
    step = reference(hf_models, prompt_ids, 20, base_ids_for=lambda _: chat_prompt)[0]
    option_ids = [tokenizer(o, add_special_tokens=False).input_ids[0] for o in options]
    finite = [i for i in option_ids if step.scores[i] > -float("inf")]
    expected = step.scores[finite].softmax(dim=0).tolist()
    got = [choice.probabilities[options[option_ids.index(i)]] for i in finite]
    assert got == pytest.approx(expected, abs=1e-5)
    assert sorted(choice.missing) == sorted(o for o, i in zip(options, option_ids, strict=True)
                                            if i not in finite)  # fmt: skip


def test_top_k_over_the_cap_names_it(dialect_servers, tiny_models, base_tokenizer):
    for api, server, cap in (
        ("openai", dialect_servers["openai"], 5),
        ("tgi", dialect_servers["tgi"], 5),
        ("openai-chat", dialect_servers["openai-chat"], 20),
    ):
        options = {"api_key": KEY} if api == "openai" else {}
        with (
            tuner_for(server, tiny_models, base_tokenizer, api, **options) as tuner,
            pytest.raises(TopKTooLargeError, match=f"pass --top-logprobs {cap} or less") as e,
        ):
            tuner.generate(PROMPTS[0], max_new_tokens=1, unseen="restrict", top_logprobs=cap + 1)
        assert e.value.server_max == cap


def test_retries_honour_429s_with_and_without_retry_after(
    dialect_servers, tiny_models, base_tokenizer
):
    for api, options in (("openai", {"api_key": KEY}), ("tgi", {})):
        server = dialect_servers[api]
        server.fail_next(429, 503)
        with tuner_for(server, tiny_models, base_tokenizer, api, **options) as tuner:
            got = tuner.generate(PROMPTS[0], max_new_tokens=3, unseen="restrict", top_logprobs=5)
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
        assert asked == [5, 5], asked


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
    from other_tokenizers import tiktoken_twin

    encoding = BaseTokenizer(tiktoken_twin(hf_models["tokenizer"]))
    assert encoding.is_tiktoken
    server = dialect_servers["openai"]
    with tuner_for(server, tiny_models, encoding, "openai", api_key=KEY) as tuner:
        got = tuner.generate(PROMPTS[1], max_new_tokens=N_TOKENS, unseen="restrict", top_logprobs=5)
        ids = tuner.tokenizer(PROMPTS[1]).input_ids
    assert got.usage.dropped_candidates == 0
    assert_same_tokens(got.token_ids, reference(hf_models, ids, 5), frozenset({1}))


def test_cli_choose_with_a_one_step_chat_api(dialect_servers, tiny_models):
    run = subprocess.run(
        [sys.executable, "-m", "proxyclient.cli", "choose", "--api", "openai-chat",
         "--base-url", dialect_servers["openai-chat"].base_url, "--base-model", "tiny-base",
         "--expert", str(tiny_models["expert"]), "--anti-expert", str(tiny_models["anti_expert"]),
         "--prompt", PROMPTS[0], "--options", "(,:,def, return", "--threads", "1",
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
