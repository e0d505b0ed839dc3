"""The OpenAI-compatible server steering a real vLLM server (the session's `servers`), on uvicorn:
the official `openai` package and lm-evaluation-harness (`local-completions`) as its clients,
`proxyclient serve` as a command, and a base that goes away in the middle of a stream.

What the server answers must be what ProxyTuner computes when called directly (a separate tuner
on the same vLLM server): greedy text token for token, logprobs, and lm-eval's scores.
"""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from proxyclient import GenerationConfig, ProxyTuner, connect
from proxyclient.server import create_app
from proxyclient.server.main import ServerThread
from tests.support.constants import API_KEY, BASE_NAME, REPO

pytestmark = pytest.mark.integration

NAME = "tiny-proxy-tuned"
DEFAULTS = GenerationConfig(max_new_tokens=16)
PROMPTS = ["def main():", "import os\nclass Foo(object):\n    "]
MESSAGES = [{"role": "user", "content": "Write a loop"}]
LM_EVAL_TASKS = REPO / "tests" / "fixtures" / "lm_eval"
CLIENT_KEY = "client-key-for-the-proxy"


def tuner_on(base_url: str, tiny_models, **options) -> ProxyTuner:
    base = connect("vllm", base_url, BASE_NAME, **options)
    return ProxyTuner(base, tiny_models["expert"], tiny_models["anti_expert"], device="cpu")


@pytest.fixture(scope="module")
def reference(servers, tiny_models):
    with tuner_on(servers["full"].base_url, tiny_models) as tuner:
        yield tuner


@pytest.fixture(scope="module")
def served(servers, tiny_models):
    """The app on uvicorn in a thread, its tuner steering the full vLLM server."""
    tuner = tuner_on(servers["full"].base_url, tiny_models)
    app = create_app(tuner, served_model_name=NAME, defaults=DEFAULTS, close_tuner=True)
    with ServerThread(app) as server:
        yield server


@pytest.fixture(scope="module")
def client(served):
    from openai import OpenAI

    return OpenAI(base_url=f"{served.url}/v1", api_key="not-checked", max_retries=0, timeout=120)


# -- the openai package -----------------------------------------------------------------------


@pytest.mark.parametrize("prompt", PROMPTS)
def test_completions_equal_the_tuner(client, reference, prompt):
    expected = reference.generate(prompt, DEFAULTS, trace=2)
    answer = client.completions.create(model=NAME, prompt=prompt, temperature=0, logprobs=2)
    choice = answer.choices[0]
    assert choice.text == expected.text
    assert choice.logprobs.tokens == [s.text for s in expected.steps]
    # The base's numbers are vLLM's as sent; the tuned ones agree to float32's rounding, since
    # streamed drafts batch the proxies' forwards by what has arrived (its timing).
    tuned = [s.logprob for s in expected.steps]
    assert choice.logprobs.token_logprobs == pytest.approx(tuned, rel=1e-5, abs=1e-6)
    assert choice.logprobs.model_extra["base_token_logprobs"] == pytest.approx(
        [s.base_logprob for s in expected.steps]
    )
    assert answer.usage.completion_tokens == len(expected.token_ids)
    assert answer.usage.model_extra["base"]["requests"] == expected.usage.requests
    streamed = client.completions.create(model=NAME, prompt=prompt, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == expected.text


def test_chat_equals_the_tuner(client, reference):
    expected = reference.generate(MESSAGES, DEFAULTS, trace=3)
    reply = client.chat.completions.create(
        model=NAME, messages=MESSAGES, logprobs=True, top_logprobs=3
    )
    assert reply.choices[0].message.content == expected.text
    content = reply.choices[0].logprobs.content
    assert [c.token for c in content] == [s.text for s in expected.steps]
    assert [len(c.top_logprobs) for c in content] == [3] * len(content)
    streamed = client.chat.completions.create(
        model=NAME, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids)


def test_concurrent_requests_share_the_models(served, reference):
    """Eight streams at once: each gets what it would alone (the forwards were batched)."""
    import concurrent.futures

    from openai import OpenAI

    prompts = [*PROMPTS, "for i in range(10):", "x = "] * 2
    expected = {p: reference.generate(p, DEFAULTS).text for p in set(prompts)}

    def one(prompt: str) -> str:
        client = OpenAI(base_url=f"{served.url}/v1", api_key="x", max_retries=0, timeout=120)
        stream = client.completions.create(model=NAME, prompt=prompt, stream=True)
        return "".join(chunk.choices[0].text for chunk in stream)

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        texts = list(pool.map(one, prompts))
    assert texts == [expected[p] for p in prompts]


def test_errors_in_openais_shape(client):
    import openai

    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=NAME, prompt="x", n=9)
    assert caught.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=NAME, messages=[{"role": "system", "content": "x"}])


# -- lm-evaluation-harness --------------------------------------------------------------------


