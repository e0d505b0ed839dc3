"""Steps: how a Sequence moves forward, and what each move costs.

A step observes (the base's top-k over HTTP and the proxies' log-probs, concurrently: the two do
not depend on each other, so a step costs max(round trip, local forwards), not their sum),
combines (base + alpha * (expert - anti) over the candidates, under the unseen-token policy) and
chooses. ``OneTokenStep`` makes one request per token; ``BaseDraftStep`` and ``ExpertDraftStep``
return several tokens per request behind the same ``__call__`` (speculation: the output is the
same as one token per request, greedy token for token, sampled in distribution). A step returns
what it chose (``Chosen``): the tokens, their traces and what the step cost (``Usage``), which the
engine adds to the generation's; the seconds spent go on the Sequence's timings as they pass. A
drafting step takes back what it appended and will not keep (``Sequence.rollback``) before it
returns.

The draft length adapts per sequence, as transformers' assisted decoding does: +2 after a draft
that was accepted whole, -1 after one that was not, between 1 and ``draft_tokens``. At length 1 a
base draft is exactly a one-token request, so steering that rejects most drafts costs what
``off`` costs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from collections.abc import Sequence as Ids
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch

from proxyclient.adapters.base import (
    BaseModel,
    Continuation,
    DraftingBaseModel,
    Prompt,
    ServerUsage,
    StreamedPosition,
    StreamingBaseModel,
    TopLogprobs,
)
from proxyclient.combine import Candidates, combine
from proxyclient.config import GenerationConfig, UnseenPolicy, UntwinnedRule
from proxyclient.errors import (
    APIConnectionError,
    APITimeoutError,
    ConfigError,
    ProxyClientError,
    ResponseFormatError,
    ServerError,
)
from proxyclient.proxies import ProxyLogprobs, ProxyPair
from proxyclient.result import TokenTrace, Usage
from proxyclient.sampling import choose, distribution, verify
from proxyclient.sequence import Sequence
from proxyclient.tokens import TokenSpace
from proxyclient.trace import trace_token

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Observation:
    """What the models said about a sequence's next token."""

    top: TopLogprobs  # the base's top-k
    expert: torch.Tensor | None  # [V_e] log-probs; None when alpha = 0 (no forward was run)
    anti: torch.Tensor | None  # [V_a]
    allowed: torch.Tensor | None = None  # [V_base] bool, the constraint's mask; None: none


@dataclass
class Chosen:
    """What a step chose: the tokens to accept in order (EOS included), each one's trace (None
    unless the config asks for one) and what the step cost."""

    tokens: list[int]
    traces: list[TokenTrace | None]
    usage: Usage


def request_usage(prompt: Prompt, answer: ServerUsage, completion_tokens: int) -> Usage:
    """One answered request's cost: the prompt resent, what the base generated or scored."""
    return Usage(
        requests=1,
        prompt_tokens=len(prompt.ids),
        base_completion_tokens=completion_tokens,
        cached_prompt_tokens=answer.cached_prompt_tokens,
    )


