"""What a generation returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

FinishReason = Literal["length", "stop", "eos", "error"]
DEFAULT_UNSEEN_POLICY = "residual"  # GenerationConfig's (a test checks they agree)


@dataclass
class Usage:
    """What the generation cost.

    ``prompt_tokens`` counts every token id sent to the base, summed over requests: each step
    resends the whole prefix, which is what a hosted API bills.
    ``candidates`` counts the entries the base returned; ``dropped_candidates`` those without a
    twin in the proxies' vocabulary, or whose token id the server's answer did not reveal:
    1 - dropped / candidates is the share the combination covered.
    ``retokenized_steps`` counts steps at which a text-only server (TGI, chat) split the text
    differently from the ids we track, so the base saw the canonical split of the same text.
    With speculation, ``base_completion_tokens`` counts what the base generated (base drafts) or
    was asked to score (expert drafts) beyond the prompt, what a hosted API bills as output;
    ``accepted_draft_tokens`` the drafted tokens that became output.
    """

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    candidates: int = 0  # entries the base returned, summed over steps
    dropped_candidates: int = 0
    untwinned_candidates: int = 0  # returned entries whose bytes are no single proxy token
    retokenized_steps: int = 0
    base_completion_tokens: int = 0  # tokens the base generated or scored as drafts (billed)
    accepted_draft_tokens: int = 0  # drafted tokens that became output
    cached_prompt_tokens: int | None = None  # where the server reports prompt-cache hits

    def add(self, other: Usage) -> None:
        """Count ``other``'s cost in this one (a step's into its generation's)."""
        for name in _COUNTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        if other.cached_prompt_tokens is not None:
            cached = self.cached_prompt_tokens or 0
            self.cached_prompt_tokens = cached + other.cached_prompt_tokens


_COUNTS = tuple(name for name in Usage.__dataclass_fields__ if name != "cached_prompt_tokens")


@dataclass
class Timings:
    """Where the wall time went. With overlap, ``wall_s`` is about max(base, local) per step."""

    steps: int = 0
    wall_s: float = 0.0
    base_s: float = 0.0  # waiting for the base's answers
    local_s: float = 0.0  # expert + anti-expert forwards


@dataclass(frozen=True)
class Alternative:
    """A candidate for a position, with its proxy-tuned log-prob."""

    token_id: int  # base id
    text: str
    logprob: float
    token_bytes: list[int] = field(default_factory=list)  # as ``TokenTrace.token_bytes``


@dataclass(frozen=True)
class TokenTrace:
    """What each model said about one output token (``GenerationConfig.trace``).

    ``logprob`` is the proxy-tuned distribution's at temperature 1, over the step's candidates;
    ``base_logprob`` the base's returned one (None: outside its top-k); ``expert_logprob`` and
    ``anti_logprob`` the proxies' at the token's twin (None: no twin, or alpha = 0). ``top``: the
    best candidates by tuned log-prob, as many as the trace asked for. ``token_bytes``: the
    token's own bytes (OpenAI's ``bytes``): a part of a character is its raw bytes where ``text``
    shows U+FFFD, so the steps' bytes joined decode to the generation's text. ``base_top``: the
    base's own top-1 among what it returned, with the base's log-prob (where it is another token
    than ``token_id``, steering changed the choice).
    """

    token_id: int  # base id
    text: str  # the token's text (U+FFFD for a part of a character)
    logprob: float
    base_logprob: float | None
    expert_logprob: float | None
    anti_logprob: float | None
    top: list[Alternative]
    token_bytes: list[int] = field(default_factory=list)
    base_top: Alternative | None = None


@dataclass
class Generation:
    """The result: text, chosen token ids, why it stopped, and usage. ``steps``: one
    :class:`TokenTrace` per token of ``token_ids`` when the config asked for a trace, else None.
    """

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    usage: Usage = field(default_factory=Usage)
    unseen_policy: str = DEFAULT_UNSEEN_POLICY
    timings: Timings = field(default_factory=Timings)
    error: str | None = None
    steps: list[TokenTrace] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Generation:
        """The generation ``to_dict`` gave (a ``--json`` line, say); other keys are ignored."""
        steps = data.get("steps")
        return cls(
            text=data["text"],
            token_ids=list(data["token_ids"]),
            finish_reason=data["finish_reason"],
            usage=Usage(**data.get("usage", {})),
            unseen_policy=data.get("unseen_policy", DEFAULT_UNSEEN_POLICY),
            timings=Timings(**data.get("timings", {})),
            error=data.get("error"),
            steps=[_token_trace(s) for s in steps] if steps is not None else None,
        )


def _token_trace(record: dict[str, Any]) -> TokenTrace:
    base_top = record.get("base_top")
    return TokenTrace(
        **{
            **record,
            "top": [Alternative(**a) for a in record["top"]],
            "base_top": Alternative(**base_top) if base_top is not None else None,
        }
    )


@dataclass
class Choice:
    """The proxy-tuned choice among single-token options (the paper's black-box setting).

    ``probabilities`` are over the options (they sum to 1 over those with a value); an option gets
    None when it is not a candidate (outside the base's top-k under ``restrict``).
    ``missing`` lists the options the base did not return in its top-k, under any policy.
    """

    option: str | None
    probabilities: dict[str, float | None]
    base_probabilities: dict[str, float | None]
    missing: list[str]
    usage: Usage = field(default_factory=Usage)
    unseen_policy: str = DEFAULT_UNSEEN_POLICY

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
