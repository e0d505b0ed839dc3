"""Steps: how a Sequence moves forward, and what each move costs.

A step observes (the base's top-k over HTTP and the proxies' log-probs, concurrently: the two do
not depend on each other, so a step costs max(round trip, local forwards), not their sum),
combines (base + alpha * (expert - anti) over the candidates, under the unseen-token policy) and
chooses. ``OneTokenStep`` makes one request per token; ``BaseDraftStep`` and ``ExpertDraftStep``
return several tokens per request behind the same ``__call__`` (speculation: the output is the
same as one token per request, greedy token for token, sampled in distribution). Every request,
candidate count and second spent is recorded here, on the Sequence's usage and timings, and
nowhere else.

The draft length adapts per sequence, as transformers' assisted decoding does: +2 after a draft
that was accepted whole, -1 after one that was not, between 1 and ``draft_tokens``. At length 1 a
base draft is exactly a one-token request, so steering that rejects most drafts costs what
``off`` costs.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from proxyclient.adapters.base import (
    BaseModel,
    Continuation,
    DraftingBaseModel,
    Prompt,
    ServerUsage,
    TopLogprobs,
)
from proxyclient.combine import Candidates, combine
from proxyclient.config import GenerationConfig, UntwinnedRule
from proxyclient.errors import ProxyClientError, ResponseFormatError
from proxyclient.proxies import ProxyLogprobs, ProxyPair
from proxyclient.sampling import choose, distribution, verify
from proxyclient.sequence import Sequence
from proxyclient.tokens import TokenSpace
from proxyclient.trace import trace_token


@dataclass(frozen=True)
class Observation:
    """What the models said about a sequence's next token."""

    top: TopLogprobs  # the base's top-k
    expert: torch.Tensor | None  # [V_e] log-probs; None when alpha = 0 (no forward was run)
    anti: torch.Tensor | None  # [V_a]


class OneTokenStep:
    """One request to the base per generated token."""

    def __init__(
        self, base: BaseModel, pair: ProxyPair, tokens: TokenSpace, *, overlap: bool = True
    ) -> None:
        self.base = base
        self.pair = pair
        self.tokens = tokens
        self.overlap = overlap

    async def __call__(self, seq: Sequence) -> list[int]:
        """The next token(s) of ``seq``, chosen but not yet accepted (EOS included)."""
        seq.pending_traces.clear()
        observation = await self.observe(seq)
        candidates = self.candidates(seq, observation)
        token = self.pick(seq, candidates)
        self.record(seq, observation, candidates, token)
        return [token]

    async def observe(self, seq: Sequence) -> Observation:
        """Ask the base and run the proxies for the position after ``seq``'s last token."""
        prompt = seq.base_prompt
        self.count_request(seq, prompt)

        async def ask_base() -> TopLogprobs:
            started = time.perf_counter()
            try:
                return await self.base.top_logprobs(prompt, seq.config.base_k)
            finally:
                seq.timings.base_s += time.perf_counter() - started

        if seq.config.alpha == 0:
            top, local = await ask_base(), None
        elif not self.overlap:
            top = await ask_base()
            local = await seq.proxy_logprobs(self.pair)
        else:
            top, local = await _both(ask_base(), seq.proxy_logprobs(self.pair))
        self.count_answer(seq, ServerUsage(), 1)
        if seq.appended == 0:
            self.tokens.check_unresolved(top)
        if local is None:
            return Observation(top, None, None)
        return Observation(top, local.expert[-1], local.anti[-1])

    def candidates(
        self,
        seq: Sequence,
        observation: Observation,
        *,
        alpha: float | None = None,
        count: bool = True,
    ) -> Candidates:
        """The candidates' proxy-tuned scores (``alpha`` overrides the config's: 0 gives the
        base's own); ``count`` records them in the sequence's usage."""
        config, bridge, top = seq.config, self.tokens.bridge, observation.top
        base_ids = torch.tensor(top.token_ids, dtype=torch.int64)  # [k]
        base_lp = torch.tensor(top.logprobs, dtype=torch.float64)  # [k]
        expert, anti = observation.expert, observation.anti
        if expert is None or anti is None:  # alpha == 0: no proxy forward was run
            expert = anti = torch.zeros(self.tokens.vocab_size)
        candidates = combine(
            base_ids,
            base_lp,
            expert,
            anti,
            alpha=config.alpha if alpha is None else alpha,
            policy=config.unseen,
            twin=self.twin(seq.config),
        )
        if count:
            usage = seq.usage
            returned = base_ids[base_ids < bridge.base_size]
            usage.untwinned_candidates += int((bridge.twin[returned] < 0).sum())
            usage.candidates += len(top) + top.unresolved
            usage.dropped_candidates += candidates.dropped + top.unresolved
            usage.retokenized_steps += top.retokenized
        if candidates.ids.numel() == 0:
            raise ResponseFormatError(
                f"none of the base's {len(top)} candidates is in the vocabulary it shares with "
                f"the proxies ({bridge.shared} tokens) under unseen={config.unseen.value!r}, "
                f"untwinned={config.untwinned.value!r}: check base_tokenizer, or keep more "
                f"candidates (untwinned='prefix', unseen='residual', a larger base_k)"
            )
        return candidates

    def twin(self, config: GenerationConfig) -> torch.Tensor:
        """The base-to-proxy id map the step combines with, under the config's untwinned rule."""
        bridge = self.tokens.bridge
        return bridge.prefix if config.untwinned is UntwinnedRule.PREFIX else bridge.twin

    def record(
        self, seq: Sequence, observation: Observation, candidates: Candidates, token: int
    ) -> None:
        """The chosen token's trace, for accept() to keep, when the config asks for one."""
        if seq.config.trace is None:
            return
        seq.pending_traces.append(
            trace_token(
                token,
                candidates,
                observation.top,
                observation.expert,
                observation.anti,
                self.twin(seq.config),
                seq.config.trace,
                self.tokens.token_text,
                self.tokens.token_bytes,
            )
        )

    @staticmethod
    def count_request(seq: Sequence, prompt: Prompt) -> None:
        seq.usage.requests += 1
        seq.usage.prompt_tokens += len(prompt.ids)
        seq.timings.steps += 1

    @staticmethod
    def count_answer(seq: Sequence, usage: ServerUsage, completion_tokens: int) -> None:
        seq.usage.base_completion_tokens += completion_tokens
        if usage.cached_prompt_tokens is not None:
            seq.usage.cached_prompt_tokens = (
                seq.usage.cached_prompt_tokens or 0
            ) + usage.cached_prompt_tokens

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
        return int(candidates.ids[index])