class OneTokenStep:
    """One request to the base per generated token."""

    def __init__(
        self, base: BaseModel, pair: ProxyPair, tokens: TokenSpace, *, overlap: bool = True
    ) -> None:
        self.base = base
        self.pair = pair
        self.tokens = tokens
        self.overlap = overlap

    async def __call__(self, seq: Sequence) -> Chosen:
        """The next token of ``seq``, chosen but not yet accepted (EOS included)."""
        observation, usage = await self.observe(seq)
        candidates = self.candidates(seq.config, observation)
        self.tally(usage, observation.top, candidates)
        token = self.pick(seq, candidates)
        return Chosen([token], [self.trace(seq.config, observation, candidates, token)], usage)

    async def run(self, seq: Sequence) -> AsyncIterator[Chosen]:
        """What the step chooses for ``seq``, chunk by chunk (one request's worth: a streamed
        step yields several as its answer arrives); the caller accepts each chunk's tokens
        before it asks for the next, and closes the iterator when the sequence finishes."""
        yield await self(seq)

    async def observe(self, seq: Sequence) -> tuple[Observation, Usage]:
        """Ask the base and run the proxies for the position after ``seq``'s last token; what
        they said, and the request's cost."""
        prompt = seq.base_prompt
        seq.timings.steps += 1

        async def ask_base() -> TopLogprobs:
            started = time.perf_counter()
            try:
                return await self.base.top_logprobs(prompt, seq.config.base_k)
            finally:
                seq.timings.base_s += time.perf_counter() - started

        # The constraint's mask depends only on the output so far: it is computed (off the event
        # loop) while the request is in flight.
        masking = (
            asyncio.ensure_future(asyncio.to_thread(seq.allowed))
            if seq.grammar is not None
            else None
        )
        try:
            if seq.config.alpha == 0:
                top, local = await ask_base(), None
            elif not self.overlap:
                top = await ask_base()
                local = await seq.proxy_logprobs(self.pair)
            else:
                top, local = await _both(ask_base(), seq.proxy_logprobs(self.pair))
        finally:
            allowed = await masking if masking is not None else None
        if seq.appended == 0:
            self.tokens.check_unresolved(top)
        usage = request_usage(prompt, ServerUsage(), 1)
        if local is None:
            return Observation(top, None, None, allowed), usage
        return Observation(top, local.expert[-1], local.anti[-1], allowed), usage

    def candidates(
        self, config: GenerationConfig, observation: Observation, *, alpha: float | None = None
    ) -> Candidates:
        """The candidates' proxy-tuned scores (``alpha`` overrides the config's: 0 gives the
        base's own)."""
        top = observation.top
        expert, anti = observation.expert, observation.anti
        if expert is None or anti is None:  # alpha == 0: no proxy forward was run
            expert = anti = torch.zeros(self.tokens.vocab_size)

        ids, logprobs = _as_arrays(top)

        def scored(policy: UnseenPolicy) -> Candidates:
            return combine(
                ids,
                logprobs,
                expert,
                anti,
                alpha=config.alpha if alpha is None else alpha,
                policy=policy,
                twin=self.twin(config),
            )

        candidates = scored(config.unseen)
        if observation.allowed is not None:
            return self._allowed(config, observation.allowed, candidates, scored)
        if candidates.ids.numel() == 0:
            raise ResponseFormatError(
                f"none of the base's {len(top)} candidates is in the vocabulary it shares with "
                f"the proxies ({self.tokens.bridge.shared} tokens) under "
                f"unseen={config.unseen.value!r}, untwinned={config.untwinned.value!r}: check "
                f"base_tokenizer, or keep more candidates (untwinned='prefix', "
                f"unseen='residual', a larger base_k)"
            )
        return candidates

    def _allowed(
        self,
        config: GenerationConfig,
        allowed: torch.Tensor,
        candidates: Candidates,
        scored: Callable[[UnseenPolicy], Candidates],
    ) -> Candidates:
        """The candidates the constraint allows. Once it allows nothing but EOS, that is the one
        candidate. Where the base's top-k holds none it allows, those outside it compete with
        the unseen-token policy's estimate (the smallest returned log-prob where ``residual``
        found no mass left), so a constrained generation does not dead-end."""
        constraint = config.constraint
        assert constraint is not None
        ids = torch.nonzero(allowed).flatten()
        eos = self.tokens.eos_ids
        if ids.numel() and all(int(i) in eos for i in ids):
            return Candidates(ids, torch.zeros(ids.numel(), dtype=torch.float64), 0)
        kept = _within(candidates, allowed)
        if not torch.isfinite(kept.scores).any() and config.unseen is UnseenPolicy.RESIDUAL:
            kept = _within(scored(UnseenPolicy.FLOOR), allowed)
        if torch.isfinite(kept.scores).any():
            return kept
        if config.unseen is UnseenPolicy.RESTRICT:
            raise ConfigError(
                f"none of the base's {config.base_k} candidates is allowed by the "
                f"{constraint.describe()}, and unseen='restrict' lets only those compete: use "
                f"unseen='residual' (the default) or 'floor', or a larger base_k"
            )
        raise ConfigError(
            f"the {constraint.describe()} allows only tokens outside the vocabulary the base "
            f"shares with the proxies ({self.tokens.bridge.shared} tokens): it cannot be "
            f"followed with these tokenizers"
        )

    def tally(self, usage: Usage, top: TopLogprobs, candidates: Candidates) -> None:
        """Count one verified position's candidates in ``usage`` (in place: once per token)."""
        usage.candidates += len(top) + top.unresolved
        usage.dropped_candidates += candidates.dropped + top.unresolved
        untwinned = self.tokens.bridge.untwinned
        if untwinned:
            usage.untwinned_candidates += sum(t in untwinned for t in top.token_ids)
        usage.retokenized_steps += top.retokenized

    def twin(self, config: GenerationConfig) -> torch.Tensor:
        """The base-to-proxy id map the step combines with, under the config's untwinned rule."""
        bridge = self.tokens.bridge
        return bridge.prefix if config.untwinned is UntwinnedRule.PREFIX else bridge.twin

    def trace(
        self, config: GenerationConfig, observation: Observation, candidates: Candidates, token: int
    ) -> TokenTrace | None:
        """The chosen token's trace, when the config asks for one."""
        if config.trace is None:
            return None
        return trace_token(
            token,
            candidates,
            observation.top,
            observation.expert,
            observation.anti,
            self.twin(config),
            config.trace,
            self.tokens.token_text,
            self.tokens.token_bytes,
        )

    @staticmethod
    def pick(seq: Sequence, candidates: Candidates) -> int:
        """Greedy or sampled, as the sequence's config says, with its RNG."""
        config = seq.config
        index = choose(
            candidates.scores,
            temperature=config.temperature,
            top_k=config.top_k,
            top_p=config.top_p,
            generator=seq.generator,
        )
        return int(candidates.ids.numpy()[index])  # (CPU ids: combine's, or a mask's)