def test_lm_eval_scores_equal_the_tuners(served, reference, monkeypatch):
    """lm-eval's `local-completions` model on two local tasks: generate_until (greedy, cut at a
    newline) and multiple choice (loglikelihood of each choice, through echo + logprobs). Its
    tokenizer is the server's (`/tokenize`, detected by lm-eval), so it needs no local copy."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(REPO)  # the task files name their data relative to the repository
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={
            "model": NAME,
            "base_url": f"{served.url}/v1/completions",
            "num_concurrent": 4,
            "max_retries": 1,
        },
        tasks=["proxyclient_generate", "proxyclient_choice"],
        task_manager=TaskManager(include_path=str(LM_EVAL_TASKS)),
        log_samples=True,
        bootstrap_iters=0,
    )
    generate = results["samples"]["proxyclient_generate"]
    assert len(generate) == 4
    matches = []
    for sample in generate:
        doc = sample["doc"]
        expected = reference.generate(doc["prompt"], max_new_tokens=8, stop=["\n"]).text
        assert sample["filtered_resps"] == [expected]
        matches.append(expected == doc["target"])
    got = results["results"]["proxyclient_generate"]["exact_match,none"]
    assert got == sum(matches) / len(matches)

    choice = results["samples"]["proxyclient_choice"]
    assert len(choice) == 5
    right = []
    for sample in choice:
        doc = sample["doc"]
        scores = [reference.score(doc["question"], " " + c) for c in doc["choices"]]
        answers = [r[0] for r in sample["resps"]]  # per choice: [(loglikelihood, is_greedy)]
        assert [a[0] for a in answers] == pytest.approx([s.logprob for s in scores], abs=1e-4)
        assert [a[1] for a in answers] == [s.is_greedy for s in scores]
        logprobs = [s.logprob for s in scores]
        right.append(logprobs.index(max(logprobs)) == doc["label"])
    assert results["results"]["proxyclient_choice"]["acc,none"] == sum(right) / len(right)


# -- `proxyclient serve` ----------------------------------------------------------------------


def test_the_serve_command(servers, tiny_models, reference, tmp_path):
    """The command on the capped vLLM server (which wants its own key): clients need the server's
    key; the base's key shows up in no answer and no log line."""
    from openai import APIStatusError, AuthenticationError, OpenAI

    from scripts.bench_server import wait_healthy
    from scripts.vllm_server import free_port

    port = free_port()
    log = tmp_path / "serve.log"
    command = [
        sys.executable, "-m", "proxyclient", "serve", "--api", "vllm",
        "--base-url", servers["capped"].base_url, "--base-model", BASE_NAME,
        "--base-api-key", API_KEY, "--expert", str(tiny_models["expert"]),
        "--anti-expert", str(tiny_models["anti_expert"]), "--device", "cpu", "--threads", "1",
        "--port", str(port), "--served-model-name", NAME, "--api-key", CLIENT_KEY,
        "--max-new-tokens", "8", "--max-model-len", "256",
    ]  # fmt: skip
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, process, log)  # raises SystemExit (a failure) if it never comes up
        good = OpenAI(base_url=f"{url}/v1", api_key=CLIENT_KEY, max_retries=0, timeout=120)
        answer = good.completions.create(model=NAME, prompt=PROMPTS[0])
        assert answer.choices[0].text == reference.generate(PROMPTS[0], max_new_tokens=8).text
        bad = OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(AuthenticationError):
            bad.completions.create(model=NAME, prompt=PROMPTS[0])
        with pytest.raises(APIStatusError) as caught:  # longer than the 256 of --max-model-len
            good.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=300)
        assert caught.value.status_code == 400 and API_KEY not in caught.value.response.text
    finally:
        process.terminate()
        process.wait(timeout=30)
    text = log.read_text()
    assert "clients must send the server API key" in text
    assert API_KEY not in text and CLIENT_KEY not in text
    assert "Traceback" not in text


# -- the base going away ----------------------------------------------------------------------


def test_a_base_that_goes_away_mid_stream(servers, tiny_models):
    """A relay in front of vLLM, closed while a stream runs: the stream ends with an error event
    and [DONE]; the server keeps answering (now 502 for generations, 200 for /health)."""
    from scripts.bench_speed import LatencyRelay

    relay = LatencyRelay(servers["full"].port).start()
    try:
        relay.set_rtt(20)
        tuner = tuner_on(f"{relay.root_url}/v1", tiny_models, max_retries=0, timeout=5)
        app = create_app(tuner, served_model_name=NAME, defaults=DEFAULTS, close_tuner=True)
        body = {"model": NAME, "prompt": PROMPTS[0], "max_tokens": 200, "stream": True,
                "speculate": "off"}  # fmt: skip
        with ServerThread(app) as server:
            chunks = []
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    chunks.append(line[len("data: ") :])
                    if len(chunks) == 3:
                        relay.close()
            assert chunks[-1] == "[DONE]"
            error = json.loads(chunks[-2])["error"]
            assert error["code"] == "base_unreachable" and error["type"] == "server_error"
            assert all("error" not in json.loads(c) for c in chunks[:-2])
            assert httpx.get(f"{server.url}/health").status_code == 200
            again = httpx.post(f"{server.url}/v1/completions", json={**body, "stream": False})
            assert again.status_code == 502 and again.json()["error"]["code"] == "base_unreachable"
            assert app.state.server.metrics.active == 0
    finally:
        relay.close()
