"""Fuzzing every adapter's response parsing: whatever a server answers with a 200, the adapter
returns a usable answer or raises one of our errors (a ProxyClientError), never anything else.

The adapters come from the registry (``proxyclient.adapters.BUILTIN``), so a new dialect is fuzzed
as soon as it is registered. Bodies go through the adapter's own request path (an
``httpx.MockTransport`` answers), as a server's would: arbitrary JSON whose keys are drawn from
the string literals of the adapter's own module (so the fuzzer finds the shapes it looks for),
mutations of real answers of every dialect, and arbitrary bytes.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import json
import math
import re
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from proxyclient.adapters import BUILTIN, connect
from proxyclient.adapters.base import Continuation, Prompt, TopLogprobs
from proxyclient.errors import ProxyClientError

PROMPT = Prompt((5, 6, 7), 2)
K = 3
# Examples per dialect: a quick pass in the fast suite, the whole budget under `slow`.
QUICK_EXAMPLES = 25
EXAMPLES = 150

# Real answers of the dialects we know (trimmed), to mutate.
SEEDS: list[Any] = [
    {  # vLLM / OpenAI completions
        "choices": [
            {
                "text": "a",
                "logprobs": {
                    "tokens": ["token_id:5", "a"],
                    "token_logprobs": [-0.1, -0.5],
                    "top_logprobs": [{"token_id:5": -0.1, "token_id:9": -2.0}, {"a": -0.5}],
                },
                "prompt_logprobs": [None, {"5": {"logprob": -1.0, "rank": 1}}],
                "finish_reason": "length",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1},
    },
    {  # OpenAI chat
        "choices": [
            {
                "message": {"role": "assistant", "content": "a"},
                "logprobs": {
                    "content": [
                        {
                            "token": "a",
                            "logprob": -0.1,
                            "bytes": [97],
                            "top_logprobs": [{"token": "a", "logprob": -0.1, "bytes": [97]}],
                        }
                    ]
                },
            }
        ]
    },
    {  # TGI
        "generated_text": "a",
        "details": {
            "finish_reason": "length",
            "tokens": [{"id": 5, "text": "a", "logprob": -0.1, "special": False}],
            "top_tokens": [[{"id": 5, "text": "a", "logprob": -0.1, "special": False}]],
        },
    },
    {  # llama-server /completion
        "content": "a",
        "tokens": [5],
        "tokens_predicted": 1,
        "completion_probabilities": [
            {"id": 5, "token": "a", "logprob": -0.1, "top_logprobs": [{"id": 5, "logprob": -0.1}]}
        ],
    },
]


def literals_of(adapter: type) -> list[str]:
    """The string constants of the adapter's module and class: the keys its parser looks for."""
    sources = [inspect.getsource(inspect.getmodule(adapter)), inspect.getsource(adapter)]
    found = set()
    for source in sources:
        for node in ast.walk(ast.parse(source)):
            text = node.value if isinstance(node, ast.Constant) else None
            if isinstance(text, str) and 0 < len(text) <= 40 and "\n" not in text:
                found.add(text)
    for seed in SEEDS:
        found |= set(_keys(seed))
    return sorted(found)


def _keys(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [*value, *(k for v in value.values() for k in _keys(v))]
    if isinstance(value, list):
        return [k for v in value for k in _keys(v)]
    return []


def bodies(keys: list[str]) -> st.SearchStrategy[bytes]:
    names = st.sampled_from(keys) | st.text(max_size=8)
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**70), max_value=2**70)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.floats(max_value=0.0, allow_nan=False)
        | st.sampled_from(keys)
        | st.text(max_size=12)
    )
    values = st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(names, inner, max_size=5),
        max_leaves=30,
    )
    mutated = st.builds(_mutate, st.sampled_from(SEEDS), st.randoms(use_true_random=False), values)
    as_json = (values | mutated).map(lambda v: json.dumps(v).encode())
    return as_json | st.binary(max_size=64) | st.sampled_from([b"NaN", b'{"logprob": NaN}'])