# One draft position: what the models said, the drafted token (None: none to check), the draft's
# distribution over the candidates and the drafted token's log-prob under it.
Position = tuple[Observation, int | None, Callable[[Candidates], torch.Tensor] | None, float | None]


class _DraftStep(OneTokenStep):
    """What both drafting strategies share: verifying a draft position by position."""

    def _verified(
        self,
        seq: Sequence,
        candidates: Candidates,
        drafted: int | None,
        draft_p: Callable[[Candidates], torch.Tensor] | None,
        drafted_logprob: float | None,
    ) -> tuple[int, bool]:
        if drafted is None:
            return self.pick(seq, candidates), False
        config = seq.config
        if config.temperature == 0 or draft_p is None or drafted_logprob is None:
            token = self.pick(seq, candidates)
            return token, token == drafted
        q = distribution(
            candidates.scores,
            temperature=config.temperature,
            top_k=config.top_k,
            top_p=config.top_p,
        )
        where = torch.nonzero(candidates.ids == drafted).flatten()
        index = int(where[0]) if where.numel() else None
        chosen, accepted = verify(
            q, draft_p(candidates), index, math.exp(drafted_logprob), seq.generator
        )
        return int(candidates.ids[chosen]), accepted

    def verify_draft(
        self, seq: Sequence, positions: Iterable[Position], drafted: int, usage: Usage
    ) -> Chosen:
        """What proxy-tuned decoding emits over a draft's ``positions``: the accepted tokens and
        the first differing one (or the one after a full draft). A failure at a later position
        keeps those verified before it (the next step meets it again). The drafted tokens after
        the last one kept are taken back; the draft length adapts to what was accepted."""
        chosen, accepted, _ = self.verify_positions(seq, positions, usage)
        self.adapt(seq, drafted, accepted)
        _keep_draft(seq, chosen.tokens)
        return chosen

    def verify_positions(
        self, seq: Sequence, positions: Iterable[Position], usage: Usage
    ) -> tuple[Chosen, int, bool]:
        """The tokens emitted over ``positions`` (see ``verify_draft``), how many drafted ones
        were accepted, and whether every position was verified and kept."""
        emitted: list[int] = []
        traces: list[TokenTrace | None] = []
        accepted, whole = 0, True
        for observation, token, draft_p, logprob in positions:
            if seq.grammar is not None:  # the mask after what this draft kept so far
                observation = dataclasses.replace(observation, allowed=seq.allowed(emitted))
            try:
                candidates = self.candidates(seq.config, observation)
            except ProxyClientError:
                if not emitted:
                    raise
                whole = False
                break
            self.tally(usage, observation.top, candidates)
            chosen, kept = self._verified(seq, candidates, token, draft_p, logprob)
            emitted.append(chosen)
            traces.append(self.trace(seq.config, observation, candidates, chosen))
            accepted += kept
            if not kept:
                whole = False
                break
        usage.accepted_draft_tokens += accepted
        return Chosen(emitted, traces, usage), accepted, whole

    def adapt(self, seq: Sequence, drafted: int, accepted: int) -> None:
        longest = seq.config.draft_tokens
        if accepted >= drafted:
            seq.draft_length = min(longest, seq.draft_length + 2)
        else:
            seq.draft_length = max(1, seq.draft_length - 1)

    def length(self, seq: Sequence) -> int:
        if seq.draft_length == 0:
            seq.draft_length = seq.config.draft_tokens
        left = seq.config.max_new_tokens - len(seq.token_ids)
        return max(1, min(seq.draft_length, left))


