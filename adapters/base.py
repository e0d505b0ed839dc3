"""What every remote base model offers the engine: the BaseModel protocol and its data types."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

LogprobSemantics = Literal["raw", "processed"]

# OpenAI and vLLM clamp -inf to -9999.0; anything at or below this is "no probability".
SENTINEL_LOGPROB = -9999.0


@dataclass(frozen=True)
class TopLogprobs:
    """The base's next-token distribution at one position, as far as the server reveals it.

    Entries are sorted by logprob, highest first; sentinels (-9999, null, NaN) are already removed.
    ``complete`` is True when the server returned its whole vocabulary (k = -1).
    """

    token_ids: tuple[int, ...]  # [n] ids in the base tokenizer
    logprobs: tuple[float, ...]  # [n]
    complete: bool = False

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[int, float | None]], *, complete: bool = False):
        """Build from (id, logprob) pairs, dropping sentinels and keeping the best of duplicates."""
        best: dict[int, float] = {}
        for token_id, logprob in pairs:
            if logprob is None or math.isnan(logprob) or logprob <= SENTINEL_LOGPROB:
                continue
            if token_id not in best or logprob > best[token_id]:
                best[token_id] = float(logprob)
        ranked = sorted(best.items(), key=lambda item: -item[1])
        return cls(
            token_ids=tuple(i for i, _ in ranked),
            logprobs=tuple(lp for _, lp in ranked),
            complete=complete,
        )

    def first(self, n: int) -> TopLogprobs:
        """The n most likely entries."""
        return TopLogprobs(self.token_ids[:n], self.logprobs[:n], self.complete)

    def __len__(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class Capabilities:
    """What a server can do for us.

    max_k: most top logprobs per position (-1: whole vocabulary; None: not known yet).
    logprobs: "raw" = the model's own distribution; "processed" = after the server's warpers.
    """

    max_k: int | None
    token_id_prompts: bool
    ids_in_response: bool
    prompt_scoring: bool
    logprobs: LogprobSemantics


@runtime_checkable
class BaseModel(Protocol):
    """A remote base model that returns the top-k next-token logprobs for a prompt of token ids."""

    name: str
    capabilities: Capabilities

    async def top_logprobs(self, prompt_ids: Sequence[int], k: int) -> TopLogprobs:
        """Top-k logprobs of the token after ``prompt_ids``; k = -1 asks for all of them."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...
