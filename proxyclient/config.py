"""What one generation should do: GenerationConfig, declared once for every edge.

Each option is a GenerationConfig field carrying its help text, CLI flag and HTTP field name
(``OPTIONS``); argparse (``proxyclient.flags``), batch lines, the server's request mapping and
its error ``param``s, and ``--resume`` files are derived from that declaration, so adding an
option touches this file and the code that uses it. Also: the unseen-token policies, the
speculation modes and the untwinned rule.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import numbers
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from proxyclient.constraints import Constraint
from proxyclient.errors import ConfigError


class UnseenPolicy(StrEnum):
    """What happens to tokens outside the base's returned top-k.

    Their base log-probability is unknown but at most the smallest returned one.
    - ``restrict``: only the base's top-k are candidates (the unseen get probability 0).
    - ``floor``: every shared-vocabulary token is a candidate; unseen ones get the k-th
      (smallest returned) logprob as their base score, an upper bound.
    - ``residual``: unseen ones share the leftover base mass 1 - sum(top-k) evenly.
    With the whole vocabulary returned (k = -1) all three are the exact formula.

    ``residual`` is the default: in the miniature experiment (README, "Does it work?") it is never
    worse than ``restrict`` and much better at small k, where the tuned format's tokens (e.g. the
    newline ending an answer) fall outside the base's top-k; unlike ``floor``, whose k-th-logprob
    bound given to every unseen token adds up to more than the missing mass, its candidates'
    probabilities sum to one, so sampling does not drift into the tail of a large vocabulary.
    """

    RESTRICT = "restrict"
    FLOOR = "floor"
    RESIDUAL = "residual"


class Speculate(StrEnum):
    """Several tokens per request to the base, with the same output as one per request.

    - ``off``: one request per generated token.
    - ``base``: the base drafts: one request generates up to ``draft_tokens`` tokens with the
      top-k at each; the proxy-tuned choice is checked at each position and the draft accepted
      while it agrees (any adapter whose ``capabilities.drafts`` is True).
    - ``expert``: the expert drafts locally and one request scores the draft (the base's top-k at
      every drafted position and after it); needs ``capabilities.prompt_scoring`` and a base that
      shares the proxies' tokenizer.
    - ``stream``: the base continues in one streamed request (up to ``stream_tokens`` tokens) and
      each position is checked as it arrives; at the first disagreement the stream is closed and
      the next request starts from the corrected text: one round trip per disagreement (an
      adapter whose ``capabilities.streams`` is True).
    - ``auto``: the best mode the base supports (stream, base, expert, off); the draft length
      adapts to what is accepted, so where drafts keep failing it falls back to one token per
      request.
    """

    OFF = "off"
    STREAM = "stream"
    BASE = "base"
    EXPERT = "expert"
    AUTO = "auto"


class UntwinnedRule(StrEnum):
    """What happens to a base candidate whose bytes are no single proxy token (other tokenizers).

    - ``prefix``: it keeps its base score, corrected by the proxies' difference on the longest
      proxy token its bytes begin with (the first step of spelling it on the proxy side);
    - ``drop``: it is not a candidate.
    Either way such candidates are counted in ``Usage.untwinned_candidates``.
    """

    PREFIX = "prefix"
    DROP = "drop"


# k asked of the base when the caller does not say: the server's cap where it is lower (OpenAI and
# TGI: 5). Measured by scripts/miniature.py (README, "Does it work?"): k = 20 closes as much of the
# gap as the whole vocabulary at about half the time per step.
DEFAULT_BASE_K = 20


# The most alternatives a trace lists per token (OpenAI chat's top_logprobs cap).
MAX_TRACE_ALTERNATIVES = 20

# The longest draft one speculative request asks for; the length adapts below it.
DEFAULT_DRAFT_TOKENS = 8
# Tokens one streamed request may run to. The server generates on until our close reaches it, so
# this bounds what it bills past a disagreement; a longer agreement costs a round trip per this
# many tokens. Measured (scripts/bench_speed.py, miniature, 18% disagreements, CPU vLLM): at a
# 50 ms round trip 8 / 16 / 64 gave 19.8 / 21.1 / 32.0 ms per token, 0.25 / 0.20 / 0.20 requests
# and 1.1 / 2.0 / 3.2 billed tokens per token; at 200 ms 56 / 46 / 48 ms per token.
DEFAULT_STREAM_TOKENS = 16


def default_base_k(max_k: int | None) -> int:
    """The k a generation asks for by default from a server that allows at most ``max_k``."""
    if max_k is None or max_k == -1:
        return DEFAULT_BASE_K
    return min(DEFAULT_BASE_K, max_k)


@dataclass(frozen=True)
class OptionEdges:
    """Where one generation option appears besides Python, and what users read about it.

    ``flag``: its CLI flag (None: none); ``http``: its field in the server's requests and the
    ``param`` of their errors (None: none); ``one_step``: also a flag of ``proxyclient choose``.
    Batch lines and ``--resume`` files use the Python name.
    """

    help: str
    flag: str | None
    http: str | None
    one_step: bool = False
    metavar: str | None = None


def _option(
    default: Any,
    help: str,
    *,
    flag: str | bool | None = True,
    http: str | bool | None = True,
    one_step: bool = False,
    metavar: str | None = None,
) -> Any:
    """A GenerationConfig field with its edges; ``flag``/``http`` True: the name's usual
    spelling there (``--max-new-tokens``, ``max_new_tokens``), resolved in ``OPTIONS``."""
    edges = {"help": help, "flag": flag, "http": http, "one_step": one_step, "metavar": metavar}
    if isinstance(default, tuple):
        return field(default_factory=lambda: default, metadata={"edges": edges})
    return field(default=default, metadata={"edges": edges})


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding options of one generation. Validated on construction.

    Each field is declared once, here, with its help text, CLI flag and HTTP field (``OPTIONS``
    lists them); the CLI, batch lines, the server and ``--resume`` files derive from it. How a
    chat prompt is rendered travels with the prompt (``proxyclient.Chat``).
    """

    max_new_tokens: int = _option(64, "the most tokens to generate", http="max_tokens")
    alpha: float = _option(
        1.0, "steering strength: base + alpha * (expert - anti-expert)", one_step=True
    )
    base_k: int | None = _option(
        None,
        "k, the next-token logprobs asked of the base per step; -1: the whole vocabulary where "
        f"the server allows it (default: {DEFAULT_BASE_K}, or the server's cap)",
        one_step=True,
        metavar="K",
    )
    temperature: float = _option(0.0, "0 = greedy")
    top_p: float = _option(1.0, "nucleus sampling (1 = off)")
    top_k: int = _option(0, "sample among the k best tokens (0 = off)")
    seed: int | None = _option(None, "seed of the sampler (and of the base's drafts)")
    stop: tuple[str, ...] = _option((), "a stop sequence (repeat for several)", metavar="TEXT")
    unseen: UnseenPolicy = _option(
        UnseenPolicy.RESIDUAL, "what tokens outside the base's top-k score", one_step=True
    )
    untwinned: UntwinnedRule = _option(
        UntwinnedRule.PREFIX,
        "with another base tokenizer: base tokens that are no single proxy token",
        one_step=True,
    )
    expert_chat_template: bool = _option(
        False,
        "the expert (only) reads the prompt in its chat template, as in the paper",
        one_step=True,
    )
    speculate: Speculate = _option(
        Speculate.AUTO,
        "several tokens per request: the base drafts, the expert drafts, or the best the base "
        "supports; the output is the same as with off",
    )
    draft_tokens: int = _option(
        DEFAULT_DRAFT_TOKENS, "the longest draft (it adapts below that)", metavar="N"
    )
    stream_tokens: int = _option(
        DEFAULT_STREAM_TOKENS,
        "speculate=stream: the most tokens one streamed request asks for",
        metavar="N",
    )
    # The CLI's --json-schema / --regex / --choice / --grammar (flags.py), the server's
    # response_format and structured_outputs (server/protocol.py).
    constraint: Constraint | None = _option(
        None,
        "structured output: the text must match this JSON schema, regex, choice or grammar",
        flag=None,
        http=None,
    )
    # The CLI's --trace FILE / --trace-top N, the server's logprobs / top_logprobs.
    trace: int | None = _option(
        None,
        f"per output token, each model's log-prob and this many alternatives (0-"
        f"{MAX_TRACE_ALTERNATIVES}); None: off",
        flag=None,
        http=None,
    )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: enums as their values, ``stop`` as a list."""
        return {f.name: _json_value(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GenerationConfig:
        """The config ``to_dict`` gave (unknown keys are an error naming them)."""
        unknown = sorted(set(data) - set(_BY_NAME))
        if unknown:
            raise ConfigError(
                f"unknown generation option(s) {', '.join(unknown)}; known: {', '.join(_BY_NAME)}"
            )
        return cls(**json_overrides(data))

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, Iterable):
            object.__setattr__(self, "stop", tuple(self.stop))
        else:
            raise ConfigError(f"stop must be a string or a list of strings, got {self.stop!r}")
        if isinstance(self.constraint, dict):
            object.__setattr__(self, "constraint", Constraint.from_dict(self.constraint))
        elif self.constraint is not None and not isinstance(self.constraint, Constraint):
            raise ConfigError(
                f"constraint must be a Constraint or its JSON form, e.g. "
                f'{{"json_schema": {{...}}}}, got {self.constraint!r}'
            )
        _check_types(self)
        for name, choices in (
            ("unseen", UnseenPolicy),
            ("untwinned", UntwinnedRule),
            ("speculate", Speculate),
        ):
            object.__setattr__(self, name, _one_of(choices, name, getattr(self, name)))
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise ConfigError(
                f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}"
            )
        if not math.isfinite(self.alpha):
            raise ConfigError(f"alpha must be a finite number, got {self.alpha!r}")
        if self.base_k is not None and (self.base_k == 0 or self.base_k < -1):
            raise ConfigError(
                f"base_k must be a positive integer, or -1 for the whole vocabulary, "
                f"got {self.base_k!r}"
            )
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = off), got {self.top_k!r}")
        if not isinstance(self.draft_tokens, int) or self.draft_tokens < 1:
            raise ConfigError(
                f"draft_tokens must be an integer >= 1 (the longest draft), got "
                f"{self.draft_tokens!r}"
            )
        if not isinstance(self.stream_tokens, int) or self.stream_tokens < 1:
            raise ConfigError(
                f"stream_tokens must be an integer >= 1 (tokens per streamed request), got "
                f"{self.stream_tokens!r}"
            )
        if any(not s for s in self.stop):
            raise ConfigError("stop sequences must be non-empty strings")
        trace = self.trace
        if trace is not None and (
            not isinstance(trace, int)
            or isinstance(trace, bool)
            or not 0 <= trace <= MAX_TRACE_ALTERNATIVES
        ):
            raise ConfigError(
                f"trace must be None (off) or the number of alternatives per token, 0 to "
                f"{MAX_TRACE_ALTERNATIVES}, got {trace!r}"
            )


def _check_types(config: GenerationConfig) -> None:
    """Wrong types fail with the option's name, before any comparison trips over them."""
    for name in ("top_k", "base_k", "seed"):
        value = getattr(config, name)
        if not (_integer(value) or (name != "top_k" and value is None)):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
    for name in (
        "max_new_tokens",
        "draft_tokens",
        "stream_tokens",
    ):  # other types: checked with their range
        if isinstance(getattr(config, name), bool):
            raise ConfigError(f"{name} must be an integer, got {getattr(config, name)!r}")
    for name in ("alpha", "temperature", "top_p"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(f"{name} must be a number, got {value!r}")
    if config.seed is not None and not 0 <= config.seed < 2**63:
        raise ConfigError(f"seed must be >= 0 and < 2**63, got {config.seed!r}")
    if not isinstance(config.expert_chat_template, bool):
        raise ConfigError(
            f"expert_chat_template must be True or False, got {config.expert_chat_template!r}"
        )
    if not all(isinstance(s, str) for s in config.stop):
        raise ConfigError(f"stop sequences must be strings, got {config.stop!r}")


def _integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _one_of(choices: type[StrEnum], name: str, value: object) -> StrEnum:
    """``value`` as a member of ``choices``, or a ConfigError that lists them."""
    try:
        return choices(value)
    except ValueError:
        listed = ", ".join(member.value for member in choices)
        raise ConfigError(f"{name} must be one of {listed}, got {value!r}") from None


@dataclass(frozen=True)
class Option:
    """One generation option: its Python name, type, default and edges."""

    name: str
    hint: Any  # the field's type
    default: Any
    edges: OptionEdges

    @property
    def optional(self) -> bool:
        """Whether None is a value (``int | None``)."""
        return typing.get_origin(self.hint) in (typing.Union, types.UnionType)

    @property
    def value_type(self) -> Any:
        """The type of its values other than None (``int`` for ``int | None``)."""
        if not self.optional:
            return self.hint
        return next(a for a in typing.get_args(self.hint) if a is not type(None))


def _options() -> tuple[Option, ...]:
    hints = typing.get_type_hints(GenerationConfig)
    defaults = GenerationConfig()
    options = []
    for f in dataclasses.fields(GenerationConfig):
        edges = dict(f.metadata["edges"])
        if edges["flag"] is True:
            edges["flag"] = "--" + f.name.replace("_", "-")
        if edges["http"] is True:
            edges["http"] = f.name
        options.append(
            Option(f.name, hints[f.name], getattr(defaults, f.name), OptionEdges(**edges))
        )
    return tuple(options)


OPTIONS: tuple[Option, ...] = _options()
OPTION_BY_HTTP: dict[str, Option] = {o.edges.http: o for o in OPTIONS if o.edges.http}


def expected_json(hint: Any, value: Any) -> str | None:
    """None when the JSON ``value`` has the type a field of type ``hint`` needs, else what it
    needs. The field's own validation (ranges, enum values) runs in GenerationConfig."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None:
            return None
        wanted = [expected_json(a, value) for a in typing.get_args(hint) if a is not type(None)]
        return None if None in wanted else "null or " + " or ".join(w for w in wanted if w)
    if hint is bool:
        return None if isinstance(value, bool) else "true or false"
    if hint is int:
        return None if _integer(value) else "an integer"
    if hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return None if ok else "a number"
    if hint is str:
        return None if isinstance(value, str) else "a string"
    if typing.get_origin(hint) is tuple:
        ok = isinstance(value, str) or (
            isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)
        )
        return None if ok else "a string or a list of strings"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        choices = ", ".join(str(m.value) for m in hint)
        return None if isinstance(value, str) else f"one of {choices}"
    if hint is Constraint:
        return None if isinstance(value, dict) else 'an object such as {"regex": "..."}'
    return None


def json_overrides(record: Mapping[str, Any], *, http: bool = False) -> dict[str, Any]:
    """The options a JSON object sets (a batch line or ``--resume`` file by Python names; a
    server request by HTTP field names, other fields ignored), as GenerationConfig keyword
    arguments, each JSON type checked: ConfigError naming the option as the record names it."""
    overrides = {}
    for key, value in record.items():
        option = OPTION_BY_HTTP.get(key) if http else _BY_NAME.get(key)
        if option is None:
            continue
        expected = expected_json(option.hint, value)
        if expected is not None:
            raise ConfigError(f"{key} must be {expected}, got {show_json(value)}")
        overrides[option.name] = tuple(value) if isinstance(value, list) else value
    return overrides


_BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}


def show_json(value: Any) -> str:
    """``value`` as JSON, cut to 60 characters: for error messages."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _json_value(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Constraint):
        return value.to_dict()
    if isinstance(value, tuple):
        return list(value)
    return value