def _mutate(seed: Any, rng: Any, replacement: Any) -> Any:
    """``seed`` with one node (chosen by ``rng``) replaced by ``replacement`` or deleted."""
    body = json.loads(json.dumps(seed))
    paths = list(_paths(body))
    if not paths:
        return replacement
    parent, key = paths[rng.randrange(len(paths))]
    if rng.random() < 0.3:
        del parent[key]
    else:
        parent[key] = replacement
    return body


def _paths(value: Any):
    if isinstance(value, dict):
        for key, inner in value.items():
            yield value, key
            yield from _paths(inner)
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            yield value, index
            yield from _paths(inner)


def answering(body: bytes) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(200, content=body, headers={"content-type": "application/json"})
        return httpx.Response(404)  # the probes of a dialect hint

    return httpx.MockTransport(handler)


def assert_usable(answer: Any) -> None:
    tops = answer.tops if isinstance(answer, Continuation) else (answer,)
    for top in tops:
        assert isinstance(top, TopLogprobs)
        assert len(top.token_ids) == len(top.logprobs)
        assert len(top) + top.unresolved > 0
        assert all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in top.token_ids)
        assert all(isinstance(lp, int | float) and not math.isnan(lp) for lp in top.logprobs)
    if isinstance(answer, Continuation):
        assert len(answer.tokens) == len(answer.tops) == len(answer.token_logprobs)


def calls(adapter: Any) -> list[tuple[str, Any]]:
    """Each request path of the adapter: a one-token answer, a draft, a scored continuation."""
    found = [("top_logprobs", lambda: adapter.top_logprobs(PROMPT, K))]
    if adapter.capabilities.drafts:
        found.append(("generate", lambda: adapter.generate(PROMPT, K, 3, greedy=True)))
    if adapter.capabilities.prompt_scoring:
        found.append(("score", lambda: adapter.score(PROMPT, [8, 9], K)))
    return found


@pytest.mark.parametrize(
    "examples",
    [
        pytest.param(QUICK_EXAMPLES, id="quick"),
        pytest.param(EXAMPLES, id="thorough", marks=pytest.mark.slow),
    ],
)
@pytest.mark.parametrize("dialect", sorted(BUILTIN))
def test_any_answer_parses_or_raises_our_error(dialect, examples, tiny_models):
    cls = BUILTIN[dialect]
    keys = literals_of(cls)
    tokenizer = str(tiny_models["anti_expert"])
    holder: dict[str, Any] = {}

    def adapter_for(body: bytes) -> Any:
        return connect(
            dialect,
            "http://fuzz.invalid/v1",
            "fuzz-model",
            api_key="sk-fuzz",
            tokenizer=tokenizer,
            transport=answering(body),
            max_retries=0,
        )

    names = [name for name, _ in calls(adapter_for(b"{}"))]

    @settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(body=bodies(keys), which=st.sampled_from(names))
    def check(body: bytes, which: str) -> None:
        adapter = adapter_for(body)
        call = dict(calls(adapter))[which]
        holder["body"] = body
        try:
            answer = asyncio.run(call())
        except ProxyClientError:
            return
        assert_usable(answer)

    check()


@settings(max_examples=300, deadline=None)
@given(bodies(["logprob", "top_logprobs", "token_id:5"]))
def test_the_fast_json_reader_reads_what_json_reads(body):
    """decode_json tries orjson first: the same value as json's reading, or the same refusal.
    (But integers beyond 64 bits, which orjson reads as floats: no id, count or logprob is one.)"""
    from proxyclient.adapters.http import _finite_only, decode_json

    assume(not re.search(rb"\d{19}", body))
    try:
        expected = json.loads(body, parse_constant=_finite_only)
    except (ValueError, UnicodeDecodeError, RecursionError, ProxyClientError):
        with pytest.raises(ProxyClientError):
            decode_json(body)
        return
    got = decode_json(body)
    assert got == expected and json.dumps(got) == json.dumps(expected)
