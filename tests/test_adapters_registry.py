"""The adapter registry: dialect facts live on the adapter classes, and a dialect registered by name
(built in or through the ``proxyclient.adapters`` entry points) works in connect, discovery and the
CLI with no other change."""

from __future__ import annotations

import ast
import asyncio
import json
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import httpx
import pytest

import proxyclient.adapters as registry
from proxyclient.adapters import BUILTIN, DialectAdapter, available, connect, tokenizer_needed
from proxyclient.adapters.base import Capabilities, Prompt, TopLogprobs
from proxyclient.adapters.discovery import HUGE_K, dialect_hint, probe
from proxyclient.cli import _parser
from proxyclient.commands import _connect
from proxyclient.errors import ConfigError, TopKTooLargeError
from proxyclient.tokenizer import BaseTokenizer


class ToyAdapter(DialectAdapter):
    """A made-up dialect: POST /next {"ids": [...], "k": k} -> {"top": [[id, logprob], ...]}."""

    dialect = "toy"
    needs_tokenizer = True
    probe_ks = (7, HUGE_K)
    raise_k_cap = "restart toy with a larger --cap"
    also_served_by = frozenset({"vllm"})

    def __init__(self, transport, model, *, tokenizer=None, max_k=None):
        super().__init__(transport, model, tokenizer=tokenizer)
        self.capabilities = Capabilities(
            max_k=max_k,
            token_id_prompts=True,
            ids_in_response=True,
            prompt_scoring=False,
            logprobs="raw",
        )

    @classmethod
    def default_tokenizer(cls, model: str) -> str | None:
        return "toy-tokenizer" if model.startswith("toy-") else None

    def build_request(self, prompt: Prompt, k: int) -> tuple[str, dict[str, Any]]:
        return "/next", {"ids": list(prompt.ids), "k": k}

    def parse_response(self, body: Any, prompt: Prompt, k: int) -> TopLogprobs:
        return TopLogprobs.from_pairs(((i, lp) for i, lp in body["top"]), k=k)


def toy_server(cap: int = 50, models: dict | None = None) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json=models) if models else httpx.Response(404)
        if request.method == "GET":
            return httpx.Response(404)
        k = json.loads(request.content)["k"]
        if k > cap:
            return httpx.Response(400, json={"error": f"logprobs: maximum allowed: {cap}"})
        return httpx.Response(200, json={"top": [[i, -0.5 * (i + 1)] for i in range(k)]})

    return httpx.MockTransport(handler)


@pytest.fixture
def tokenizer(hf_models) -> BaseTokenizer:
    return BaseTokenizer(hf_models["tokenizer"])


@pytest.fixture
def with_toy(monkeypatch: pytest.MonkeyPatch) -> None:
    """``toy`` registered the way a third-party package does: an entry point naming its class."""
    entry = EntryPoint("toy", f"{__name__}:ToyAdapter", "proxyclient.adapters")
    monkeypatch.setattr(
        registry, "entry_points", lambda group: [entry] if group == entry.group else []
    )


def api_choices(parser) -> dict[str, list[str]]:
    commands = next(a for a in parser._actions if a.dest == "command").choices
    return {
        name: next(a for a in command._actions if a.dest == "api").choices
        for name, command in commands.items()
        if any(a.dest == "api" for a in command._actions)
    }


def test_builtin_adapters_are_registered_under_their_dialect():
    assert list(BUILTIN) == [
        "vllm", "openai", "openai-chat", "tgi", "llamacpp",
        "together", "fireworks", "sglang", "ollama", "gemini", "deepseek", "openrouter",
    ]  # fmt: skip
    assert all(name == adapter.dialect for name, adapter in BUILTIN.items())
    assert dict(available(), **BUILTIN) == available()


def test_the_cli_offers_exactly_the_registered_dialects():
    choices = api_choices(_parser())
    assert set(choices) == {"generate", "choose", "inspect", "batch", "serve"}
    assert all(c == list(available()) for c in choices.values())


