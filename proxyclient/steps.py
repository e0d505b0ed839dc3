"""Steps: how a Sequence moves forward, and what each move costs.

A step observes (the base's top-k over HTTP and the proxies' log-probs, concurrently: the two do
not depend on each other, so a step costs max(round trip, local forwards), not their sum),
combines (base + alpha * (expert - anti) over the candidates, under the unseen-token policy) and
chooses. ``OneTokenStep`` makes one request per token; speculative strategies will return several
tokens per request behind the same ``__call__``. Every request, candidate count and second spent
is recorded here, on the Sequence's usage and timings, and nowhere else.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import torch

from proxyclient.adapters.base import BaseModel, TopLogprobs
from proxyclient.combine import Candidates, combine
from proxyclient.config import UntwinnedRule
from proxyclient.errors import ResponseFormatError
from proxyclient.proxies import ProxyLogprobs, ProxyPair
from proxyclient.sampling import choose
from proxyclient.sequence import Sequence
from proxyclient.tokens import TokenSpace


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
        observation = await self.observe(seq)
        return [self.pick(seq, self.candidates(seq, observation))]

    async def observe(self, seq: Sequence) -> Observation:
        """Ask the base and run the proxies for the position after ``seq``'s last token."""
        k = seq.config.top_logprobs
        prompt = seq.base_prompt
        seq.usage.requests += 1
        seq.usage.prompt_tokens += len(prompt.ids)
        seq.timings.steps += 1

        async def ask_base() -> TopLogprobs:
            started = time.perf_counter()
            try:
                return await self.base.top_logprobs(prompt, k)
            finally:
                seq.timings.base_s += time.perf_counter() - started

        if seq.config.alpha == 0:
            top, local = await ask_base(), None
        elif not self.overlap:
            top = await ask_base()
            local = await seq.proxy_logprobs(self.pair)
        else:
            # Both must finish before we go on (the proxies' KV caches are shared state), so
            # wait for both even when one fails, then raise the first failure.
            outcome = await asyncio.gather(
                ask_base(), seq.proxy_logprobs(self.pair), return_exceptions=True
            )
            for result in outcome:
                if isinstance(result, BaseException):
                    raise result
            top, local = outcome
        if seq.appended == 0:
            self.tokens.check_unresolved(top)
        if local is None:
            return Observation(top, None, None)
        assert isinstance(local, ProxyLogprobs)
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
            twin=bridge.prefix if config.untwinned is UntwinnedRule.PREFIX else bridge.twin,
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
                f"the proxies ({bridge.shared} tokens): is --base-tokenizer right?"
            )
        return candidates

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
