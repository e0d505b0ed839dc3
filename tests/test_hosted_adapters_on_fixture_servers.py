"""The together, fireworks, sglang and ollama adapters against servers that speak exactly those
dialects (tests/support/dialect_together.py, dialect_fireworks.py, dialect_sglang.py,
dialect_ollama.py: none of the real ones can run here), backed by the real tiny base model.

For each: greedy output with the dialect's largest k and `restrict` equals the local reference
restricted to that top-k; at alpha 0 it is the server's own greedy text; speculation (base drafts
everywhere, expert drafts where a continuation can be scored) changes nothing; k over the cap,
an unknown model and discovery say what to do; `proxyclient inspect` reports the capabilities.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import httpx
import pytest
import torch

from proxyclient import ProxyTuner, connect
from proxyclient.adapters.base import Prompt
from proxyclient.adapters.discovery import probe
from proxyclient.errors import NotFoundError, TopKTooLargeError
from proxyclient.tokenizer import BaseTokenizer
from tests.support import (
    dialect_fireworks,  # noqa: F401  (importing registers the dialect with DialectServer)
    dialect_ollama,  # noqa: F401
    dialect_sglang,  # noqa: F401
    dialect_together,  # noqa: F401
)
from tests.support.dialect_servers import DialectServer
from tests.support.reference import assert_same_tokens, not_utf8_alone, proxy_tuned_greedy

PROMPTS = ["def main():", "import os\nclass Foo(object):\n    "]
N_TOKENS = 10
KEY = "hosted-test-key-0123456789"
VOCAB = 1024  # the tiny base's: SGLang has no cap below it
APIS = ["together", "fireworks", "sglang", "ollama"]
LARGEST_K = {"together": 20, "fireworks": 5, "sglang": VOCAB, "ollama": 20}
TEXT_PROMPTS = {"together", "ollama"}  # the server tokenizes the text we send, BOS included
SCORES = {"fireworks", "sglang"}  # a continuation can be scored: the expert can draft
KEYED = {"together", "fireworks"}
EOS = frozenset({1})


@pytest.fixture(scope="module")
def dialect_bases(tiny_models):
    """One fixture server per hosted dialect (by api name), each on the real tiny base; not
    conftest's ``servers`` (the session's vLLM servers)."""
    running = {
        api: DialectServer(api, tiny_models["base"], api_key=KEY if api in KEYED else None)
        for api in APIS
    }
    for server in running.values():
        server.start()
    yield running
    for server in running.values():
        server.stop()


@pytest.fixture(scope="module")
def base_tokenizer(hf_models):
    return BaseTokenizer(hf_models["tokenizer"])


def base_for(api, dialect_bases, base_tokenizer, model="tiny-base", **options):
    key = {"api_key": KEY} if api in KEYED else {}
    return connect(
        api, dialect_bases[api].base_url, model, tokenizer=base_tokenizer, **key, **options
    )


def tuner_for(api, dialect_bases, tiny_models, base_tokenizer, **options):
    base = base_for(api, dialect_bases, base_tokenizer, **options)
    return ProxyTuner(base, tiny_models["expert"], tiny_models["anti_expert"], device="cpu")


def reference(api, hf_models, base_tokenizer, prompt_ids, k, alpha=1.0):
    tokenizer = hf_models["tokenizer"]
    options = {}
    if api in TEXT_PROMPTS:

        def server_sees(generated):
            return tokenizer(tokenizer.decode(prompt_ids[1:] + generated)).input_ids

        options = {"base_ids_for": server_sees, "unidentifiable": not_utf8_alone(base_tokenizer)}
    return proxy_tuned_greedy(
        hf_models["base"], hf_models["expert"], hf_models["anti_expert"], prompt_ids,
        alpha=alpha, max_new_tokens=N_TOKENS, eos_ids=EOS, restrict_to_top_k=k, **options,
    )  # fmt: skip


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("api", APIS)
def test_equals_the_formula_on_the_largest_top_k(
    dialect_bases, tiny_models, hf_models, base_tokenizer, api, prompt
):
    k = LARGEST_K[api]
    server = dialect_bases[api]
    server.requests.clear()
    with tuner_for(api, dialect_bases, tiny_models, base_tokenizer) as tuner:
        got = tuner.generate(prompt, max_new_tokens=N_TOKENS, unseen="restrict", base_k=k)
        ids = tuner.tokenizer(prompt).input_ids
    assert_same_tokens(got.token_ids, reference(api, hf_models, base_tokenizer, ids, k), EOS)
    sent = [body for path, _, body in server.requests if body]
    assert sent, "no request reached the server"
    if api in TEXT_PROMPTS:
        assert all(body["prompt"].startswith(prompt) for body in sent)
    else:
        field = "input_ids" if api == "sglang" else "prompt"
        assert all(body[field][: len(ids)] == ids for body in sent)


def greedy_text(api, server, prompt, n):
    """The server's own greedy continuation of ``prompt``, asked in its dialect directly."""
    headers = {"authorization": f"Bearer {KEY}"} if api in KEYED else {}
    if api == "sglang":
        path, body = "/generate", {"text": prompt, "sampling_params": {
            "max_new_tokens": n, "temperature": 0}}  # fmt: skip
    elif api == "ollama":
        path, body = "/api/generate", {"model": "tiny-base", "prompt": prompt, "raw": True,
            "stream": False, "options": {"num_predict": n, "temperature": 0,
            "repeat_penalty": 1.0}}  # fmt: skip
    else:
        path = "/completions"
        body = {"model": "tiny-base", "prompt": prompt, "max_tokens": n, "temperature": 0}
    answer = httpx.post(server.base_url + path, json=body, headers=headers, timeout=60).json()
    if api == "sglang":
        return answer["text"]
    return answer["response"] if api == "ollama" else answer["choices"][0]["text"]


