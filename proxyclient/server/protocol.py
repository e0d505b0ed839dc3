"""The OpenAI wire format: request validation, error bodies and response shapes.

Requests are validated strictly (a string where a number belongs is a 400 naming the field);
unknown fields are ignored, as OpenAI's and vLLM's servers do, but OpenAI options this server
cannot honour (penalties, logit bias, suffix, tools) are refused unless left at their neutral
values. Proxy-tuning knobs are extra body fields, one per generation option that config.py gives
an HTTP name (``alpha``, ``base_k`` — k, the logprobs asked of the base per step, not OpenAI's
``top_logprobs`` — ``unseen``, ``speculate``, ``draft_tokens``, ``top_k``, ...), and for chats
how the conversation is read (``response_prefix``, ``base_chat_template``). Structured outputs
come as OpenAI's ``response_format`` (json_object, json_schema) or vLLM's ``structured_outputs``
(json, regex, choice, grammar, json_object) and become the config's ``constraint``.
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from proxyclient.chat import Chat
from proxyclient.config import json_overrides
from proxyclient.constraints import Constraint
from proxyclient.errors import ConfigError
from proxyclient.result import Generation

# Generations one request may ask for (n), prompts one completions request may hold, and the
# logprob alternatives each endpoint lists (OpenAI's caps).
MAX_N = 8
MAX_PROMPTS = 32
MAX_COMPLETION_LOGPROBS = 5
MAX_CHAT_TOP_LOGPROBS = 20
# JSON has no -inf: a token outside the candidates gets OpenAI's and vLLM's sentinel.
SENTINEL_LOGPROB = -9999.0


class APIError(Exception):
    """An error the client gets as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# -- requests ---------------------------------------------------------------------------------