class BaseDraftStep(_DraftStep):
    """The base drafts: one request generates up to d tokens with its top-k before each.

    Position i's top-k is conditioned on the base's own tokens before it, so while the tuned
    choice equals the base's token the draft stays valid; at the first disagreement that
    position's top-k still gives the tuned token. Meanwhile the proxies read the current
    position; the drafted ones follow in one batched forward.
    """

    async def __call__(self, seq: Sequence) -> Chosen:
        config, base = seq.config, cast(DraftingBaseModel, self.base)  # checked by the tuner
        greedy = config.temperature == 0
        n = self.length(seq)
        prompt = seq.base_prompt
        seed = None if greedy else _seed(seq)

        async def ask_base() -> Continuation:
            started = time.perf_counter()
            try:
                return await base.generate(prompt, config.base_k, n, greedy=greedy, seed=seed)
            finally:
                seq.timings.base_s += time.perf_counter() - started

        seq.timings.steps += 1
        # A few unread ids (the last step's correction) are read in the draft's forward, after
        # the answer: one forward per request instead of two, and a forward's fixed cost is most
        # of a small (or memory-bound) model's. A long prompt is read during the request.
        later = config.alpha != 0 and n > 1 and 1 <= seq.unread <= n
        if config.alpha == 0 or later:
            draft, first = await ask_base(), None
        else:
            draft, first = await _both(ask_base(), seq.proxy_logprobs(self.pair))
        usage = request_usage(prompt, draft.usage, len(draft))
        if not draft.tops:  # it ended at once (some APIs leave EOS out): ask for one position
            seq.draft_length = 1
            chosen = await super().__call__(seq)
            chosen.usage.add(usage)
            return chosen
        if seq.appended == 0:
            self.tokens.check_unresolved(draft.tops[0])
        chosen, accepted, _ = await self.check_continuation(
            seq, draft.tokens, draft.tops, draft.token_logprobs, first, usage, read_first=later
        )
        self.adapt(seq, len(draft), accepted)
        _keep_draft(seq, chosen.tokens)
        return chosen

    async def check_continuation(
        self,
        seq: Sequence,
        tokens: Ids[int | None],
        tops: Ids[TopLogprobs],
        logprobs: Ids[float | None],
        first: ProxyLogprobs | None,
        usage: Usage,
        *,
        read_first: bool = False,
    ) -> tuple[Chosen, int, bool]:
        """Verify the base's own continuation (``tokens``, the top-k before each, their
        logprobs) from ``seq``'s end, where the proxies said ``first`` (``read_first``: they
        have not read it yet; None otherwise: alpha is 0): what is emitted, how many drafted
        tokens were accepted, and whether every position was verified and kept.

        Positions up to the first token we cannot identify (or cannot spell on the proxy side)
        can be verified: the proxies read the drafted tokens before the last verifiable position
        in one forward."""
        config = seq.config
        unknown = next(
            (i for i, t in enumerate(tokens) if t is None or not seq.can_append(t)), len(tokens)
        )
        last = min(unknown, len(tokens) - 1)
        rows = _DraftRows.of(first)
        if read_first or (last and first is not None):
            rows = await self.read_draft(seq, list(tokens[:last]), first)  # type: ignore[arg-type]

        def positions() -> Iterator[Position]:
            for i in range(last + 1):
                top = tops[i]

                def base_p(candidates: Candidates, top: TopLogprobs = top) -> torch.Tensor:
                    # What the draft was sampled from: the base's raw distribution, as the
                    # unseen-token policy estimates it outside the top-k (unconstrained: the
                    # server does not know the constraint), at the candidates' ids.
                    alone = self.candidates(config, Observation(top, None, None), alpha=0.0)
                    return _at(alone, candidates.ids).exp()

                yield Observation(top, *rows.at(i)), tokens[i], base_p, logprobs[i]

        return self.verify_positions(seq, positions(), usage)

    async def read_draft(
        self, seq: Sequence, tokens: list[int], first: ProxyLogprobs | None
    ) -> _DraftRows:
        """Append the drafted ``tokens`` and read the proxies at every drafted position, in one
        forward (``first`` None: at the position before the draft too).

        Draft position i (the base's top-k after drafted tokens 0..i-1) is read where the
        one-token loop reads it: at the last proxy position once the proxy ids spelling tokens
        0..i-1 are appended. With a bridge, one base token is spelled by zero, one or several
        proxy tokens (zero while the realigner holds back part of a character), so position i
        sits ``ends[i - 1]`` proxy tokens into the sequence, not i; where no proxy token was
        added since position 0, the proxies' answer is ``first``'s."""
        start = len(seq.proxy_generated)
        ends = []  # [len(tokens)]: proxy tokens appended after drafted tokens 0..i
        for token in tokens:
            seq.append([token])
            ends.append(len(seq.proxy_generated) - start)
        added = ends[-1] if ends else 0
        if first is None:
            read = await seq.proxy_logprobs(self.pair, positions=added + 1)
            return _DraftRows(read.expert.unbind(0), read.anti.unbind(0), ends)
        if not added:
            return _DraftRows.of(first, ends)
        block = await seq.proxy_logprobs(self.pair, positions=added)
        expert, anti = block.expert.unbind(0), block.anti.unbind(0)
        return _DraftRows((first.expert[-1], *expert), (first.anti[-1], *anti), ends)


