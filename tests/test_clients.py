"""The server (proxyclient.server) and the clients people already point at OpenAI-compatible
servers, each the real package from the registry: lm-evaluation-harness (its remote tokenizer,
``local-completions`` and ``local-chat-completions``), LangChain's ``ChatOpenAI``, LiteLLM
(``hosted_vllm/`` and ``openai/``), DSPy (``dspy.LM``, chat and text) and Inspect AI (its
``openai-api`` provider). The app runs on uvicorn in a thread, its tuner on the tiny base served
in-process (tests/support/local_base.py): no vLLM, no network, seconds per test. Each checks that
what the client got is what a separate ProxyTuner on the same models gives, greedy; each test's id
names the client's version (``[litellm-1.110.2]``), and its failures say it too.
"""

from __future__ import annotations

import json
import os
from importlib import metadata

import pytest

from proxyclient import GenerationConfig, ProxyTuner
from proxyclient.server import create_app
from proxyclient.server.main import ServerThread
from tests.support.constants import REPO
from tests.support.local_base import LocalBase

# LiteLLM fetches its model price map from the network at import unless told to use its own copy.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

NAME = "tiny-proxy"
KEY = "sk-client-key-for-the-proxy"
# Five client packages, two full lm-eval runs: 30-50 s together, so outside the fast suite.
pytestmark = pytest.mark.slow

MAX_TOKENS = 8
DEFAULTS = GenerationConfig(max_new_tokens=MAX_TOKENS, base_k=20)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
LM_EVAL_TASKS = REPO / "tests" / "fixtures" / "lm_eval"


def client(dist: str) -> pytest.ParameterSet:
    """The installed version of ``dist`` as the test's parameter (and id). The [test] extra
    installs every client: a missing one fails its test rather than skipping it."""
    try:
        version = metadata.version(dist)
    except metadata.PackageNotFoundError:
        version = "not installed: pip install -e '.[test]'"
    return pytest.param(f"{dist} {version}", id=f"{dist}-{version.split(':')[0]}")


def make_tuner(tiny_models, hf_models) -> ProxyTuner:
    base = LocalBase(hf_models["base"], drafts=True)
    return ProxyTuner(base, tiny_models["expert"], tiny_models["anti_expert"], device="cpu")


@pytest.fixture(scope="module")
def reference(tiny_models, hf_models):
    with make_tuner(tiny_models, hf_models) as tuner:
        yield tuner


@pytest.fixture(scope="module")
def server(tiny_models, hf_models):
    """The app on uvicorn in a thread; clients must send KEY (so each is seen to send it)."""
    tuner = make_tuner(tiny_models, hf_models)
    app = create_app(
        tuner, served_model_name=NAME, api_key=KEY, defaults=DEFAULTS, close_tuner=True
    )
    with ServerThread(app) as running:
        yield running


def greedy(reference: ProxyTuner, prompt, **options) -> str:
    return reference.generate(prompt, DEFAULTS, **options).text


# -- lm-evaluation-harness --------------------------------------------------------------------


def lm_eval_run(monkeypatch, model: str, model_args: dict, tasks: list[str], **options) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(REPO)  # the task files name their data relative to the repository
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # what lm-eval's completions requests send
    return lm_eval.simple_evaluate(
        model=model,
        model_args={"model": NAME, "max_retries": 1, "auth_token": KEY, **model_args},
        tasks=tasks,
        task_manager=TaskManager(include_path=str(LM_EVAL_TASKS)),
        log_samples=True,
        bootstrap_iters=0,
        **options,
    )


@pytest.mark.parametrize("version", [client("lm_eval")])
def test_lm_eval_remote_tokenizer_reads_the_servers(server, reference, version):
    """lm-eval's RemoteTokenizer on the server's /tokenizer_info, /tokenize and /detokenize:
    what it reads is the base tokenizer's (EOS, BOS, ids, text, the chat template)."""
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

    url = f"{server.url}/v1/completions"
    assert check_remote_tokenizer_support(url, auth_token=KEY), version
    remote = RemoteTokenizer(url, auth_token=KEY)
    hf = reference.tokenizer
    assert (remote.eos_token, remote.bos_token) == (hf.eos_token, hf.bos_token), version
    assert (remote.eos_token_id, remote.bos_token_id) == (hf.eos_token_id, hf.bos_token_id)
    text = "def main():\n    return 1"
    ids = hf(text, add_special_tokens=False).input_ids
    assert remote.encode(text) == ids, version
    assert remote.batch_decode([ids, ids[:3]]) == [text, hf.decode(ids[:3])], version
    chat = [{"role": "user", "content": "Hi"}]
    rendered = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert remote.apply_chat_template(chat) == rendered, version