# The fields of OpenAI's own that are generation options (config.py names their HTTP spelling).
_OPENAI_OPTIONS = {"temperature", "top_p", "seed", "stop"}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class _Request(BaseModel):
    """Fields both endpoints share."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Structured outputs: OpenAI's response_format, vLLM's structured_outputs (one of them).
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    # OpenAI options this server cannot honour: accepted only at their neutral values.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def check_common(self) -> None:
        if not 1 <= self.n <= MAX_N:
            raise APIError(400, f"n must be between 1 and {MAX_N}, got {self.n}", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise APIError(400, f"{name} is not supported by this server", param=name)
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported by this server", param="logit_bias")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options needs stream: true", param="stream_options")
        removed = sorted(set(self.model_extra or {}) & _GUIDED_FIELDS)
        if removed:
            raise APIError(
                400,
                f"{removed[0]} is vLLM's removed guided-decoding field: use structured_outputs "
                f'(e.g. {{"json": SCHEMA}}, {{"regex": "..."}}) or response_format',
                param=removed[0],
            )

    def options(self, max_tokens: int | None) -> dict[str, Any]:
        """The GenerationConfig fields this request sets (the server's defaults fill the rest):
        OpenAI's own fields above, and the extension fields that config.py declares (each
        option's HTTP name), JSON types checked (a ConfigError naming the field)."""
        given = {
            **(self.model_extra or {}),
            **self.model_dump(include=_OPENAI_OPTIONS, exclude_none=True),
            "max_tokens": max_tokens,
        }
        options = json_overrides({k: v for k, v in given.items() if v is not None}, http=True)
        constraint = self.constraint()
        if constraint is not None:
            options["constraint"] = constraint
        return options

    def constraint(self) -> Constraint | None:
        """What ``response_format`` or ``structured_outputs`` asks the text to match."""
        if self.response_format is not None and self.structured_outputs is not None:
            raise APIError(
                400,
                "give response_format or structured_outputs, not both",
                param="structured_outputs",
            )
        if self.structured_outputs is not None:
            return _structured_outputs(self.structured_outputs)
        if self.response_format is not None:
            return _response_format(self.response_format)
        return None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_Request):
    prompt: Prompt
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check(self) -> None:
        self.check_common()
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_COMPLETION_LOGPROBS:
            raise APIError(
                400,
                f"logprobs must be between 0 and {MAX_COMPLETION_LOGPROBS}, got {self.logprobs}",
                param="logprobs",
            )
        if self.suffix:
            raise APIError(400, "suffix is not supported by this server", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "best_of is not supported by this server", param="best_of")
        if self.max_tokens is not None and self.max_tokens < 0:
            raise APIError(
                400, f"max_tokens must be positive, got {self.max_tokens}", param="max_tokens"
            )
        if self.max_tokens == 0 and not self.echo:
            raise APIError(
                400,
                "max_tokens must be at least 1 (0 is only for echo: true, which scores the prompt)",
                param="max_tokens",
            )
        if self.echo and self.stream:
            raise APIError(400, "echo is not supported with stream: true", param="echo")

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a string or a list of token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            prompts: list[str | list[int]] = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [list(prompt)]  # type: ignore[arg-type]
        else:
            prompts = list(prompt)  # type: ignore[arg-type]
        if not prompts:
            raise APIError(400, "prompt is empty", param="prompt")
        if len(prompts) > MAX_PROMPTS:
            count = len(prompts)
            raise APIError(
                400, f"at most {MAX_PROMPTS} prompts per request, got {count}", param="prompt"
            )
        if any(not p for p in prompts):
            raise APIError(400, "prompt is empty: give the text to continue", param="prompt")
        return prompts


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_dict(self) -> dict[str, str]:
        content = self.content
        text = content if isinstance(content, str) else "".join(p.text for p in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    # Extensions: how the conversation is read (proxyclient.Chat).
    response_prefix: str = ""
    base_chat_template: bool | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None

    def check(self) -> None:
        self.check_common()
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise APIError(400, f"{name} are not supported by this server", param=name)
        if self.top_logprobs is not None:
            if not 0 <= self.top_logprobs <= MAX_CHAT_TOP_LOGPROBS:
                raise APIError(
                    400,
                    f"top_logprobs must be between 0 and {MAX_CHAT_TOP_LOGPROBS}, got "
                    f"{self.top_logprobs}",
                    param="top_logprobs",
                )
            if not self.logprobs:
                raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        for name in ("max_tokens", "max_completion_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise APIError(400, f"{name} must be at least 1, got {value}", param=name)
        if not any(m.role == "user" for m in self.messages):
            raise APIError(400, "messages must contain at least one user message", param="messages")

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def chat(self) -> Chat:
        """The conversation, and how the sides read it."""
        messages = [m.as_dict() for m in self.messages]
        return Chat(messages, self.response_prefix, self.base_chat_template)


_GUIDED_FIELDS = frozenset(
    {"guided_json", "guided_regex", "guided_choice", "guided_grammar", "guided_whitespace_pattern"}
)
# vLLM's structured_outputs: the constraint kinds, and their spelling here.
_STRUCTURED_KINDS = {
    "json": "json_schema",
    "regex": "regex",
    "choice": "choice",
    "grammar": "grammar",
    "json_object": "json_object",
}


def _structured_outputs(given: dict[str, Any]) -> Constraint:
    """vLLM's ``structured_outputs`` (vLLM 0.32/0.33: one of json, regex, choice, grammar,
    json_object). JSON is written without free whitespace here, as ``disable_any_whitespace``
    asks; ``whitespace_pattern``, ``structural_tag`` and ``disable_additional_properties`` are
    refused rather than ignored."""
    param = "structured_outputs"
    for name in ("whitespace_pattern", "structural_tag"):
        if given.get(name) is not None:
            raise APIError(400, f"structured_outputs.{name} is not supported", param=param)
    if given.get("disable_additional_properties"):
        raise APIError(
            400,
            "structured_outputs.disable_additional_properties is not supported: put "
            '"additionalProperties": false in the schema',
            param=param,
        )
    kinds = [k for k in _STRUCTURED_KINDS if given.get(k) is not None]
    if len(kinds) != 1:
        raise APIError(
            400,
            f"structured_outputs takes exactly one of {', '.join(_STRUCTURED_KINDS)}, got "
            f"{', '.join(kinds) or 'none'}",
            param=param,
        )
    kind, value = kinds[0], given[kinds[0]]
    if kind == "json_object":
        if value is not True:
            raise APIError(400, "structured_outputs.json_object takes true", param=param)
        return _built(Constraint.json_object, param)
    return _built(lambda: Constraint.from_dict({_STRUCTURED_KINDS[kind]: value}), param)


def _response_format(given: dict[str, Any]) -> Constraint | None:
    """OpenAI's ``response_format``: text, json_object, or json_schema ({"name", "schema",
    "strict"}: the schema is enforced exactly whether strict is true or not)."""
    param = "response_format"
    kind = given.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return _built(Constraint.json_object, param)
    if kind == "json_schema":
        spec = given.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict | bool):
            raise APIError(
                400,
                'response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}',
                param=param,
            )
        return _built(lambda: Constraint.json_schema(spec.get("schema", {})), param)
    raise APIError(
        400,
        f"response_format type must be text, json_object or json_schema, got {kind!r}",
        param=param,
    )


def _built(build: Any, param: str) -> Constraint:
    try:
        return build()
    except ConfigError as exc:
        raise APIError(400, str(exc), param=param) from None


def parse(body: bytes, kind: type[_Request]) -> Any:
    """The request in ``body`` as ``kind``, checked; an APIError (400) saying what is wrong."""
    data = parse_json(body)
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        request = kind.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = [str(part) for part in error["loc"] if not _is_union_member(part)]
        param = where[0] if where else None
        path = ".".join(where) or "body"
        given = f" (got {json.dumps(error.get('input'))[:80]})" if "input" in error else ""
        raise APIError(400, f"{path}: {error['msg']}{given}", param=param) from None
    request.check()
    return request


def parse_json(body: bytes) -> Any:
    """``body`` parsed, or a 400 for anything the parser rejects (nesting too deep included)."""
    try:
        return json.loads(body)
    except RecursionError:
        raise APIError(400, "the request body is not valid JSON (nested too deep)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON ({exc})") from None


def _is_union_member(part: object) -> bool:
    """Pydantic names the union member it tried ("str", "list[int]") in an error's location."""
    return isinstance(part, str) and ("[" in part or part in {"str", "int", "float", "bool"})


# -- responses --------------------------------------------------------------------------------


def finite(logprob: float | None) -> float | None:
    """A logprob JSON can carry: -inf becomes the sentinel."""
    if logprob is None:
        return None
    return logprob if math.isfinite(logprob) else SENTINEL_LOGPROB


def finish_reason(reason: str | None) -> str | None:
    """proxyclient's reasons in OpenAI's words (EOS is a natural stop)."""
    return {"eos": "stop", "stop": "stop", "length": "length"}.get(reason or "")


def envelope(
    object_name: str,
    id: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    usage: dict | None = None,
) -> dict[str, Any]:
    """An answer or a stream chunk: ``text_completion``, ``chat.completion`` or
    ``chat.completion.chunk`` (``usage`` left out when None, as OpenAI's chunks do)."""
    body: dict[str, Any] = {
        "id": id,
        "object": object_name,
        "created": created,
        "model": model,
        "choices": choices,
    }
    if usage is not None:
        body["usage"] = usage
    return body


def completion_choice(
    index: int, text: str, logprobs: dict | None, finish: str | None
) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def chat_choice(index: int, text: str, logprobs: dict | None, finish: str | None) -> dict:
    return {
        "index": index,
        "message": {"role": "assistant", "content": text},
        "logprobs": logprobs,
        "finish_reason": finish,
    }


def chat_chunk_choice(
    index: int, delta: dict[str, Any], logprobs: dict | None = None, finish: str | None = None
) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}


def usage(prompt_tokens: int, generations: list[Generation]) -> dict[str, Any]:
    """OpenAI's usage, plus ``base``: what the base was asked for (requests, prompt tokens sent
    over all requests, tokens it generated or scored, prompt tokens it served from its cache)."""
    completion = sum(g.usage.completion_tokens for g in generations)
    cached = [g.usage.cached_prompt_tokens for g in generations]
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "base": {
            "requests": sum(g.usage.requests for g in generations),
            "prompt_tokens": sum(g.usage.prompt_tokens for g in generations),
            "completion_tokens": sum(g.usage.base_completion_tokens for g in generations),
            "cached_prompt_tokens": (
                sum(c for c in cached if c is not None)
                if any(c is not None for c in cached)
                else None
            ),
        },
    }