class ExpertDraftStep(_DraftStep):
    """The expert drafts d tokens locally; one request scores them: the base's top-k at every
    drafted position and after the last. Accepted: the longest prefix proxy-tuned decoding
    would have chosen, plus its own token at the first disagreement (or after a full draft)."""

    async def __call__(self, seq: Sequence) -> Chosen:
        config, base = seq.config, cast(DraftingBaseModel, self.base)  # checked by the tuner
        n = self.length(seq)
        vocab = self.tokens.vocab_size
        temperature = config.temperature

        def expert_probs(logprobs: torch.Tensor) -> torch.Tensor:  # [V] -> [vocab] float64
            scores = logprobs[:vocab].to(torch.float64)
            return distribution(scores, temperature=temperature or 1.0)

        def pick(logprobs: torch.Tensor) -> int:
            if temperature == 0:
                return int(torch.argmax(logprobs[:vocab]))
            return int(torch.multinomial(expert_probs(logprobs), 1, generator=seq.generator))

        draft = await self.pair.draft(seq.proxies, seq.expert_ids, seq.anti_ids, n, pick)
        seq.timings.local_s += draft.seconds
        prompt = seq.base_prompt
        seq.append(draft.tokens)
        seq.timings.steps += 1
        started = time.perf_counter()
        try:
            scored = await base.score(prompt, draft.tokens, config.base_k)
        finally:
            seq.timings.base_s += time.perf_counter() - started
        usage = request_usage(prompt, scored.usage, len(draft.tokens) + 1)
        if seq.appended == len(draft.tokens):
            self.tokens.check_unresolved(scored.tops[0])

        def positions() -> Iterator[Position]:
            for i, top in enumerate(scored.tops):
                probs = expert_probs(draft.expert[i])
                drafted = draft.tokens[i] if i < len(draft.tokens) else None  # none after last

                def expert_p(candidates: Candidates, probs: torch.Tensor = probs) -> torch.Tensor:
                    return probs[candidates.ids]

                logprob = math.log(float(probs[drafted])) if drafted is not None else None
                yield Observation(top, draft.expert[i], draft.anti[i]), drafted, expert_p, logprob

        return self.verify_draft(seq, positions(), len(draft.tokens), usage)