@pytest.mark.parametrize("api", APIS)
def test_alpha_zero_is_the_servers_own_greedy_text(dialect_bases, tiny_models, base_tokenizer, api):
    with tuner_for(api, dialect_bases, tiny_models, base_tokenizer) as tuner:
        got = tuner.generate(PROMPTS[1], max_new_tokens=N_TOKENS, alpha=0.0, unseen="restrict",
                             base_k=LARGEST_K[api], speculate="off")  # fmt: skip
    assert got.text == greedy_text(api, dialect_bases[api], PROMPTS[1], N_TOKENS)
    assert got.text


SPECULATION = [(api, "base") for api in APIS] + [(api, "expert") for api in sorted(SCORES)]


@pytest.mark.parametrize(("api", "mode"), SPECULATION)
def test_speculation_gives_the_same_greedy_output(
    dialect_bases, tiny_models, base_tokenizer, api, mode
):
    options = dict(max_new_tokens=12, alpha=1.5, unseen="restrict", base_k=LARGEST_K[api])
    with tuner_for(api, dialect_bases, tiny_models, base_tokenizer) as tuner:
        assert mode in {m.value for m in tuner.speculation_modes()}
        off = tuner.generate(PROMPTS[1], speculate="off", **options)
        got = tuner.generate(PROMPTS[1], speculate=mode, draft_tokens=4, **options)
    assert got.token_ids == off.token_ids and got.text == off.text
    assert got.usage.requests <= off.usage.requests
    assert got.usage.base_completion_tokens >= got.usage.accepted_draft_tokens


# The fixtures decode with a KV cache; a reference forward recomputes the whole prompt.
TOLERANCE = 5e-5


@torch.inference_mode()
def reference_top(model, ids, k):
    logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), dim=-1)
    values, indices = torch.topk(logprobs, k)
    return indices.tolist(), values.tolist()


