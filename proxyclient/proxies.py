"""ProxyPair: the expert and the anti-expert behind one async call.

A generation's state in the pair is a ``PairState`` (one KV cache per model, and the last
log-probs they gave). ``ProxyPair.logprobs`` feeds each model the ids it has not seen yet, in a
worker thread so the event loop stays free for the base's HTTP request, and returns log-probs at
the last ``positions`` positions: one for a plain step, every drafted position for speculation.

Concurrent sequences share the models: calls that arrive while the worker is busy wait together
and go through the next forward as one batch (``LocalModel.feed_many``), so N generations in
flight cost about one forward per step, not N.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from proxyclient.kvcache import KVState
from proxyclient.local import LocalModel


@dataclass
class PairState:
    """One sequence's KV caches in the expert and the anti-expert."""

    expert: KVState = field(default_factory=KVState)
    anti: KVState = field(default_factory=KVState)
    # Log-probs after the last fed position, [V] each: reused when a step brings the proxies no
    # new token (a base token whose bytes the proxies can spell only once the next one arrives).
    last: tuple[torch.Tensor, torch.Tensor] | None = None
    # Set by truncate(): the caches must shrink to these lengths before the next feed.
    crop_to: tuple[int, int] | None = None

    def truncate(self, expert_len: int, anti_len: int) -> None:
        """The sequences now hold only ``expert_len`` / ``anti_len`` ids (a rollback). Where the
        caches hold more, both will keep one id fewer (cropped on the next feed), so that the
        next feed has a new id to give log-probs for."""
        expert_fed = self.crop_to[0] if self.crop_to else self.expert.length
        anti_fed = self.crop_to[1] if self.crop_to else self.anti.length
        if expert_fed <= expert_len and anti_fed <= anti_len:
            return
        self.crop_to = (
            min(expert_fed, max(0, expert_len - 1)),
            min(anti_fed, max(0, anti_len - 1)),
        )
        self.last = None


@dataclass(frozen=True)
class ProxyLogprobs:
    """What the pair said about one sequence's newest positions."""

    expert: torch.Tensor  # [positions, V_e] float32 log-softmax
    anti: torch.Tensor  # [positions, V_a]
    seconds: float  # time spent in the forwards


@dataclass(frozen=True)
class Draft:
    """Tokens the expert drafted, with both proxies' log-probs before each and after the last."""

    tokens: list[int]  # [n]
    expert: torch.Tensor  # [n + 1, V_e]
    anti: torch.Tensor  # [n + 1, V_a]
    seconds: float


@dataclass
class _Job:
    """One sequence waiting for the proxies' log-probs."""

    state: PairState
    expert_ids: Sequence[int]
    anti_ids: Sequence[int]
    positions: int
    done: asyncio.Future[ProxyLogprobs] | None = None  # None: run in the calling thread


