"""ProxyPair: the expert and the anti-expert behind one async call.

A generation's state in the pair is a ``PairState`` (one KV cache per model, and the last
log-probs they gave). ``ProxyPair.logprobs`` feeds each model the ids it has not seen yet, in a
worker thread so the event loop stays free for the base's HTTP request, and returns log-probs at
the last ``positions`` positions: one for a plain step, every drafted position for speculation.
This is the seam where concurrent sequences can later be gathered into one batched forward.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from proxyclient.local import KVState, LocalModel


@dataclass
class PairState:
    """One sequence's KV caches in the expert and the anti-expert."""

    expert: KVState = field(default_factory=KVState)
    anti: KVState = field(default_factory=KVState)
    # Log-probs after the last fed position, [V] each: reused when a step brings the proxies no
    # new token (a base token whose bytes the proxies can spell only once the next one arrives).
    last: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass(frozen=True)
class ProxyLogprobs:
    """What the pair said about one sequence's newest positions."""

    expert: torch.Tensor  # [positions, V_e] float32 log-softmax
    anti: torch.Tensor  # [positions, V_a]
    seconds: float  # time spent in the forwards


class ProxyPair:
    """Expert + anti-expert, with one worker thread for their forwards."""

    def __init__(self, expert: LocalModel, anti_expert: LocalModel) -> None:
        self.expert = expert
        self.anti_expert = anti_expert
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="proxyclient-local")

    def __repr__(self) -> str:
        return f"ProxyPair(expert={self.expert.name!r}, anti_expert={self.anti_expert.name!r})"

    async def logprobs(
        self,
        state: PairState,
        expert_ids: Sequence[int],
        anti_ids: Sequence[int],
        positions: int = 1,
    ) -> ProxyLogprobs:
        """Feed both models what they have not seen of ``expert_ids`` / ``anti_ids`` (each the
        whole sequence so far, on its side); log-probs of the next token at the last
        ``positions`` positions."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, self.logprobs_now, state, expert_ids, anti_ids, positions
        )

    def logprobs_now(
        self,
        state: PairState,
        expert_ids: Sequence[int],
        anti_ids: Sequence[int],
        positions: int = 1,
    ) -> ProxyLogprobs:
        """``logprobs`` in the calling thread."""
        started = time.perf_counter()
        new_expert = expert_ids[state.expert.length :]
        new_anti = anti_ids[state.anti.length :]
        if not new_expert and not new_anti and positions == 1 and state.last is not None:
            expert_lp, anti_lp = state.last
            return ProxyLogprobs(expert_lp[None], anti_lp[None], time.perf_counter() - started)
        if len(new_expert) < positions or len(new_anti) < positions:
            raise ValueError(
                f"log-probs at {positions} positions need as many unseen ids "
                f"(expert {len(new_expert)}, anti-expert {len(new_anti)})"
            )
        expert_lp = self.expert.feed(state.expert, new_expert, positions)
        anti_lp = self.anti_expert.feed(state.anti, new_anti, positions)
        state.last = (expert_lp[-1], anti_lp[-1])
        return ProxyLogprobs(expert_lp, anti_lp, time.perf_counter() - started)

    def rewind(self, state: PairState, expert_len: int, anti_len: int) -> None:
        """Make the caches hold at most the first ``expert_len`` / ``anti_len`` ids. Where that
        drops anything, both keep one id fewer, so that the next call feeds the last id again
        and has log-probs to give."""
        if state.expert.length <= expert_len and state.anti.length <= anti_len:
            return
        self.expert.crop(state.expert, min(state.expert.length, max(0, expert_len - 1)))
        self.anti_expert.crop(state.anti, min(state.anti.length, max(0, anti_len - 1)))
        state.last = None

    def close(self) -> None:
        self._executor.shutdown(wait=False)