def test_a_registered_dialect_needs_no_other_change(with_toy, tokenizer):
    assert available()["toy"] is ToyAdapter
    assert all("toy" in c for c in api_choices(_parser()).values())
    toy = connect("toy", "http://server", "m", tokenizer=tokenizer, transport=toy_server())
    assert toy.tokenizer is tokenizer
    top = asyncio.run(toy.top_logprobs(Prompt((1, 2), 2), 3))
    assert top.token_ids == (0, 1, 2)
    assert asyncio.run(probe(toy, Prompt((1, 2), 2))).max_k == 7  # its first probe k answered
    with pytest.raises(
        TopKTooLargeError, match=r"at most 50 .* or restart toy with a larger --cap\.$"
    ):
        asyncio.run(toy.top_logprobs(Prompt((1, 2), 2), 51))


def test_a_registered_dialect_s_tokenizer_facts_reach_connect_and_the_cli(with_toy, monkeypatch):
    loaded = []
    monkeypatch.setattr(registry, "load_base_tokenizer", lambda spec: loaded.append(spec) or spec)
    assert tokenizer_needed("toy", "m") and not tokenizer_needed("toy", "toy-1")
    # Without one, the adapter has none yet: ProxyTuner lends it the proxies' (test_tuner.py).
    assert connect("toy", "http://server", "m").tokenizer is None
    assert connect("toy", "http://server", "toy-1").tokenizer == "toy-tokenizer"

    def cli_args(model: str, base_tokenizer: str | None = None) -> Any:
        argv = ["inspect", "--api", "toy", "--base-url", "http://server", "--base-model", model]
        return _parser().parse_args(
            argv + (["--base-tokenizer", base_tokenizer] * bool(base_tokenizer))
        )

    # The CLI connects as Python does: the same defaults.
    assert _connect(cli_args("m")).tokenizer is None
    assert _connect(cli_args("toy-1")).tokenizer == "toy-tokenizer"
    assert _connect(cli_args("toy-1", "given")).tokenizer == "given"
    assert loaded == ["toy-tokenizer", "toy-tokenizer", "given"]


def test_a_builtin_name_is_not_taken_over_by_an_entry_point(monkeypatch):
    entry = EntryPoint("vllm", f"{__name__}:ToyAdapter", "proxyclient.adapters")
    monkeypatch.setattr(registry, "entry_points", lambda group: [entry])
    assert available()["vllm"] is BUILTIN["vllm"]


@pytest.mark.parametrize("api", ["vllm", "llamacpp"])
def test_id_dialects_keep_the_tokenizer_they_are_given(api, tokenizer):
    assert connect(api, "http://server/v1", "m").tokenizer is None
    assert connect(api, "http://server/v1", "m", tokenizer=tokenizer).tokenizer is tokenizer
    hf = connect(api, "http://server/v1", "m", tokenizer=tokenizer.inner).tokenizer
    assert isinstance(hf, BaseTokenizer) and hf.inner is tokenizer.inner


def test_openai_model_names_imply_their_tiktoken_encoding(monkeypatch):
    for api in ("openai", "openai-chat"):
        assert BUILTIN[api].default_tokenizer("gpt-4o") == "tiktoken:o200k_base"
        assert BUILTIN[api].default_tokenizer("my-llama") is None
        assert not tokenizer_needed(api, "gpt-4o") and tokenizer_needed(api, "my-llama")
    assert tokenizer_needed("tgi", "gpt-4o")
    assert not tokenizer_needed("vllm", "my-llama") and not tokenizer_needed("llamacpp", "m")
    assert BUILTIN["vllm"].default_tokenizer("gpt-4o") is None
    loaded = []
    monkeypatch.setattr(registry, "load_base_tokenizer", lambda spec: loaded.append(spec) or spec)
    assert (
        connect("openai", "https://api.openai.com/v1", "gpt-4o").tokenizer == "tiktoken:o200k_base"
    )
    assert connect("openai", "http://server/v1", "gpt-4o", tokenizer="mine").tokenizer == "mine"