@pytest.mark.parametrize("version", [client("lm_eval")])
def test_lm_eval_local_completions_with_the_remote_tokenizer(
    server, reference, monkeypatch, version
):
    """``local-completions`` with ``tokenizer_backend=remote`` (no local tokenizer): greedy
    generations cut at a newline, and multiple choice scored through echo + logprobs, equal the
    tuner's generate and score."""
    results = lm_eval_run(
        monkeypatch,
        "local-completions",
        {
            "base_url": f"{server.url}/v1/completions",
            "tokenizer_backend": "remote",
            "num_concurrent": 2,
        },
        ["proxyclient_generate", "proxyclient_choice"],
    )
    generate = results["samples"]["proxyclient_generate"]
    assert len(generate) == 4, version
    for sample in generate:
        # lm-eval adds the EOS text (from /tokenizer_info) to the task's stop sequences.
        expected = greedy(reference, sample["doc"]["prompt"], stop=["\n", "</s>"])
        assert sample["filtered_resps"] == [expected], version
    choice = results["samples"]["proxyclient_choice"]
    assert len(choice) == 5, version
    for sample in choice:
        doc = sample["doc"]
        scores = [reference.score(doc["question"], " " + c, DEFAULTS) for c in doc["choices"]]
        answers = [r[0] for r in sample["resps"]]  # per choice: [(loglikelihood, is_greedy)]
        assert [a[0] for a in answers] == pytest.approx([s.logprob for s in scores], abs=1e-4)
        assert [a[1] for a in answers] == [s.is_greedy for s in scores], version


@pytest.mark.parametrize("version", [client("lm_eval")])
def test_lm_eval_local_chat_completions_with_the_chat_template(
    server, reference, monkeypatch, version
):
    """``local-chat-completions`` with ``apply_chat_template``: generate_until over the chat
    endpoint, each prompt one user message; the answers equal the tuner's on those messages."""
    results = lm_eval_run(
        monkeypatch,
        "local-chat-completions",
        {"base_url": f"{server.url}/v1/chat/completions"},
        ["proxyclient_generate"],
        apply_chat_template=True,
    )
    samples = results["samples"]["proxyclient_generate"]
    assert len(samples) == 4, version
    for sample in samples:
        (context, _), *_ = sample["arguments"]  # the chat, as lm-eval sends it: JSON text
        # lm-eval's JsonChatStr (a NamedTuple of the JSON text); some installs log it as a
        # plain 1-tuple, so it is read by position
        messages = json.loads(context[0])
        assert messages == [{"role": "user", "content": sample["doc"]["prompt"]}], version
        assert sample["filtered_resps"] == [greedy(reference, messages, stop=["\n"])], version


# -- LangChain --------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [client("langchain-openai")])
def test_langchain_chat_openai(server, reference, version):
    """ChatOpenAI: invoke, stream, and the proxy-tuned logprobs in ``response_metadata``."""
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(**llm_options(server))
    expected = reference.generate(MESSAGES, DEFAULTS, trace=2)
    assert expected.text, "the tuner answers nothing: the check would be vacuous"
    prompt = [(m["role"], m["content"]) for m in MESSAGES]
    reply = llm.invoke(prompt)
    assert reply.content == expected.text, version
    assert reply.response_metadata["model_name"] == NAME, version
    assert reply.usage_metadata["output_tokens"] == len(expected.token_ids), version
    assert "".join(chunk.content for chunk in llm.stream(prompt)) == expected.text, version

    scored = llm.bind(logprobs=True, top_logprobs=2).invoke(prompt)
    content = scored.response_metadata["logprobs"]["content"]
    assert [c["token"] for c in content] == [s.text for s in expected.steps], version
    assert [c["logprob"] for c in content] == pytest.approx([s.logprob for s in expected.steps])
    assert [len(c["top_logprobs"]) for c in content] == [2] * len(content), version
    streamed = list(ChatOpenAI(**llm_options(server), logprobs=True).stream(prompt))
    tokens = [c["token"] for chunk in streamed for c in _chunk_logprobs(chunk)]
    assert tokens == [s.text for s in expected.steps], version


def llm_options(server) -> dict:
    return {
        "base_url": f"{server.url}/v1",
        "api_key": KEY,
        "model": NAME,
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
        "max_retries": 0,
        "timeout": 60,
    }


