"""What every remote base model offers the engine: the BaseModel protocol and its data types."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    from proxyclient.tokenizer import BaseTokenizer

LogprobSemantics = Literal["raw", "processed"]

# OpenAI and vLLM clamp -inf to -9999.0; anything at or below this is "no probability".
SENTINEL_LOGPROB = -9999.0


@dataclass(frozen=True)
class Prompt:
    """What the base continues at one step: the prompt's ids, then the ids generated so far.

    Ids are in the base's tokenizer. Text-only dialects (TGI) decode them; a chat API needs to
    know where the user's prompt ends and the assistant's partial answer begins.

    ``messages``: the checked conversation when the user's prompt was chat messages (None for a
    text prompt), and ``response_prefix`` the text the answer starts with; ``ids[:prompt_len]``
    then is the conversation as the base's template renders it. Chat dialects send the messages
    with their roles, and the response prefix plus the generated ids' text as the answer so far;
    completion dialects send the ids and ignore both.
    """

    ids: tuple[int, ...]
    prompt_len: int
    messages: tuple[Mapping[str, str], ...] | None = field(default=None, hash=False)
    response_prefix: str = ""

    @property
    def generated(self) -> tuple[int, ...]:
        return self.ids[self.prompt_len :]


@dataclass(frozen=True)
class TopLogprobs:
    """The base's next-token distribution at one position, as far as the server reveals it.

    Entries are sorted by logprob, highest first; sentinels (-9999, null, NaN) are already removed.
    ``complete`` is True when the server returned its whole vocabulary (k = -1).
    """

    token_ids: tuple[int, ...]  # [n] ids in the base tokenizer
    logprobs: tuple[float, ...]  # [n]
    complete: bool = False
    unresolved: int = 0  # returned entries whose token id could not be recovered (counted, dropped)
    retokenized: bool = False  # a text-only server split the prompt differently from our ids

    @classmethod
    def from_pairs(
        cls,
        pairs: Iterable[tuple[int | None, float | None]],
        *,
        k: int = -1,
        complete: bool = False,
        retokenized: bool = False,
    ) -> TopLogprobs:
        """Build from (id, logprob) pairs: sentinels dropped, the best of duplicates kept, and at
        most the k best kept (servers add the sampled token). An id of None (a token the answer
        did not identify) still takes its place in the ranking, then counts as unresolved.
        ``retokenized``: the server conditioned on its own split of the prompt's text."""
        pairs = list(pairs)
        ids, logprobs = [i for i, _ in pairs], [lp for _, lp in pairs]
        return cls.from_columns(ids, logprobs, k=k, complete=complete, retokenized=retokenized)

    @classmethod
    def from_columns(
        cls,
        ids: list[int | None],
        logprobs: list[float | None],
        *,
        k: int = -1,
        complete: bool = False,
        retokenized: bool = False,
    ) -> TopLogprobs:
        """``from_pairs`` of ``zip(ids, logprobs)``. An answer already clean, as servers usually
        write it (distinct ids, float log-probs above the sentinel, highest first), is kept as it
        is: the ranking would leave it so (a stable sort keeps ties in place). Per position at a
        top-k of 20: 6 µs, ranking it 10."""
        if (
            all([type(lp) is float and lp > SENTINEL_LOGPROB for lp in logprobs])
            and all([a >= b for a, b in pairwise(logprobs)])  # type: ignore[operator]
            and len(set(ids)) == len(ids)
            and None not in ids
        ):
            if k > 0:
                ids, logprobs = ids[:k], logprobs[:k]
            return cls(tuple(ids), tuple(logprobs), complete, 0, retokenized)  # type: ignore[arg-type]
        return cls._ranked(zip(ids, logprobs, strict=True), k, complete, retokenized)

    @classmethod
    def _ranked(
        cls,
        pairs: Iterable[tuple[int | None, float | None]],
        k: int,
        complete: bool,
        retokenized: bool,
    ) -> TopLogprobs:
        """What ``from_pairs`` says, for any answer: cleaned, deduplicated and ranked."""
        best: dict[int, float] = {}
        unknown: list[float] = []
        for token_id, logprob in pairs:
            # NaN fails the comparison too
            if logprob is None or not logprob > SENTINEL_LOGPROB:
                continue
            if token_id is None:
                unknown.append(float(logprob))
            elif token_id not in best or logprob > best[token_id]:
                best[token_id] = float(logprob)
        ranked: list[tuple[int | None, float]] = [*best.items(), *((None, lp) for lp in unknown)]
        ranked.sort(key=_by_logprob_descending)
        if k > 0:
            del ranked[k:]
        if unknown:
            known = [(i, lp) for i, lp in ranked if i is not None]
            unresolved = len(ranked) - len(known)
        else:
            known, unresolved = ranked, 0
        ids, logprobs = zip(*known, strict=True) if known else ((), ())
        return cls(
            token_ids=ids,
            logprobs=logprobs,
            complete=complete,
            unresolved=unresolved,
            retokenized=retokenized,
        )

    def __len__(self) -> int:
        return len(self.token_ids)