def assert_top_is_the_reference(top, expected, unidentifiable=frozenset()):
    """``top`` holds the reference's top-k in order, less the tokens it could not identify."""
    ids, logprobs = expected
    kept = [(i, lp) for i, lp in zip(ids, logprobs, strict=True) if i in set(top.token_ids)]
    assert list(top.token_ids) == [i for i, _ in kept]
    assert list(top.logprobs) == pytest.approx([lp for _, lp in kept], abs=TOLERANCE)
    # What is missing could not be named (U+FFFD); string keys may collapse several into one.
    lost = [i for i in ids if i not in set(top.token_ids)]
    assert set(lost) <= unidentifiable and (top.unresolved > 0) == bool(lost)


@pytest.mark.parametrize("api", APIS)
def test_a_draft_carries_each_positions_top_k(dialect_bases, hf_models, base_tokenizer, api):
    k = min(LARGEST_K[api], 20)
    ids = tuple(base_tokenizer.encode(PROMPTS[1]))
    base = base_for(api, dialect_bases, base_tokenizer)
    got = asyncio.run(base.generate(Prompt(ids, len(ids)), k, 6, greedy=True))
    unidentifiable = not_utf8_alone(base_tokenizer) if api in TEXT_PROMPTS else frozenset()
    assert len(got) >= 1 and len(got.tops) == len(got.tokens) == len(got.token_logprobs)
    for i, (token, top) in enumerate(zip(got.tokens, got.tops, strict=True)):
        expected = reference_top(hf_models["base"], list(ids) + list(got.tokens[:i]), k)
        assert_top_is_the_reference(top, expected, unidentifiable)
        assert token == expected[0][0]  # greedy: the best one


@pytest.mark.parametrize("api", sorted(SCORES))
def test_a_score_carries_each_positions_top_k(dialect_bases, hf_models, base_tokenizer, api):
    k = min(LARGEST_K[api], 20)
    ids = list(base_tokenizer.encode(PROMPTS[0]))
    continuation = base_tokenizer.encode(" return x", add_special_tokens=False)
    base = base_for(api, dialect_bases, base_tokenizer)
    got = asyncio.run(base.score(Prompt(tuple(ids), len(ids)), continuation, k))
    assert list(got.tokens[:-1]) == continuation and len(got.tops) == len(continuation) + 1
    for i, top in enumerate(got.tops):
        assert_top_is_the_reference(
            top, reference_top(hf_models["base"], ids + continuation[:i], k)
        )
    model_lp = [
        reference_top(hf_models["base"], ids + continuation[:i], VOCAB)
        for i in range(len(continuation))
    ]
    own = [dict(zip(*row, strict=True))[t] for row, t in zip(model_lp, continuation, strict=True)]
    assert list(got.token_logprobs[:-1]) == pytest.approx(own, abs=TOLERANCE)


def test_the_text_dialects_cannot_score_a_continuation(dialect_bases, tiny_models, base_tokenizer):
    for api in sorted(TEXT_PROMPTS):
        with tuner_for(api, dialect_bases, tiny_models, base_tokenizer) as tuner:
            assert "expert" not in {m.value for m in tuner.speculation_modes()}


CAPS = {"together": 20, "fireworks": 5, "ollama": 20}


@pytest.mark.parametrize("api", sorted(CAPS))
def test_k_over_the_cap_names_it(dialect_bases, tiny_models, base_tokenizer, api):
    cap = CAPS[api]
    with (
        tuner_for(api, dialect_bases, tiny_models, base_tokenizer, max_k=None) as tuner,
        pytest.raises(TopKTooLargeError, match=f"pass base_k={cap} or less") as e,
    ):
        tuner.generate(PROMPTS[0], max_new_tokens=1, unseen="restrict", base_k=cap + 1)
    assert e.value.server_max == cap


