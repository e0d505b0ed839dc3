"""ProxyPair: the expert and the anti-expert behind one async call.

A generation's state in the pair is a ``PairState`` (one KV cache per model, and the last
log-probs they gave). ``ProxyPair.logprobs`` feeds each model the ids it has not seen yet, in a
worker thread so the event loop stays free for the base's HTTP request, and returns log-probs at
the last ``positions`` positions: one for a plain step, every drafted position for speculation.

Several steering pairs (``ProxyPair(pairs=[(expert, anti, weight), ...])``) give
``base + alpha * sum_i w_i (expert_i - anti_i)``. Since that sum is
``(sum_i w_i expert_i) - (sum_i w_i anti_i)``, the pair hands the steps one "expert" row (the
weighted sum of the experts' log-softmaxes) and one "anti" row (the anti-experts'), so combining,
sampling and drafting are unchanged. Each distinct model on each side (a shared anti-expert is
one) is forwarded once per step, with its own KV cache per sequence. One pair of weight 1 returns
its models' rows as they are.

Concurrent sequences share the models: calls that arrive while the worker is busy wait together
and go through the next forward as one batch (``LocalModel.feed_many``), so N generations in
flight cost about one forward per step, not N.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from proxyclient.errors import ConfigError
from proxyclient.kvcache import KVState
from proxyclient.local import LocalModel

# A model's side: the ids it reads (the expert's prompt may be rendered in its chat template).
EXPERT, ANTI = 0, 1


@dataclass
class PairState:
    """One sequence's KV caches in the proxies: one per model and side, in ``ProxyPair.members``
    order (the first pair's expert, then its anti-expert, then each new model of the others)."""

    caches: list[KVState] = field(default_factory=list)
    # Log-probs after the last fed position, [V] each: reused when a step brings the proxies no
    # new token (a base token whose bytes the proxies can spell only once the next one arrives).
    last: tuple[torch.Tensor, torch.Tensor] | None = None
    # Set by truncate(): the caches must shrink to these lengths (expert side, anti side) before
    # the next feed.
    crop_to: tuple[int, int] | None = None

    def kv(self, member: int) -> KVState:
        """The cache of member ``member`` (created empty on first use)."""
        while len(self.caches) <= member:
            self.caches.append(KVState())
        return self.caches[member]

    # Every model on a side is fed the same ids, so the first pair's two stand for their sides.
    @property
    def expert(self) -> KVState:
        return self.kv(EXPERT)

    @property
    def anti(self) -> KVState:
        return self.kv(ANTI)

    def unseen(self, expert_len: int, anti_len: int) -> int:
        """How many ids of sequences of these lengths the caches have not read yet (after the
        crop a rollback asked for), on the side that has fewer."""
        expert_fed, anti_fed = self.crop_to or (self.expert.length, self.anti.length)
        return min(
            expert_len - min(expert_fed, self.expert.length),
            anti_len - min(anti_fed, self.anti.length),
        )

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

    # [positions, V_e] float32 log-softmax; with several pairs (or a weight other than 1) the
    # weighted sums, float64, over the ids every model scores.
    expert: torch.Tensor
    anti: torch.Tensor  # [positions, V_a]
    seconds: float  # time spent in the forwards


@dataclass(frozen=True)
class Draft:
    """Tokens the expert drafted, with both proxies' log-probs before each and after the last."""

    tokens: list[int]  # [n]
    expert: torch.Tensor  # [n + 1, V_e]
    anti: torch.Tensor  # [n + 1, V_a]
    seconds: float


@dataclass(frozen=True)
class Member:
    """One model on one side: what gets a KV cache per sequence and a forward per step."""

    local: LocalModel
    side: int  # EXPERT or ANTI


@dataclass
class _Job:
    """One sequence waiting for the proxies' log-probs."""

    state: PairState
    expert_ids: Sequence[int]
    anti_ids: Sequence[int]
    positions: int
    done: asyncio.Future[ProxyLogprobs] | None = None  # None: run in the calling thread


SteeringPair = tuple[LocalModel, LocalModel, float]


class ProxyPair:
    """Expert + anti-expert (or several weighted pairs), with one worker thread for their
    forwards.

    ``ProxyPair(expert, anti_expert)`` is one pair of weight 1; ``ProxyPair(pairs=[(expert,
    anti_expert, weight), ...])`` several, a weight may be negative (steering away). A model
    object named by several pairs on one side (a shared anti-expert) is forwarded once."""

    def __init__(
        self,
        expert: LocalModel | None = None,
        anti_expert: LocalModel | None = None,
        *,
        pairs: Sequence[SteeringPair] | None = None,
    ) -> None:
        self.pairs = _pairs(expert, anti_expert, pairs)
        # The first pair's models (what a one-pair caller reads).
        self.expert, self.anti_expert = self.pairs[0][0], self.pairs[0][1]
        self.members: list[Member] = []
        weights: dict[int, float] = {}
        for pair_expert, pair_anti, weight in self.pairs:
            for local, side in ((pair_expert, EXPERT), (pair_anti, ANTI)):
                index = self._member(local, side)
                weights[index] = weights.get(index, 0.0) + weight
        # Per side, (member, weight) with the weights of a model named by several pairs added up.
        self._terms = tuple(
            [(m, w) for m, w in weights.items() if self.members[m].side == side]
            for side in (EXPERT, ANTI)
        )
        self._plain = len(self.pairs) == 1 and self.pairs[0][2] == 1.0
        # Weighted rows keep the ids every model scores (padded vocabularies differ in width).
        self._width = min(m.local.output_size for m in self.members)
        # Members forwarded together: the roles of one PEFT model (a LoRA expert and its
        # anti-expert: adapter on for the expert's rows, off for the anti-expert's); else one each.
        groups: dict[object, list[int]] = {}
        for index, member in enumerate(self.members):
            shared = member.local.adapter is not None
            groups.setdefault(id(member.local.model) if shared else ("member", index), []).append(
                index
            )
        self._groups = list(groups.values())
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="proxyclient-local")
        self._waiting: list[_Job] = []
        self._draining = False
        self._drainer: asyncio.Task[None] | None = None
        self.batch_sizes: Counter[int] = Counter()  # forwards by how many sequences they held

    def _member(self, local: LocalModel, side: int) -> int:
        for index, member in enumerate(self.members):
            if member.local is local and member.side == side:
                return index
        self.members.append(Member(local, side))
        return len(self.members) - 1

    def __repr__(self) -> str:
        if self._plain:
            return f"ProxyPair(expert={self.expert.name!r}, anti_expert={self.anti_expert.name!r})"
        pairs = ", ".join(f"({e.name!r}, {a.name!r}, {w:g})" for e, a, w in self.pairs)
        return f"ProxyPair(pairs=[{pairs}])"

    @property
    def models(self) -> list[LocalModel]:
        """Every distinct local model, each once."""
        distinct: list[LocalModel] = []
        for member in self.members:
            if not any(member.local is seen for seen in distinct):
                distinct.append(member.local)
        return distinct

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
        """Both sides' log-probs for the group: one batched forward per model and side (one for
        both roles of a PEFT model, a LoRA expert: adapter on for its rows, off for the
        anti-expert's), then each side's weighted sum."""
        outputs: dict[int, list[torch.Tensor]] = {}
        for members in self._groups:
            states, new, positions, names = [], [], [], []
            for index in members:
                member = self.members[index]
                for job in group:
                    state = job.state.kv(index)
                    ids = job.expert_ids if member.side == EXPERT else job.anti_ids
                    states.append(state)
                    new.append(ids[state.length :])
                    positions.append(job.positions)
                names += [member.local.adapter_name] * len(group)
            local = self.members[members[0]].local
            rows = local.feed_many(
                states, new, positions, adapter_names=names if len(members) > 1 else None
            )
            for n, index in enumerate(members):
                outputs[index] = rows[n * len(group) : (n + 1) * len(group)]
        per_job = [{m: rows[j] for m, rows in outputs.items()} for j in range(len(group))]
        return (
            [self._weighted(EXPERT, rows) for rows in per_job],
            [self._weighted(ANTI, rows) for rows in per_job],
        )

    def _weighted(self, side: int, rows: dict[int, torch.Tensor]) -> torch.Tensor:
        """One side's row(s) from each member's log-probs ([..., V] each): sum_i w_i rows_i."""
        terms = self._terms[side]
        if self._plain:
            return rows[terms[0][0]]
        total: torch.Tensor | None = None
        for member, weight in terms:
            if weight == 0:  # 0 * -inf would be NaN
                continue
            part = weight * rows[member][..., : self._width].to(torch.float64)
            total = part if total is None else total + part
        if total is None:  # the side's weights cancel out
            shape = rows[terms[0][0]][..., : self._width].shape
            total = torch.zeros(shape, dtype=torch.float64)
        return total

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
        forward. Every cache ends holding the drafted tokens. With several pairs the experts
        draft together, ``pick`` reading their weighted sum (the step verifies every draft
        against the proxy-tuned choice, so this changes how much is accepted, not the output)."""
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
        sides = [
            [m for m, member in enumerate(self.members) if member.side == side]
            for side in (EXPERT, ANTI)
        ]
        rows, tokens = [first.expert[0]], []
        for _ in range(n):
            tokens.append(pick(rows[-1]))
            fed = {m: self.members[m].local.feed(state.kv(m), tokens[-1:])[0] for m in sides[0]}
            rows.append(self._weighted(EXPERT, fed))
        fed = {m: self.members[m].local.feed(state.kv(m), tokens, len(tokens)) for m in sides[1]}
        anti = self._weighted(ANTI, fed)
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
        for index, member in enumerate(self.members):
            cache = state.kv(index)
            member.local.crop(cache, min(cache.length, state.crop_to[member.side]))
        state.crop_to = None

    def close(self) -> None:
        self._executor.shutdown(wait=False)


def _pairs(
    expert: LocalModel | None,
    anti_expert: LocalModel | None,
    pairs: Sequence[SteeringPair] | None,
) -> list[SteeringPair]:
    if pairs is None:
        if expert is None or anti_expert is None:
            raise ConfigError("ProxyPair needs an expert and an anti-expert, or pairs=[...]")
        return [(expert, anti_expert, 1.0)]
    if expert is not None or anti_expert is not None:
        raise ConfigError("give ProxyPair either expert and anti_expert or pairs, not both")
    checked = []
    for number, pair in enumerate(pairs, 1):
        if len(pair) != 3:
            raise ConfigError(f"pair {number} must be (expert, anti_expert, weight), got {pair!r}")
        pair_expert, pair_anti, weight = pair
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise ConfigError(f"pair {number}'s weight must be a number, got {weight!r}")
        if not math.isfinite(weight):
            raise ConfigError(f"pair {number}'s weight must be finite, got {weight!r}")
        checked.append((pair_expert, pair_anti, float(weight)))
    if not checked:
        raise ConfigError("pairs is empty: give at least one (expert, anti_expert, weight)")
    return checked