# One draft position: what the models said, the drafted token (None: none to check), the draft's
# distribution over the candidates and the drafted token's log-prob under it.
Position = tuple[Observation, int | None, Callable[[Candidates], torch.Tensor] | None, float | None]


class _DraftStep(OneTokenStep):
    """What both drafting strategies share: verifying a draft position by position."""

    def verify(
        self,
        seq: Sequence,
        observation: Observation,
        drafted: int | None,
        draft_p: Callable[[Candidates], torch.Tensor] | None,
        drafted_logprob: float | None,
    ) -> tuple[int, bool]:
        """The token proxy-tuned decoding emits at this position, and whether it is the drafted
        one. Greedy: the argmax, kept iff it is the draft's. Sampled: speculative acceptance
        against the draft distribution ``draft_p(candidates)`` (over the candidates)."""
        candidates = self.candidates(seq, observation)
        token, kept = self._verified(seq, candidates, drafted, draft_p, drafted_logprob)
        self.record(seq, observation, candidates, token)
        return token, kept

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

    def verify_draft(self, seq: Sequence, positions: Iterable[Position], drafted: int) -> list[int]:
        """The tokens proxy-tuned decoding emits over a draft's ``positions``: the accepted ones
        and the first differing one (or the one after a full draft). A failure at a later
        position keeps those verified before it (the next step meets it again); the draft
        length adapts to what was accepted."""
        emitted, accepted = [], 0
        for observation, token, draft_p, logprob in positions:
            try:
                chosen, kept = self.verify(seq, observation, token, draft_p, logprob)
            except ProxyClientError:
                if not emitted:
                    raise
                break
            emitted.append(chosen)
            accepted += kept
            if not kept:
                break
        self.adapt(seq, drafted, accepted)
        return emitted

    def adapt(self, seq: Sequence, drafted: int, accepted: int) -> None:
        seq.usage.accepted_draft_tokens += accepted
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

    async def __call__(self, seq: Sequence) -> list[int]:
        seq.pending_traces.clear()
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

        self.count_request(seq, prompt)
        if config.alpha == 0:
            draft, first = await ask_base(), None
        else:
            draft, first = await _both(ask_base(), seq.proxy_logprobs(self.pair))
        self.count_answer(seq, draft.usage, len(draft))
        if not draft.tops:  # it ended at once (some APIs leave EOS out): ask for one position
            seq.draft_length = 1
            return await super().__call__(seq)
        if seq.appended == 0:
            self.tokens.check_unresolved(draft.tops[0])
        # Positions up to the first token we cannot identify (or cannot spell on the proxy
        # side) can be verified: the proxies read the drafted tokens before the last verifiable
        # position in one forward.
        unknown = next(
            (i for i, t in enumerate(draft.tokens) if t is None or not seq.can_append(t)),
            len(draft),
        )
        last = min(unknown, len(draft) - 1)
        rows = _DraftRows(first)
        if last and first is not None:
            rows = await self.read_draft(seq, draft.tokens[:last], first)  # type: ignore[arg-type]

        def positions() -> Iterator[Position]:
            for i in range(last + 1):
                top = draft.tops[i]

                def base_p(candidates: Candidates, top: TopLogprobs = top) -> torch.Tensor:
                    # What the draft was sampled from: the base's raw distribution, as the
                    # unseen-token policy estimates it outside the top-k.
                    alone = self.candidates(
                        seq, Observation(top, None, None), alpha=0.0, count=False
                    )
                    return alone.scores.exp()

                observation = Observation(top, *rows.at(i))
                yield observation, draft.tokens[i], base_p, draft.token_logprobs[i]

        return self.verify_draft(seq, positions(), len(draft))

    async def read_draft(
        self, seq: Sequence, tokens: list[int], first: ProxyLogprobs
    ) -> _DraftRows:
        """Append the drafted ``tokens`` and read the proxies at every drafted position, in one
        forward.

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
        block = await seq.proxy_logprobs(self.pair, positions=ends[-1]) if ends[-1] else None
        return _DraftRows(first, block, ends)


class ExpertDraftStep(_DraftStep):
    """The expert drafts d tokens locally; one request scores them: the base's top-k at every
    drafted position and after the last. Accepted: the longest prefix proxy-tuned decoding
    would have chosen, plus its own token at the first disagreement (or after a full draft)."""

    async def __call__(self, seq: Sequence) -> list[int]:
        seq.pending_traces.clear()
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
        self.count_request(seq, prompt)
        started = time.perf_counter()
        try:
            scored = await base.score(prompt, draft.tokens, config.base_k)
        finally:
            seq.timings.base_s += time.perf_counter() - started
        self.count_answer(seq, scored.usage, len(draft.tokens) + 1)
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

        return self.verify_draft(seq, positions(), len(draft.tokens))


@dataclass(frozen=True)
class _DraftRows:
    """The proxies' log-probs at the positions of a base draft (see ``read_draft``)."""

    first: ProxyLogprobs | None  # at draft position 0; None when alpha = 0
    block: ProxyLogprobs | None = None  # [ends[-1], V] at the proxy positions the draft added
    ends: list[int] = field(default_factory=list)  # proxy tokens added by draft tokens 0..i

    def at(self, i: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(expert, anti) at draft position i."""
        if self.first is None:
            return None, None
        added = self.ends[i - 1] if i else 0
        if added == 0 or self.block is None:
            return self.first.expert[-1], self.first.anti[-1]
        return self.block.expert[added - 1], self.block.anti[added - 1]


async def _both(first: Awaitable[Any], second: Awaitable[Any]) -> tuple[Any, Any]:
    # Both must finish before we go on (the proxies' KV caches are shared state), so wait for
    # both even when one fails, then raise the first failure.
    outcome = await asyncio.gather(first, second, return_exceptions=True)
    for result in outcome:
        if isinstance(result, BaseException):
            raise result
    return outcome[0], outcome[1]


def _seed(seq: Sequence) -> int | None:
    """A seed for the server's sampler, from the sequence's RNG (None when unseeded)."""
    if seq.generator is None:
        return None
    return int(torch.randint(0, 2**31 - 1, (), generator=seq.generator))