class StreamedDraftStep(BaseDraftStep):
    """The base continues in one streamed request; each position is verified as it arrives.

    While the proxy-tuned choice agrees with the base's token, the stream goes on at the base's
    own speed (up to ``stream_tokens``); at the first disagreement it is closed (the server stops
    generating) and the corrected token emitted, and the next request starts from there: one round
    trip per disagreement. The proxies read every position that arrived while they were busy in
    one forward, so a slow local side falls behind in batches, not token by token. A stream that
    breaks after some positions keeps what was verified: the next request goes on from there.
    """

    async def __call__(self, seq: Sequence) -> Chosen:
        chunks = [chosen async for chosen in self.run(seq)]
        return Chosen(
            [t for c in chunks for t in c.tokens],
            [t for c in chunks for t in c.traces],
            _summed(c.usage for c in chunks),
        )

    async def run(self, seq: Sequence) -> AsyncIterator[Chosen]:
        config, base = seq.config, cast(StreamingBaseModel, self.base)  # checked by the engine
        greedy = config.temperature == 0
        n = max(1, min(config.stream_tokens, config.max_new_tokens - len(seq.token_ids)))
        prompt = seq.base_prompt
        seed = None if greedy else _seed(seq)
        seq.timings.steps += 1
        arrived: list[StreamedPosition] = []
        ready = asyncio.Event()
        stream = base.stream_draft(prompt, cast(int, config.base_k), n, greedy=greedy, seed=seed)
        reader = asyncio.ensure_future(_pull(stream, arrived, ready))
        started, verified = time.perf_counter(), 0
        usage = request_usage(prompt, ServerUsage(), 0)
        try:
            while True:
                first = seq.proxy_logprobs(self.pair) if config.alpha != 0 else None
                proxies = asyncio.ensure_future(first) if first is not None else None
                while not arrived and not reader.done():
                    await ready.wait()
                    ready.clear()
                seq.timings.base_s += time.perf_counter() - started
                here = await proxies if proxies is not None else None
                if not arrived:
                    failure = reader.exception()
                    if failure is not None and (verified == 0 or _not_transient(failure)):
                        raise failure
                    if failure is not None:  # verified positions stand: go on from there
                        logger.info("the stream broke after %d tokens (%s)", verified, failure)
                    elif verified == 0:  # it ended at once (EOS left out): ask for one position
                        chosen = await OneTokenStep.__call__(self, seq)
                        chosen.usage.add(usage)
                        yield chosen
                    return
                batch = arrived[:]
                del arrived[:]
                usage.base_completion_tokens += len(batch)
                if seq.appended == 0:
                    self.tokens.check_unresolved(batch[0].top)
                chosen, _, whole = await self.check_continuation(
                    seq,
                    [p.token for p in batch],
                    [p.top for p in batch],
                    [p.logprob for p in batch],
                    here,
                    usage,
                )
                _keep_draft(seq, chosen.tokens)
                verified += len(chosen.tokens)
                if not whole:  # close the stream now; bill what it delivered meanwhile
                    await _stop(reader)
                    chosen.usage.base_completion_tokens += len(arrived)
                    yield chosen
                    return
                usage = Usage()
                started = time.perf_counter()
                yield chosen
        finally:
            await _stop(reader)


async def _stop(reader: asyncio.Future[None]) -> None:
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)