def test_sglang_k_over_the_vocabulary_is_refused_before_it_reaches_the_server(
    dialect_bases, tiny_models, base_tokenizer
):
    server = dialect_bases["sglang"]
    server.requests.clear()
    with (
        tuner_for("sglang", dialect_bases, tiny_models, base_tokenizer) as tuner,
        pytest.raises(TopKTooLargeError, match=f"pass base_k={VOCAB} or less"),
    ):
        tuner.generate(PROMPTS[0], max_new_tokens=1, base_k=VOCAB + 1)
    assert not server.requests


UNKNOWN_MODEL = {
    "together": "Unable to access model no-such-model",
    "fireworks": "Model not found, inaccessible, and/or not deployed",
    "ollama": "model 'no-such-model' not found",
}


@pytest.mark.parametrize("api", sorted(UNKNOWN_MODEL))
def test_an_unknown_model_is_named(dialect_bases, base_tokenizer, api):
    base = base_for(api, dialect_bases, base_tokenizer, model="no-such-model")
    ids = tuple(base_tokenizer.encode("def main():"))
    with pytest.raises(NotFoundError, match=UNKNOWN_MODEL[api]):
        asyncio.run(base.top_logprobs(Prompt(ids, len(ids)), 5))


def test_sglang_serves_one_model_whatever_its_name(dialect_bases, base_tokenizer):
    """SGLang's /generate has no model field: --base-model names nothing on the server."""
    server = dialect_bases["sglang"]
    base = base_for("sglang", dialect_bases, base_tokenizer, model="any-name")
    top = asyncio.run(base.top_logprobs(Prompt((0, 321), 2), 5))
    assert len(top) == 5 and "model" not in server.requests[-1][2]


@pytest.mark.parametrize("api", APIS)
def test_probe_discovers_the_cap(dialect_bases, base_tokenizer, api):
    base = base_for(api, dialect_bases, base_tokenizer, max_k=None)
    server = dialect_bases[api]
    server.requests.clear()
    capabilities = asyncio.run(probe(base, Prompt((0, 321), 2)))
    assert capabilities.max_k == CAPS.get(api)  # sglang: not probed (None)
    if api == "sglang":
        assert [body["top_logprobs_num"] for _, _, body in server.requests] == [1]


@pytest.mark.parametrize("api", ["together", "fireworks"])
def test_retries_ride_out_429_and_503(dialect_bases, tiny_models, base_tokenizer, api):
    dialect_bases[api].fail_next(429, 503)
    with tuner_for(api, dialect_bases, tiny_models, base_tokenizer) as tuner:
        got = tuner.generate(PROMPTS[0], max_new_tokens=3, unseen="restrict", base_k=5)
    assert len(got.token_ids) == 3


INSPECTED = {  # api -> (max_k, token_id_prompts, prompt_scoring)
    "together": (20, False, False),
    "fireworks": (5, True, True),
    "sglang": (None, True, True),
    "ollama": (20, False, False),
}


@pytest.mark.subprocess
@pytest.mark.parametrize("api", APIS)
def test_cli_inspect_prints_the_capabilities(dialect_bases, tiny_models, api):
    argv = [sys.executable, "-m", "proxyclient.cli", "inspect", "--api", api,
            "--base-url", dialect_bases[api].base_url, "--base-model", "tiny-base",
            "--base-tokenizer", str(tiny_models["base"])]  # fmt: skip
    if api in KEYED:
        argv += ["--base-api-key", KEY]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=180, env=dict(os.environ))
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    max_k, token_id_prompts, prompt_scoring = INSPECTED[api]
    assert report["api"] == api and report["max_k"] == max_k
    assert report["token_id_prompts"] is token_id_prompts
    assert report["prompt_scoring"] is prompt_scoring
    assert report["drafts"] is True and report["multi_step"] is True
    assert report["default_k"] == min(20, max_k or 20)


# -- the fixtures answer in their documented shapes --------------------------------------------


def post(api, server, path, body):
    headers = {"authorization": f"Bearer {KEY}"} if api in KEYED else {}
    return httpx.post(server.base_url + path, json=body, headers=headers, timeout=60)