def _by_logprob_descending(item: tuple[int | None, float]) -> float:
    return -item[1]


@dataclass(frozen=True)
class Capabilities:
    """What a server can do for us.

    max_k: most top logprobs per position (-1: whole vocabulary; None: not known yet).
    logprobs: "raw" = the model's own distribution; "processed" = after the server's warpers.
    multi_step: False where only the first token after the prompt can be scored (plain chat APIs
    cannot continue a partial assistant message).
    drafts: ``generate`` returns several tokens from one request with the top-k at each, so the
    base can draft (speculation); prompt_scoring: ``score`` returns the top-k at every position of
    a given continuation, so the expert can draft and the base verify.
    """

    max_k: int | None
    token_id_prompts: bool
    ids_in_response: bool
    prompt_scoring: bool
    logprobs: LogprobSemantics
    multi_step: bool = True
    drafts: bool = False  # generates several tokens per request with top-k at each (``generate``)
    streams: bool = False  # streams a continuation with top-k at each token (``stream_draft``)


@dataclass(frozen=True)
class ServerUsage:
    """What the server says one request cost (None where it does not say)."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_prompt_tokens: int | None = None  # prompt tokens served from the server's cache


@dataclass(frozen=True)
class Continuation:
    """Several positions from one request: the base's top-k before each token, and the token.

    From ``generate``: the tokens the base chose (greedy, or sampled at temperature 1), possibly
    fewer than asked (EOS, the context's end). From ``score``: the continuation that was sent,
    then the one token the server generated after it, so ``tops`` has one entry more than the
    continuation. A token the answer did not identify is None; its position's top-k still holds.
    """

    tokens: tuple[int | None, ...]  # [n] base ids
    tops: tuple[TopLogprobs, ...]  # [n] top-k before each token
    token_logprobs: tuple[float | None, ...]  # [n] each token's own logprob (the raw model's)
    usage: ServerUsage = ServerUsage()

    def __len__(self) -> int:
        return len(self.tokens)


@runtime_checkable
class BaseModel(Protocol):
    """A remote base model that returns the top-k next-token logprobs for a prompt of token ids."""

    name: str
    capabilities: Capabilities
    tokenizer: BaseTokenizer | None  # the base's tokenizer where it is known (connect sets it)

    async def top_logprobs(self, prompt: Prompt, k: int) -> TopLogprobs:
        """Top-k logprobs of the token after ``prompt``; k = -1 asks for all of them."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


class DraftingBaseModel(BaseModel, Protocol):
    """A base that can also answer for several positions per request (speculation).

    ``generate``: up to ``n`` tokens after ``prompt``, greedy or sampled at temperature 1 (with
    ``seed``), with the top-k before each. ``score``: the top-k before each token of
    ``continuation`` and before the token after it (needs ``capabilities.prompt_scoring``).
    """

    async def generate(
        self, prompt: Prompt, k: int, n: int, *, greedy: bool, seed: int | None = None
    ) -> Continuation: ...

    async def score(self, prompt: Prompt, continuation: Sequence[int], k: int) -> Continuation: ...


@dataclass(frozen=True)
class StreamedPosition:
    """One position of a streamed continuation: the token the base chose (None: the answer did
    not identify it), its own logprob, and the top-k before it."""

    token: int | None
    logprob: float | None
    top: TopLogprobs


@runtime_checkable
class StreamingBaseModel(BaseModel, Protocol):
    """A base that streams a continuation with the top-k at each token (speculate=stream).

    ``stream_draft``: up to ``n`` tokens after ``prompt``, greedy or sampled at temperature 1
    (with ``seed``), one position as each arrives. Closing the iterator early closes the request,
    so the server stops generating.
    """

    def stream_draft(
        self, prompt: Prompt, k: int, n: int, *, greedy: bool, seed: int | None = None
    ) -> AsyncIterator[StreamedPosition]: ...
