"""One schema: every generation option, declared once in config.py, reaches GenerationConfig with
the same default and a given value from Python, the CLI, a batch line, the server's requests and
a --resume file; and what the result carries round-trips through to_dict / from_dict."""

from __future__ import annotations

import enum
import json
import typing
from typing import Any

import pytest

from proxyclient.batch import parse_line
from proxyclient.cli import _parser
from proxyclient.commands import _config
from proxyclient.config import OPTIONS, GenerationConfig, Option
from proxyclient.constraints import Constraint
from proxyclient.flags import as_flags, generation_options
from proxyclient.result import (
    DEFAULT_UNSEEN_POLICY,
    Alternative,
    Generation,
    Timings,
    TokenTrace,
    Usage,
)
from proxyclient.server.errors import to_api_error
from proxyclient.server.protocol import ChatRequest, CompletionRequest, parse

# Options without a flag or an HTTP field of their own, and what sets them there instead.
ELSEWHERE = {
    "trace": "the CLI's --trace FILE with --trace-top N; the server's logprobs / top_logprobs",
    "constraint": "the CLI's --json-schema / --regex / --choice / --grammar; the server's "
    "response_format and structured_outputs (tests/test_constraints.py)",
}
REQUIRED = ["--base-model", "m", "--expert", "e", "--anti-expert", "a"]


def sample(option: Option) -> Any:
    """A valid value other than the default."""
    hint, optional = option.value_type, option.optional
    if hint is Constraint:
        return Constraint.regex("[0-9]+")
    if hint is bool:
        return True if optional else not option.default
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return next(m for m in hint if m != option.default)
    if typing.get_origin(hint) is tuple:
        return ("END",)
    if hint is str:
        return "Answer:"
    if hint is int:
        return 3 if option.default in (None, 0) else option.default + 3
    return 0.5 if option.default != 0.5 else 0.25


def as_json(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Constraint):
        return value.to_dict()
    return list(value) if isinstance(value, tuple) else value


def as_argv(option: Option, value: Any) -> list[str]:
    flag, hint, optional = option.edges.flag, option.value_type, option.optional
    assert flag is not None
    if hint is bool and not optional:
        return [flag]
    if hint is bool:
        return [flag, "on" if value else "off"]
    if isinstance(value, tuple):
        return [part for item in value for part in (flag, item)]
    return [flag, str(as_json(value))]


NAMES = [o.name for o in OPTIONS]


def test_every_option_has_its_edges_or_a_reason():
    assert [f for f in GenerationConfig.__dataclass_fields__] == NAMES
    for option in OPTIONS:
        if option.edges.flag is None or option.edges.http is None:
            assert option.name in ELSEWHERE, f"{option.name} has no flag or HTTP field"
        assert option.edges.help, option.name
    flags = [o.edges.flag for o in OPTIONS if o.edges.flag]
    http = [o.edges.http for o in OPTIONS if o.edges.http]
    assert len(set(flags)) == len(flags) and len(set(http)) == len(http)
    # No name that OpenAI's API uses for something else.
    assert "top_logprobs" not in http and "logprobs" not in http


@pytest.mark.parametrize("option", OPTIONS, ids=NAMES)
def test_python(option):
    assert getattr(GenerationConfig(), option.name) == option.default
    value = sample(option)
    assert getattr(GenerationConfig(**{option.name: value}), option.name) == value


@pytest.mark.parametrize("option", [o for o in OPTIONS if o.edges.flag], ids=lambda o: o.name)
def test_cli(option):
    parser = _parser()
    generate = ["generate", *REQUIRED, "--prompt", "x"]
    assert getattr(_config(parser.parse_args(generate)), option.name) == option.default
    value = sample(option)
    args = parser.parse_args([*generate, *as_argv(option, value)])
    assert getattr(_config(args), option.name) == value
    if option.edges.one_step:  # `choose` passes its options on the same way
        choose = ["choose", *REQUIRED, "--prompt", "x", "--choices", "A"]
        args = parser.parse_args([*choose, *as_argv(option, value)])
        assert generation_options(args)[option.name] == value
    # A library error naming the option reads as its flag on the command line.
    assert as_flags(f"{option.name} must be something") == f"{option.edges.flag} must be something"


@pytest.mark.parametrize("option", OPTIONS, ids=NAMES)
def test_batch_line(option):
    defaults = GenerationConfig()
    plain = parse_line(json.dumps({"custom_id": 1, "prompt": "x"}), 1, defaults)
    assert getattr(plain.config(defaults), option.name) == option.default
    value = sample(option)
    line = json.dumps({"custom_id": 1, "prompt": "x", option.name: as_json(value)})
    assert getattr(parse_line(line, 1, defaults).config(defaults), option.name) == value


@pytest.mark.parametrize("option", [o for o in OPTIONS if o.edges.http], ids=lambda o: o.name)
@pytest.mark.parametrize("kind", ["completions", "chat"])
def test_server_request(option, kind):
    body: dict[str, Any] = {"model": "m"}
    if kind == "chat":
        body["messages"] = [{"role": "user", "content": "x"}]
        request_type: Any = ChatRequest
    else:
        body["prompt"] = "x"
        request_type = CompletionRequest

    def config_of(body: dict[str, Any]) -> GenerationConfig:  # as the app reads a request
        request = parse(json.dumps(body).encode(), request_type)
        return GenerationConfig(**request.options(body.get("max_tokens")))

    assert getattr(config_of(body), option.name) == option.default
    value = sample(option)
    assert getattr(config_of({**body, option.edges.http: as_json(value)}), option.name) == value
    # A wrong JSON type is a 400 naming the field as the request calls it.
    with pytest.raises(Exception) as caught:
        config_of({**body, option.edges.http: {"not": "valid"}})
    error = to_api_error(caught.value, str)
    assert error.status == 400 and error.param == option.edges.http
    assert error.message.split(" ", 1)[0].rstrip(":") == option.edges.http, error.message


@pytest.mark.parametrize("option", OPTIONS, ids=NAMES)
def test_resume_file(option):
    config = GenerationConfig(**{option.name: sample(option)})
    assert GenerationConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_generation_round_trips():
    trace = TokenTrace(5, "a", -0.1, -0.2, -0.3, None, [Alternative(5, "a", -0.1, [97])], [97])
    generation = Generation(
        "a", [5], "error", usage=Usage(requests=2, candidates=40), unseen_policy="floor",
        timings=Timings(steps=2, wall_s=0.5), error="boom", steps=[trace],
    )  # fmt: skip
    assert Generation.from_dict(json.loads(json.dumps(generation.to_dict()))) == generation
    assert Generation("", [], "eos").unseen_policy == GenerationConfig().unseen.value
    assert GenerationConfig().unseen.value == DEFAULT_UNSEEN_POLICY
