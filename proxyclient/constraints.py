"""Structured outputs: what a generation's text must match, and its compiled grammar.

A ``Constraint`` is one of a JSON schema, any JSON object, a regular expression, a list of choices
or a context-free grammar (Lark, or GBNF which is converted to Lark). It compiles to an
llguidance grammar; ``proxyclient.masking`` runs that grammar over the base's tokens.

Why llguidance (not xgrammar or outlines-core): it takes all five kinds in one grammar format
(JSON schema, regex and Lark compile to the same thing), builds its token trie from a plain
id -> bytes table (what ``proxyclient.vocab`` already has for every base tokenizer, bridged ones
included), computes a mask in tens of microseconds without a GPU, rolls back tokens (speculation
takes drafts back) and names the construct it cannot compile ("Unimplemented keys: ["if"]").
Its byte tables agreed with ours on every tokenizer ``scripts/compare_token_bytes.py`` checks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from proxyclient.errors import ConfigError

Kind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]
KINDS: tuple[Kind, ...] = ("json_schema", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class Constraint:
    """What the generated text must match. Build it with one of the class methods, or from
    its JSON form (``{"json_schema": {...}}``, ``{"regex": "..."}``, ``{"choice": [...]}``,
    ``{"grammar": "..."}``, ``{"json_object": true}``).

    ``value``: the schema as JSON text, the pattern, the choices, or the grammar's text; None
    for ``json_object``.
    """

    kind: Kind
    value: str | tuple[str, ...] | None = None

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | str) -> Constraint:
        """Text that parses as JSON and validates against ``schema`` (a dict or its JSON)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"the JSON schema is not valid JSON: {exc}") from None
        if not isinstance(schema, dict | bool):
            raise ConfigError(f"a JSON schema must be a JSON object, got {type(schema).__name__}")
        # Key order kept: the grammar writes an object's properties in the schema's order.
        return cls("json_schema", json.dumps(schema, ensure_ascii=False))

    @classmethod
    def json_object(cls) -> Constraint:
        """Any JSON object."""
        return cls("json_object")

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        """Text that the regular expression matches whole (Rust regex syntax)."""
        return cls("regex", pattern)

    @classmethod
    def choice(cls, options: list[str] | tuple[str, ...]) -> Constraint:
        """Exactly one of ``options``."""
        return cls("choice", tuple(options))

    @classmethod
    def grammar(cls, text: str) -> Constraint:
        """Text of the context-free grammar ``text``: Lark (llguidance's dialect: ``start:``
        is the start rule), or GBNF (llama.cpp's; ``root ::=``), which is converted."""
        return cls("grammar", text)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(
                f"constraint kind must be one of {', '.join(KINDS)}, got {self.kind!r}"
            )
        value = self.value
        if self.kind == "json_object":
            if value is not None:
                raise ConfigError("a json_object constraint takes no value")
        elif self.kind == "choice":
            if isinstance(value, list):
                object.__setattr__(self, "value", value := tuple(value))
            if (
                not isinstance(value, tuple)
                or not value
                or not all(isinstance(o, str) and o for o in value)
            ):
                raise ConfigError(
                    f"choice takes a non-empty list of non-empty strings, got {value!r}"
                )
        elif not isinstance(value, str) or not value:
            raise ConfigError(f"a {self.kind} constraint takes a non-empty string, got {value!r}")
        _check(self.kind, self.value)

    @property
    def schema(self) -> dict[str, Any] | None:
        """The JSON schema of a ``json_schema`` constraint."""
        return json.loads(self.value) if self.kind == "json_schema" else None  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``from_dict`` reads it back)."""
        if self.kind == "json_object":
            return {"json_object": True}
        if self.kind == "json_schema":
            return {"json_schema": self.schema}
        if self.kind == "choice":
            return {"choice": list(self.value or ())}
        return {self.kind: self.value}

    @classmethod
    def from_dict(cls, data: Any) -> Constraint:
        """A constraint from its JSON form: an object with exactly one of the kinds."""
        if isinstance(data, Constraint):
            return data
        if not isinstance(data, dict) or len(data) != 1 or next(iter(data)) not in KINDS:
            raise ConfigError(
                f"a constraint is an object with one of {', '.join(KINDS)}, e.g. "
                f'{{"regex": "[0-9]+"}}; got {_short(data)}'
            )
        kind, value = next(iter(data.items()))
        if kind == "json_schema":
            return cls.json_schema(value)
        if kind == "json_object":
            if value is not True:
                raise ConfigError(f"json_object takes true, got {_short(value)}")
            return cls.json_object()
        return cls(kind, value)

    def describe(self) -> str:
        """A short name for messages ("JSON schema", "regex '[0-9]+'")."""
        if self.kind in ("json_schema", "json_object"):
            return "JSON schema" if self.kind == "json_schema" else "JSON object"
        return f"{self.kind} {_short(self.to_dict()[self.kind])}"


def compiled(constraint: Constraint) -> str:
    """The llguidance grammar of ``constraint`` (JSON text)."""
    return _compile(constraint.kind, constraint.value)


# JSON as json.dumps writes it, with no other whitespace: a free choice of whitespace lets a model
# that does not know the format fill its tokens with newlines (llguidance's and vLLM's default).
# A schema's own "x-guidance" object overrides this ({"whitespace_flexible": true}).
_JSON_STYLE = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}


@lru_cache(maxsize=256)
def _compile(kind: Kind, value: str | tuple[str, ...] | None) -> str:
    from llguidance import LLMatcher, gbnf_to_lark

    if kind == "json_schema":
        try:
            return LLMatcher.grammar_from_json_schema(value, defaults=_JSON_STYLE)  # type: ignore[arg-type]
        except ValueError as exc:
            raise ConfigError(f"the JSON schema cannot be compiled: {exc}") from None
    if kind == "json_object":
        return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_JSON_STYLE)
    if kind == "regex":
        return LLMatcher.grammar_from_regex(value)  # type: ignore[arg-type]
    if kind == "choice":
        alternatives = " | ".join(json.dumps(o, ensure_ascii=False) for o in value or ())
        return LLMatcher.grammar_from_lark(f"start: {alternatives}")
    text = str(value)
    if "::=" in text:  # GBNF
        try:
            text = gbnf_to_lark.gbnf_to_lark(text)
        except Exception as exc:  # its parser raises plain exceptions on bad input
            raise ConfigError(f"the GBNF grammar cannot be read: {exc}") from None
    return LLMatcher.grammar_from_lark(text)


_NAMES = {
    "json_schema": "the JSON schema",
    "json_object": "the JSON object grammar",
    "regex": "the regex",
    "choice": "the choices",
    "grammar": "the grammar",
}


@lru_cache(maxsize=256)
def _check(kind: Kind, value: str | tuple[str, ...] | None) -> None:
    """ConfigError naming what llguidance cannot compile (nothing if it can)."""
    from llguidance import LLMatcher

    error = LLMatcher.validate_grammar(_compile(kind, value))
    if error:
        raise ConfigError(f"{_NAMES[kind]} cannot be compiled: {error.strip()}")


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."
