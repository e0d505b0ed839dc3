"""Structured outputs: a JSON schema, any JSON object, a regex, choices or a grammar constrain the
proxy-tuned distribution over the base's tokens.

With the whole vocabulary (k = -1) a constrained generation equals the all-local formula with the
same mask applied (the reference builds its mask with llguidance's own Hugging Face tokenizer, not
ours); every output of a suite of schemas parses and validates; speculation (base, streamed and
expert drafts) gives what one token per request gives; the grammar follows the Sequence through
drafts taken back; what cannot be compiled or followed is a clear error, from Python, the CLI and
the server.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
import torch

from proxyclient import GenerationConfig, ProxyTuner
from proxyclient.cli import main
from proxyclient.constraints import Constraint, compiled
from proxyclient.errors import ConfigError
from proxyclient.server import create_app
from tests.support.local_base import LocalBase
from tests.support.reference import assert_same_tokens, proxy_tuned_greedy

PERSON = {
    "type": "object",
    "properties": {
        "person": {"type": "string", "maxLength": 10},
        "answer": {"type": "integer", "minimum": 0, "maximum": 999},
    },
    "required": ["person", "answer"],
    "additionalProperties": False,
}
SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "who": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 8},
                    "age": {"type": "integer", "minimum": 0, "maximum": 120},
                },
                "required": ["name", "age"],
                "additionalProperties": False,
            },
            "ok": {"type": "boolean"},
        },
        "required": ["who", "ok"],
        "additionalProperties": False,
    },
    "array": {
        "type": "array",
        "items": {"type": "integer", "minimum": -50, "maximum": 50},
        "minItems": 1,
        "maxItems": 4,
    },
    "enum": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}},
        "required": ["color"],
        "additionalProperties": False,
    },
    "numbers": {
        "type": "object",
        "properties": {
            "x": {"type": "number", "multipleOf": 0.25, "minimum": -10, "maximum": 10},
            "n": {"type": "integer", "minimum": -5, "maximum": 5},
        },
        "required": ["x", "n"],
        "additionalProperties": False,
    },
    "escapes": {
        "type": "object",
        "properties": {
            "said": {"const": 'she said "hi"\n\\ok'},
            "tail": {"type": "string", "maxLength": 4},
        },
        "required": ["said", "tail"],
        "additionalProperties": False,
    },
    "unicode": {
        "type": "object",
        "properties": {"word": {"enum": ["héllo", "日本", "ñ"]}},
        "required": ["word"],
        "additionalProperties": False,
    },
}
PROMPT = "def main():"


@pytest.fixture(scope="module")
def tuner(tiny_models, hf_models):
    base = LocalBase(hf_models["base"], drafts=True)
    with ProxyTuner(base, tiny_models["expert"], tiny_models["anti_expert"], device="cpu") as t:
        yield t


def llguidance_mask(hf_tokenizer, constraint: Constraint, size: int):
    """``allowed(generated)`` for the reference: a fresh llguidance matcher over llguidance's own
    tokenizer for ``hf_tokenizer``, fed the generated ids."""
    import llguidance
    import llguidance.hf

    tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer)

    def allowed(generated: list[int]) -> torch.Tensor:
        matcher = llguidance.LLMatcher(tokenizer, compiled(constraint), log_level=0)
        assert matcher.consume_tokens(generated), matcher.get_error()
        bias = torch.frombuffer(bytearray(matcher.compute_logit_bias()), dtype=torch.uint8)
        mask = torch.zeros(size, dtype=torch.bool)
        mask[: min(size, bias.numel())] = bias[:size] > 0
        return mask

    return allowed


# -- the constraint itself --------------------------------------------------------------------


def test_each_kind_round_trips_through_its_json_form():
    for constraint in (
        Constraint.json_schema(PERSON),
        Constraint.json_object(),
        Constraint.regex("[0-9]{3}"),
        Constraint.choice(["yes", "no"]),
        Constraint.grammar('start: "a" "b"*'),
        Constraint.grammar('root ::= "a" [0-9]+'),
    ):
        data = json.loads(json.dumps(constraint.to_dict()))
        assert Constraint.from_dict(data) == constraint
        config = GenerationConfig(constraint=data)  # a batch line or a resume file's form
        assert config.constraint == constraint
        assert GenerationConfig.from_dict(config.to_dict()) == config
    assert Constraint.json_schema(json.dumps(PERSON)) == Constraint.json_schema(PERSON)


@pytest.mark.parametrize(
    ("build", "named"),
    [
        (lambda: Constraint.json_schema({"type": "object", "if": {"type": "string"}}), '"if"'),
        (lambda: Constraint.json_schema("{not json"), "not valid JSON"),
        (lambda: Constraint.regex("(ab"), "unclosed group"),
        (lambda: Constraint.grammar("start: undefined_rule"), "undefined_rule"),
        (lambda: Constraint.choice([]), "non-empty list"),
        (lambda: Constraint.from_dict({"regex": "a", "choice": ["b"]}), "one of"),
        (lambda: GenerationConfig(constraint="[0-9]+"), "JSON form"),
    ],
)
def test_what_cannot_be_compiled_is_named(build, named):
    with pytest.raises(ConfigError, match=None) as caught:
        build()
    assert named in str(caught.value)


def test_the_grammar_follows_the_sequence_back_and_forth(tuner, hf_models):
    """The mask after any prefix is a fresh matcher's, however the state got there (consumed,
    rolled back to a shorter prefix, moved to another branch)."""
    constraint = Constraint.json_schema(PERSON)
    state = tuner.tokens.grammar_state(constraint)
    size = tuner.tokens.bridge.base_size
    fresh = llguidance_mask(hf_models["tokenizer"], constraint, size)
    text = hf_models["tokenizer"].encode(
        '{"person": "Ada", "answer": 42}', add_special_tokens=False
    )
    other = hf_models["tokenizer"].encode(
        '{"person": "Bob", "answer": 7}', add_special_tokens=False
    )
    for prefix in (text[:5], text, text[:2], other[:7], text[:9], []):
        assert torch.equal(state.allowed(prefix), fresh(prefix)), prefix
    assert state.finished(text) and not state.finished(text[:-1])


# -- generation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "constraint",
    [
        Constraint.json_schema(PERSON),
        Constraint.regex("(yes|no|[0-9]{2,4})"),
        Constraint.grammar('start: "x = " NUMBER\nNUMBER: /[1-9][0-9]{0,3}/'),
    ],
    ids=["schema", "regex", "grammar"],
)
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_with_the_whole_vocabulary_it_is_the_masked_formula(tuner, hf_models, constraint, alpha):
    tokenizer = hf_models["tokenizer"]
    got = tuner.generate(
        PROMPT, max_new_tokens=40, alpha=alpha, base_k=-1, constraint=constraint, speculate="off"
    )
    eos = frozenset({tokenizer.eos_token_id})
    reference = proxy_tuned_greedy(
        hf_models["base"],
        hf_models["expert"],
        hf_models["anti_expert"],
        tokenizer(PROMPT).input_ids,
        alpha=alpha,
        max_new_tokens=40,
        eos_ids=eos,
        allowed=llguidance_mask(tokenizer, constraint, tuner.tokens.bridge.base_size),
    )
    assert_same_tokens(got.token_ids, reference, eos)
    assert got.finish_reason == "eos"


@pytest.mark.parametrize("name", SCHEMAS)
def test_every_output_of_the_schema_suite_parses_and_validates(tuner, name):
    schema = SCHEMAS[name]
    got = tuner.generate(PROMPT, max_new_tokens=120, constraint=Constraint.json_schema(schema))
    assert got.finish_reason == "eos", got.text
    jsonschema.validate(json.loads(got.text), schema)


@pytest.mark.parametrize("speculate", ["base", "stream", "expert"])
@pytest.mark.parametrize("name", ["nested", "array", "escapes"])
def test_speculation_gives_what_one_token_per_request_gives(tuner, name, speculate):
    constraint = Constraint.json_schema(SCHEMAS[name])
    options = dict(max_new_tokens=120, constraint=constraint, base_k=20)
    off = tuner.generate(PROMPT, speculate="off", **options)
    got = tuner.generate(PROMPT, speculate=speculate, **options)
    assert got.token_ids == off.token_ids and got.text == off.text


def test_sampling_stays_inside_the_constraint(tuner):
    schema = SCHEMAS["enum"]
    for seed in range(6):
        for speculate in ("off", "stream"):
            got = tuner.generate(
                PROMPT,
                max_new_tokens=60,
                temperature=1.0,
                seed=seed,
                speculate=speculate,
                constraint=Constraint.json_schema(schema),
            )
            jsonschema.validate(json.loads(got.text), schema)


def test_choices_and_streamed_pieces(tuner):
    constraint = Constraint.choice(["maybe not", "yes", "no"])
    pieces = list(tuner.stream(PROMPT, max_new_tokens=10, constraint=constraint))
    text = "".join(pieces)
    assert text in ("maybe not", "yes", "no")
    assert text == tuner.generate(PROMPT, max_new_tokens=10, constraint=constraint).text


def test_restrict_with_nothing_allowed_names_the_fix(tuner):
    # The base's top-1 after the prompt is never a digit: under restrict nothing can be chosen.
    with pytest.raises(ConfigError, match="unseen='residual'") as caught:
        tuner.generate(
            PROMPT, max_new_tokens=4, base_k=1, unseen="restrict", constraint={"regex": "[0-9]+"}
        )
    assert caught.value.partial is not None and caught.value.partial.token_ids == []
    # The default policy scores the digits outside the top-1 and goes on.
    got = tuner.generate(PROMPT, max_new_tokens=4, base_k=1, constraint={"regex": "[0-9]+"})
    assert got.text.isdigit()


def test_a_complete_grammar_ends_without_another_request(tuner):
    before = len(tuner.base.requests)
    got = tuner.generate(PROMPT, max_new_tokens=30, constraint={"choice": ["ok"]}, speculate="off")
    assert got.text == "ok" and got.finish_reason == "eos"
    assert got.usage.requests == len(got.token_ids) == len(tuner.base.requests) - before


# -- the CLI and the server -------------------------------------------------------------------


def test_the_cli_refuses_what_it_cannot_compile(capsys, tiny_models):
    argv = ["generate", "--base-model", "m", "--expert", "e", "--anti-expert", "a"]
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--prompt", "x", "--json-schema", '{"type": "object", "if": {}}'])
    assert exited.value.code == 2
    assert '"if"' in capsys.readouterr().err
    assert main([*argv, "--prompt", "x", "--regex", "[0-9]", "--choice", "a"]) == 2
    assert "--regex and --choice" in capsys.readouterr().err


@pytest.fixture(scope="module")
def app(tuner):
    return create_app(tuner, served_model_name="tiny", defaults=GenerationConfig(max_new_tokens=60))


def post(app, path: str, body: dict) -> httpx.Response:
    import asyncio

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post(path, json=body, timeout=60)

    return asyncio.run(go())


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_the_server_takes_response_format_and_structured_outputs(app, tuner, path):
    chat = path.endswith("chat/completions")
    prompt = {"messages": [{"role": "user", "content": PROMPT}]} if chat else {"prompt": PROMPT}
    formats = {
        "json_schema": {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "person", "schema": PERSON, "strict": True},
            }
        },
        "regex": {"structured_outputs": {"regex": "[a-z]{3}"}},
        "choice": {"structured_outputs": {"choice": ["left", "right"]}},
    }
    for name, field in formats.items():
        answer = post(app, path, {"model": "tiny", "temperature": 0, **prompt, **field})
        assert answer.status_code == 200, answer.text
        choice = answer.json()["choices"][0]
        text = choice["message"]["content"] if chat else choice["text"]
        if name == "json_schema":
            jsonschema.validate(json.loads(text), PERSON)
        elif name == "regex":
            assert len(text) == 3 and text.isalpha()
        else:
            assert text in ("left", "right")
    if not chat:
        expected = tuner.generate(
            PROMPT, max_new_tokens=60, constraint=Constraint.json_schema(PERSON)
        )
        answer = post(
            app, path, {"model": "tiny", "temperature": 0, **prompt, **formats["json_schema"]}
        )
        assert answer.json()["choices"][0]["text"] == expected.text


@pytest.mark.parametrize(
    ("field", "named"),
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"if": {}}}}},
            '"if"',
        ),
        ({"response_format": {"type": "yaml"}}, "json_schema"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "exactly one"),
        ({"guided_json": {"type": "object"}}, "structured_outputs"),
    ],
)
def test_the_server_refuses_what_it_cannot_follow(app, field, named):
    answer = post(app, "/v1/completions", {"model": "tiny", "prompt": PROMPT, **field})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert named in error["message"] and error["param"] == next(iter(field))


@pytest.mark.parametrize("pair", ["bpe->sp", "fine->bpe"])
def test_a_bridged_base_is_constrained_over_its_own_tokens(tiny_models, hf_models, pair):
    """The grammar runs over the base tokenizer's vocabulary (in bytes), however the proxies
    split the same text: the output is the base's ids, valid, and drafts give off's tokens."""
    from tests.test_speculation_bridged import bridged_tuner

    tuner, world = bridged_tuner(tiny_models, hf_models, pair)
    schema = SCHEMAS["nested"]
    with tuner:
        options = dict(max_new_tokens=120, constraint=Constraint.json_schema(schema))
        off = tuner.generate(PROMPT, speculate="off", **options)
        drafted = tuner.generate(PROMPT, speculate="base", **options)
    assert off.finish_reason == "eos", off.text
    jsonschema.validate(json.loads(off.text), schema)
    assert world.base_tokenizer.decode(off.token_ids) == off.text
    assert drafted.token_ids == off.token_ids