def test_together_answer_shape(dialect_bases):
    body = {"model": "tiny-base", "prompt": "def main():", "max_tokens": 2, "logprobs": 3,
            "echo": True, "temperature": 0}  # fmt: skip
    answer = post("together", dialect_bases["together"], "/completions", body).json()
    assert set(answer) == {"id", "object", "created", "model", "prompt", "choices", "usage"}
    assert answer["object"] == "text.completion"
    choice = answer["choices"][0]
    assert set(choice) == {"index", "text", "seed", "finish_reason", "logprobs"}
    assert set(choice["logprobs"]) == {"token_ids", "tokens", "token_logprobs", "top_logprobs"}
    assert set(answer["prompt"][0]["logprobs"]) == {"token_ids", "tokens", "token_logprobs"}
    assert answer["prompt"][0]["logprobs"]["token_logprobs"][0] is None
    models = httpx.get(dialect_bases["together"].base_url + "/models", timeout=10,
                       headers={"authorization": f"Bearer {KEY}"}).json()  # fmt: skip
    assert isinstance(models, list) and models[0]["id"] == "tiny-base"


def test_fireworks_answer_shape_and_validation(dialect_bases):
    server = dialect_bases["fireworks"]
    body = {"model": "tiny-base", "prompt": [0, 321, 530], "max_tokens": 2, "logprobs": True,
            "top_logprobs": 3, "echo_last": 1, "return_token_ids": True}  # fmt: skip
    choice = post("fireworks", server, "/completions", body).json()["choices"][0]
    entry = choice["logprobs"]["content"][0]
    assert set(entry) == {"token", "logprob", "sampling_logprob", "bytes", "token_id",
                          "text_offset", "top_logprobs"}  # fmt: skip
    assert entry["token_id"] == 530 and len(choice["logprobs"]["content"]) == 3
    assert set(entry["top_logprobs"][0]) == {"token", "logprob", "token_id", "bytes"}
    assert choice["prompt_token_ids"] == [0, 321, 530] and len(choice["token_ids"]) == 2
    refused = post("fireworks", server, "/completions", body | {"stream_options": {}})
    assert refused.status_code == 422
    assert refused.json()["detail"][0]["msg"] == "Extra inputs are not permitted"


def test_sglang_answer_shape(dialect_bases):
    body = {"input_ids": [0, 321, 530], "sampling_params": {"max_new_tokens": 2},
            "return_logprob": True, "top_logprobs_num": 2, "logprob_start_len": 0}  # fmt: skip
    answer = post("sglang", dialect_bases["sglang"], "/generate", body).json()
    assert set(answer) == {"text", "output_ids", "meta_info"}
    meta = answer["meta_info"]
    assert [entry[1] for entry in meta["input_token_logprobs"]] == [0, 321, 530]
    assert meta["input_token_logprobs"][0][0] is None and meta["input_top_logprobs"][0] is None
    assert len(meta["output_top_logprobs"]) == len(answer["output_ids"]) == 2
    assert meta["finish_reason"]["type"] in {"length", "stop"}


def test_ollama_answer_shape_and_defaults(dialect_bases):
    server = dialect_bases["ollama"]
    body = {"model": "tiny-base", "prompt": "def main():", "raw": True, "stream": False,
            "logprobs": True, "top_logprobs": 2, "options": {"num_predict": 2}}  # fmt: skip
    answer = post("ollama", server, "/api/generate", body).json()
    assert {"model", "created_at", "response", "done", "done_reason", "prompt_eval_count",
            "eval_count", "logprobs"} <= set(answer)  # fmt: skip
    assert set(answer["logprobs"][0]) == {"token", "logprob", "bytes", "top_logprobs"}
    assert set(answer["logprobs"][0]["top_logprobs"][0]) == {"token", "logprob", "bytes"}
    refused = post("ollama", server, "/api/generate", body | {"top_logprobs": 21})
    assert refused.status_code == 400
    assert refused.json() == {"error": "top_logprobs must be between 0 and 20"}