class ProxyPair:
    """Expert + anti-expert, with one worker thread for their forwards."""

    def __init__(self, expert: LocalModel, anti_expert: LocalModel) -> None:
        self.expert = expert
        self.anti_expert = anti_expert
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="proxyclient-local")
        self._waiting: list[_Job] = []
        self._draining = False
        self._drainer: asyncio.Task[None] | None = None
        self.batch_sizes: Counter[int] = Counter()  # forwards by how many sequences they held
        # A LoRA expert on the anti-expert's weights: one model, adapter on/off per row.
        self._one_model = expert.model is anti_expert.model and expert.adapter is not None

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
        job = _Job(state, expert_ids, anti_ids, positions, loop.create_future())
        self._waiting.append(job)
        if not self._draining:
            self._draining = True
            self._drainer = loop.create_task(self._drain())
        return await job.done

    async def _drain(self) -> None:
        """Run what waits, as one batch, until nothing waits."""
        loop = asyncio.get_running_loop()
        try:
            while self._waiting:
                # Let every callback that is ready run first (answers parsed in the same loop
                # pass ask for their forwards too), so they join this batch: costs microseconds.
                await asyncio.sleep(0)
                jobs, self._waiting = self._waiting, []
                outcomes = await loop.run_in_executor(self._executor, self._run, jobs)
                for job, outcome in zip(jobs, outcomes, strict=True):
                    assert job.done is not None
                    if job.done.cancelled():
                        continue
                    if isinstance(outcome, BaseException):
                        job.done.set_exception(outcome)
                    else:
                        job.done.set_result(outcome)
        finally:
            self._draining = False

    def _run(self, jobs: list[_Job]) -> list[ProxyLogprobs | BaseException]:
        """The jobs' forwards as one batch (worker thread); each row asks for its own number of
        positions. A job's failure is its outcome, handed to the caller that asked."""
        started = time.perf_counter()
        outcomes: list[ProxyLogprobs | BaseException | None] = [None] * len(jobs)
        members: list[int] = []
        for index, job in enumerate(jobs):
            try:
                reused = self._prepare(job.state, job.expert_ids, job.anti_ids, job.positions)
            except Exception as exc:
                outcomes[index] = exc
                continue
            if reused is not None:
                outcomes[index] = reused
            else:
                members.append(index)
        if members:
            group = [jobs[i] for i in members]
            try:
                expert, anti = self._forward(group)
            except Exception as exc:
                for i in members:
                    outcomes[i] = exc
            else:
                self.batch_sizes[len(group)] += 1
                seconds = time.perf_counter() - started
                for i, job, expert_lp, anti_lp in zip(members, group, expert, anti, strict=True):
                    job.state.last = (expert_lp[-1], anti_lp[-1])
                    outcomes[i] = ProxyLogprobs(expert_lp, anti_lp, seconds)
        return [o if o is not None else RuntimeError("no outcome") for o in outcomes]

    def _forward(self, group: list[_Job]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Both proxies' log-probs for the group: two batched forwards, or one where the pair is
        one PEFT model (a LoRA expert: adapter on for its rows, off for the anti-expert's)."""
        positions = [j.positions for j in group]
        expert_states = [j.state.expert for j in group]
        anti_states = [j.state.anti for j in group]
        expert_new = [j.expert_ids[j.state.expert.length :] for j in group]
        anti_new = [j.anti_ids[j.state.anti.length :] for j in group]
        if self._one_model:
            rows = self.expert.feed_many(
                expert_states + anti_states,
                expert_new + anti_new,
                positions + positions,
                adapter_names=[self.expert.adapter_name] * len(group)
                + [self.anti_expert.adapter_name] * len(group),
            )
            return rows[: len(group)], rows[len(group) :]
        return (
            self.expert.feed_many(expert_states, expert_new, positions),
            self.anti_expert.feed_many(anti_states, anti_new, positions),
        )

    def _prepare(
        self,
        state: PairState,
        expert_ids: Sequence[int],
        anti_ids: Sequence[int],
        positions: int,
    ) -> ProxyLogprobs | None:
        """Crop what a rollback asked for; the cached answer when there is nothing new to feed
        (None when a forward is needed)."""
        self._crop(state)
        new_expert = len(expert_ids) - state.expert.length
        new_anti = len(anti_ids) - state.anti.length
        if not new_expert and not new_anti and positions == 1 and state.last is not None:
            expert_lp, anti_lp = state.last
            return ProxyLogprobs(expert_lp[None], anti_lp[None], 0.0)
        if new_expert < positions or new_anti < positions:
            raise ValueError(
                f"log-probs at {positions} positions need as many unseen ids "
                f"(expert {new_expert}, anti-expert {new_anti})"
            )
        return None

    def logprobs_now(
        self,
        state: PairState,
        expert_ids: Sequence[int],
        anti_ids: Sequence[int],
        positions: int = 1,
    ) -> ProxyLogprobs:
        """``logprobs`` in the calling thread (a batch of one)."""
        (outcome,) = self._run([_Job(state, expert_ids, anti_ids, positions)])
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def draft(
        self,
        state: PairState,
        expert_ids: Sequence[int],
        anti_ids: Sequence[int],
        n: int,
        pick: Callable[[torch.Tensor], int],
    ) -> Draft:
        """The expert drafts ``n`` tokens after the sequences, one forward each, choosing with
        ``pick`` (expert log-probs [V_e] -> token id); then the anti-expert reads them in one
        forward. Both caches end holding the drafted tokens."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, self._draft_now, state, expert_ids, anti_ids, n, pick
        )

    def _draft_now(
        self,
        state: PairState,
        expert_ids: Sequence[int],
        anti_ids: Sequence[int],
        n: int,
        pick: Callable[[torch.Tensor], int],
    ) -> Draft:
        started = time.perf_counter()
        first = self.logprobs_now(state, expert_ids, anti_ids)
        rows, tokens = [first.expert[0]], []
        for _ in range(n):
            tokens.append(pick(rows[-1]))
            rows.append(self.expert.feed(state.expert, tokens[-1:])[0])
        anti = self.anti_expert.feed(state.anti, tokens, len(tokens))
        state.last = (rows[-1], anti[-1])
        return Draft(
            tokens,
            torch.stack(rows),
            torch.cat([first.anti, anti]),
            time.perf_counter() - started,
        )

    def _crop(self, state: PairState) -> None:
        if state.crop_to is None:
            return
        self.expert.crop(state.expert, state.crop_to[0])
        self.anti_expert.crop(state.anti, state.crop_to[1])
        state.crop_to = None

    def close(self) -> None:
        self._executor.shutdown(wait=False)
