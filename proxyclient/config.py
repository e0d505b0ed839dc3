"""What one generation should do: GenerationConfig and the unseen-token policies."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

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
    - ``auto``: the best mode the base supports; the draft length adapts to what is accepted, so
      where drafts keep failing it falls back to one token per request.
    """

    OFF = "off"
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


def default_base_k(max_k: int | None) -> int:
    """The k a generation asks for by default from a server that allows at most ``max_k``."""
    if max_k is None or max_k == -1:
        return DEFAULT_BASE_K
    return min(DEFAULT_BASE_K, max_k)


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding options of one generation. Validated on construction.

    ``base_k`` is k, the number of next-token logprobs asked of the base per step;
    -1 asks for the whole vocabulary where the server allows it (vLLM ``--max-logprobs -1``);
    None (default) asks for ``default_base_k`` of the adapter's cap.
    ``temperature`` 0 means greedy. ``top_k`` 0 and ``top_p`` 1.0 mean off.
    ``expert_chat_template`` gives the expert (only) the prompt formatted with its tokenizer's chat
    template, as the paper does for chat-tuned experts; base and anti-expert get the plain prompt.
    ``trace`` (None: off) fills ``Generation.steps``: per output token, each model's log-prob
    and that many best alternatives (0-20).
    A prompt given as chat messages is rendered for the base and the anti-expert with the base's
    chat template when ``base_chat_template`` is True (None: when it has one), else as plain text
    (the system text, ``User: ...`` lines, ``Assistant:``); the expert gets its own chat template.
    ``response_prefix`` goes after the generation prompt on every side (the paper's
    ``chat_response_prefix``).
    """

    max_new_tokens: int = 64
    alpha: float = 1.0
    base_k: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    unseen: UnseenPolicy = UnseenPolicy.RESIDUAL
    untwinned: UntwinnedRule = UntwinnedRule.PREFIX
    expert_chat_template: bool = False
    speculate: Speculate = Speculate.AUTO
    draft_tokens: int = DEFAULT_DRAFT_TOKENS
    trace: int | None = None
    base_chat_template: bool | None = None
    response_prefix: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, Iterable):
            object.__setattr__(self, "stop", tuple(self.stop))
        else:
            raise ConfigError(f"stop must be a string or a list of strings, got {self.stop!r}")
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
        if self.base_chat_template not in (None, True, False):
            raise ConfigError(
                f"base_chat_template must be None (auto), True or False, got "
                f"{self.base_chat_template!r}"
            )
        if not isinstance(self.response_prefix, str):
            raise ConfigError(f"response_prefix must be a string, got {self.response_prefix!r}")


def _check_types(config: GenerationConfig) -> None:
    """Wrong types fail with the option's name, before any comparison trips over them."""
    for name in ("top_k", "base_k", "seed"):
        value = getattr(config, name)
        if not (_integer(value) or (name != "top_k" and value is None)):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
    for name in ("max_new_tokens", "draft_tokens"):  # other types: checked with their range
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