def test_a_factory_function_gets_a_tokenizer_only_when_there_is_one(monkeypatch, tokenizer):
    calls = []

    class Plain:
        def __init__(self, transport, model, **options):
            calls.append(options)
            self.name, self.transport = model, transport

    def factory(transport, model, **options):
        return Plain(transport, model, **options)

    monkeypatch.setitem(BUILTIN, "plain", factory)
    assert connect("plain", "http://server", "m", max_k=3).tokenizer is None
    assert connect("plain", "http://server", "m", tokenizer=tokenizer).tokenizer is tokenizer
    assert calls == [{"max_k": 3}, {"tokenizer": tokenizer}]


def test_unknown_dialects_and_urls_are_config_errors():
    with pytest.raises(ConfigError, match="unknown api 'nope'; available: deepseek, fireworks"):
        connect("nope", "http://server", "m")
    with pytest.raises(ConfigError, match="unknown api 'nope'"):
        tokenizer_needed("nope", "m")
    # An API that cannot be a base says why, not only that it is unknown.
    with pytest.raises(ConfigError, match=r"^Mistral's chat API .* documents no logprobs"):
        connect("mistral", "https://api.mistral.ai/v1", "mistral-small-latest")
    with pytest.raises(ConfigError, match="must start with http"):
        connect("vllm", "server:8000", "m")


def test_probe_asks_each_adapter_for_its_own_ks():
    asked = []

    def handler(request: httpx.Request) -> httpx.Response:
        k = json.loads(request.content)["logprobs"]
        asked.append(k)
        if k == -1 or k > 20:
            error = f"Requested sample logprobs of {k}, which is greater than max allowed: 20"
            return httpx.Response(400, json={"error": {"message": error, "code": 400}})
        top = {f"token_id:{i}": -float(i + 1) for i in range(k)}
        return httpx.Response(200, json={"choices": [{"logprobs": {"top_logprobs": [top]}}]})

    vllm = connect("vllm", "http://server/v1", "m", transport=httpx.MockTransport(handler))
    assert asyncio.run(probe(vllm, Prompt((1,), 1))).max_k == 20
    assert asked == [1, -1, HUGE_K]
    assert BUILTIN["vllm"].probe_ks == (-1, HUGE_K)
    assert all(BUILTIN[api].probe_ks == (HUGE_K,) for api in ("openai", "tgi", "llamacpp"))


def models_answer(owner: str) -> dict:
    return {"object": "list", "data": [{"id": "m", "object": "model", "owned_by": owner}]}


@pytest.mark.parametrize(
    ("api", "owner", "hint"),
    [
        ("openai", "vllm", ""),
        ("openai-chat", "vllm", ""),
        ("openai-chat", "openai", ""),
        ("vllm", "vllm", ""),
        ("vllm", "openai", "seems to speak openai, not vllm: try --api openai."),
        ("openai", "openai", ""),
    ],
)
def test_the_dialect_hint_asks_the_adapter_which_servers_speak_it(api, owner, hint):
    transport = httpx.MockTransport(
        lambda r: (
            httpx.Response(200, json=models_answer(owner))
            if r.url.path == "/v1/models"
            else httpx.Response(404)
        )
    )
    adapter = connect(api, "http://server/v1", "m", tokenizer=object(), transport=transport)
    found = asyncio.run(dialect_hint(adapter.transport, type(adapter)))
    assert found.endswith(hint) and bool(found) == bool(hint)


def test_served_by():
    assert BUILTIN["openai"].served_by("openai") and BUILTIN["openai"].served_by("vllm")
    assert not BUILTIN["vllm"].served_by("openai") and not BUILTIN["tgi"].served_by("vllm")


def test_no_dialect_module_imports_another():
    adapters_dir = Path(registry.__file__).parent
    dialect_modules = {adapter.__module__ for adapter in BUILTIN.values()}
    for module in dialect_modules:
        source = (adapters_dir / f"{module.rsplit('.', 1)[1]}.py").read_text()
        imported = {
            node.module
            for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.ImportFrom) and node.module
        }
        assert not imported & (dialect_modules - {module}), module