def _chunk_logprobs(chunk) -> list[dict]:
    logprobs = chunk.response_metadata.get("logprobs") or {}
    return logprobs.get("content") or []


# -- LiteLLM ----------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["hosted_vllm", "openai"])
@pytest.mark.parametrize("version", [client("litellm")])
def test_litellm_completion(server, reference, route, version):
    """``litellm.completion`` on the vLLM route and the OpenAI one, whole and streamed."""
    import litellm

    litellm.telemetry = False
    options = {
        "model": f"{route}/{NAME}",
        "api_base": f"{server.url}/v1",
        "api_key": KEY,
        "messages": MESSAGES,
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
        "num_retries": 0,
        "timeout": 60,
    }
    expected = reference.generate(MESSAGES, DEFAULTS)
    assert expected.text, "the tuner answers nothing: the check would be vacuous"
    answer = litellm.completion(**options)
    assert answer.choices[0].message.content == expected.text, version
    assert answer.usage.completion_tokens == len(expected.token_ids), version
    chunks = litellm.completion(**options, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text, version


# -- DSPy -------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["chat", "text"])
@pytest.mark.parametrize("version", [client("dspy")])
def test_dspy_predict(server, reference, model_type, version):
    """``dspy.LM("openai/NAME")`` (chat: /v1/chat/completions; text: /v1/completions) under one
    ``dspy.Predict`` call, no cache. The tiny models write no DSPy field markers, so the adapter
    is the ChatAdapter with its parse step taking the whole answer as the output field: the
    request is DSPy's own, the answer is checked against the tuner on what DSPy sent."""
    import dspy

    class WholeAnswer(dspy.ChatAdapter):
        def parse(self, signature, completion):
            return {"answer": completion}

    lm = dspy.LM(
        f"openai/{NAME}",
        api_base=f"{server.url}/v1",
        api_key=KEY,
        model_type=model_type,
        temperature=0,
        max_tokens=MAX_TOKENS,
        cache=False,
        num_retries=0,
    )
    predict = dspy.Predict("question -> answer")
    with dspy.context(lm=lm, adapter=WholeAnswer(use_json_adapter_fallback=False)):
        prediction = predict(question="What is 2 + 2?")
    (call,) = lm.history
    messages = call["messages"]
    if model_type == "chat":
        sent = messages
    else:  # dspy's text completions join the messages' contents (dspy/clients/lm.py)
        sent = "\n\n".join([m["content"] for m in messages] + ["BEGIN RESPONSE:"])
    expected = greedy(reference, sent)
    assert expected, "the tuner answers nothing: the check would be vacuous"
    assert prediction.answer == expected, version


# -- Inspect AI -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [client("inspect-ai")])
def test_inspect_ai_task(server, reference, tmp_path, monkeypatch, version):
    """Inspect's OpenAI-compatible provider (``openai-api/SERVICE/MODEL``, its base URL and key
    from ``SERVICE_BASE_URL`` / ``SERVICE_API_KEY``) running a two-sample task from a local file,
    its log in tmp_path: each sample's completion is the tuner's on its message."""
    from inspect_ai import Task
    from inspect_ai import eval as inspect_eval
    from inspect_ai.dataset import json_dataset
    from inspect_ai.scorer import exact
    from inspect_ai.solver import generate

    samples = [
        {"input": "Hi there", "target": "Hello"},
        {"input": "Write a loop", "target": "for"},
    ]
    data = tmp_path / "samples.jsonl"
    data.write_text("".join(json.dumps(s) + "\n" for s in samples))
    monkeypatch.setenv("PROXY_BASE_URL", f"{server.url}/v1")
    monkeypatch.setenv("PROXY_API_KEY", KEY)
    monkeypatch.setenv("INSPECT_LOG_DIR", str(tmp_path / "logs"))
    task = Task(dataset=json_dataset(str(data)), solver=generate(), scorer=exact())
    (log,) = inspect_eval(
        task,
        model=f"openai-api/proxy/{NAME}",
        log_dir=str(tmp_path / "logs"),
        display="none",
        temperature=0,
        max_tokens=MAX_TOKENS,
        max_retries=0,
    )
    assert log.status == "success", f"{version}: {log.error}"
    for sample in sorted(log.samples, key=lambda s: s.id):
        expected = greedy(reference, [{"role": "user", "content": sample.input}])
        assert expected, "the tuner answers nothing: the check would be vacuous"
        assert sample.output.completion == expected, version
    assert list((tmp_path / "logs").iterdir()), version