async def _pull(
    stream: AsyncIterator[StreamedPosition], arrived: list[StreamedPosition], ready: asyncio.Event
) -> None:
    """Read ``stream`` into ``arrived`` as it comes, waking the verifier each time."""
    try:
        async for position in stream:
            arrived.append(position)
            ready.set()
    finally:
        ready.set()
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


def _not_transient(failure: BaseException) -> bool:
    """A failure the next request would meet again (not a dropped connection or a timeout)."""
    return not isinstance(failure, (APIConnectionError, APITimeoutError, ServerError))


def _summed(usages: Iterable[Usage]) -> Usage:
    total = Usage()
    for usage in usages:
        total.add(usage)
    return total


@dataclass(frozen=True)
class _DraftRows:
    """The proxies' log-probs at the positions of a base draft (see ``read_draft``): row 0 at
    draft position 0, row j after the j-th proxy token the draft added."""

    expert: Ids[torch.Tensor]  # [V_e] each; empty when alpha = 0
    anti: Ids[torch.Tensor]
    ends: list[int] = field(default_factory=list)  # proxy tokens added by draft tokens 0..i

    @classmethod
    def of(cls, first: ProxyLogprobs | None, ends: list[int] | None = None) -> _DraftRows:
        """Rows where the draft added no proxy token: ``first``'s (none: alpha = 0)."""
        if first is None:
            return cls((), (), [])
        return cls((first.expert[-1],), (first.anti[-1],), ends or [])

    def at(self, i: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(expert, anti) at draft position i."""
        if not self.expert:
            return None, None
        row = self.ends[i - 1] if i else 0
        return self.expert[row], self.anti[row]


async def _both(first: Awaitable[Any], second: Awaitable[Any]) -> tuple[Any, Any]:
    # Both must finish before we go on (the proxies' KV caches are shared state), so wait for
    # both even when one fails, then raise the first failure.
    outcome = await asyncio.gather(first, second, return_exceptions=True)
    for result in outcome:
        if isinstance(result, BaseException):
            raise result
    return outcome[0], outcome[1]


def _as_arrays(top: TopLogprobs) -> tuple[np.ndarray, np.ndarray]:
    """The top-k's ids (int64) and log-probs (float64) as the numpy arrays ``combine`` computes
    on, read straight from the tuples: a quarter of what tensors through a buffer took (and
    combine's views of them), per position."""
    n = len(top.token_ids)
    return np.fromiter(top.token_ids, np.int64, n), np.fromiter(top.logprobs, np.float64, n)


def _within(candidates: Candidates, allowed: torch.Tensor) -> Candidates:
    """The candidates whose ids ``allowed`` marks."""
    ids = candidates.ids
    keep = allowed[ids.clamp(max=allowed.numel() - 1)] & (ids < allowed.numel())
    return Candidates(ids[keep], candidates.scores[keep], candidates.dropped)


def _at(candidates: Candidates, ids: torch.Tensor) -> torch.Tensor:
    """The scores of ``candidates`` at ``ids`` (-inf where it has none)."""
    if candidates.ids is ids or torch.equal(candidates.ids, ids):
        return candidates.scores
    size = max(int(candidates.ids.max()) if candidates.ids.numel() else 0, int(ids.max())) + 1
    full = torch.full((size,), -math.inf, dtype=torch.float64)
    full[candidates.ids] = candidates.scores
    return full[ids]


def _keep_draft(seq: Sequence, emitted: list[int]) -> None:
    """Take back the drafted tokens after those ``emitted`` starts with."""
    start = len(seq.token_ids)
    drafted = seq.base_ids[len(seq.prompt_ids.base) + start :]
    kept = 0
    for token, draft in zip(emitted, drafted, strict=False):
        if token != draft:
            break
        kept += 1
    seq.rollback(start + kept)


def _seed(seq: Sequence) -> int | None:
    """A seed for the server's sampler, from the sequence's RNG (None when unseeded)."""
    if seq.generator is None:
        return None
    return int(torch.randint(0, 2**31 - 1, (), generator=seq.generator))
