"""Proxy-tuning's formula on a restricted candidate set. Pure tensor math: no I/O, no models.

    score(t) = base_logprob(t) + alpha * (expert_logprob(t) - anti_expert_logprob(t))

Log-probabilities stand in for logits: each model's normalising constant is the same for every
candidate, so it cancels in the softmax over any candidate set. That is why the formula is exact on
whatever part of the vocabulary the base reveals, and why local models with padded vocabularies
(more logits than tokens) need no special care beyond ignoring ids the others lack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from proxyclient.config import UnseenPolicy


@dataclass(frozen=True)
class Candidates:
    """The tokens that may be chosen next, with their proxy-tuned scores."""

    ids: torch.Tensor  # [n] int64, base ids of the candidates
    scores: torch.Tensor  # [n] float64, base + alpha * (expert - anti)
    dropped: int  # base candidates without a proxy twin (never silently lost: counted)


@dataclass(frozen=True)
class TwinIndex:
    """What every step reads of a twin map, computed once per map (a step with the ``residual``
    or ``floor`` policy scores the whole shared vocabulary: recomputing these per step is several
    passes over it)."""

    shared: torch.Tensor  # [S] int64, the base ids with a twin, ascending
    proxy: torch.Tensor | None  # [S] their proxy ids; None when both are 0 .. S-1
    position: torch.Tensor  # [V_base] int64, each base id's index in ``shared`` (-1: no twin)
    largest: int  # the largest proxy id the map names (-1: none)
    has_twin: torch.Tensor  # [V_base + 1] bool; the last (ids past the map, -1) is False
    identity: bool  # every base id has a twin, and base id i is ``shared[i]`` = i


_INDEXES: dict[int, tuple[torch.Tensor, TwinIndex]] = {}
_MOST_INDEXES = 16  # a tuner has two maps (twin, prefix); tests build many


def twin_index(twin: torch.Tensor) -> TwinIndex:
    """``twin``'s TwinIndex (cached: twin maps are built once and never written)."""
    cached = _INDEXES.get(id(twin))
    if cached is not None and cached[0] is twin:
        return cached[1]
    shared = torch.nonzero(twin >= 0).squeeze(1)
    proxy = twin[shared]
    # The usual case, one tokenizer on both sides: base id i is proxy id i, for i < S.
    same = bool(torch.equal(proxy, shared)) and int(shared[-1:].sum()) == shared.numel() - 1
    position = torch.full((twin.numel(),), -1, dtype=torch.int64)
    position[shared] = torch.arange(shared.numel())
    largest = int(twin.max()) if twin.numel() else -1
    has_twin = torch.cat([twin >= 0, torch.zeros(1, dtype=torch.bool)])
    identity = same and shared.numel() == twin.numel()
    index = TwinIndex(shared, None if same else proxy, position, largest, has_twin, identity)
    if len(_INDEXES) >= _MOST_INDEXES:
        del _INDEXES[next(iter(_INDEXES))]
    _INDEXES[id(twin)] = (twin, index)
    return index


def base_scores(
    base_ids: torch.Tensor,
    base_logprobs: torch.Tensor,
    twin: torch.Tensor,
    policy: UnseenPolicy,
) -> Candidates:
    """The base's score for each candidate under ``policy``, before the proxies' correction.

    base_ids: [k] int64, base_logprobs: [k] float, finite (the adapter drops sentinels).
    twin: [V_base] int64, the proxy id of each base id, -1 where the proxies have none; the
    shared vocabulary is the base ids with a twin. Returned ids outside it are dropped.
    """
    seen = _seen(base_ids, base_logprobs, twin, policy)
    if seen.unseen_lp is None:
        return Candidates(seen.ids, seen.logprobs, seen.dropped)
    index = seen.index
    scores = torch.full((index.shared.numel(),), seen.unseen_lp, dtype=torch.float64)
    scores[seen.positions] = seen.logprobs
    return Candidates(index.shared, scores, seen.dropped)


def combine(
    base_ids: torch.Tensor,
    base_logprobs: torch.Tensor,
    expert_logprobs: torch.Tensor,
    anti_logprobs: torch.Tensor,
    *,
    alpha: float,
    policy: UnseenPolicy,
    twin: torch.Tensor,
) -> Candidates:
    """Proxy-tuned scores of the candidates.

    base_ids, base_logprobs: [k] the base's returned top-k.
    expert_logprobs, anti_logprobs: [V_e], [V_a] log-softmax over each proxy's whole output
    (padded vocabularies allowed). twin: [V_base] proxy id per base id, -1 for none
    (``torch.arange(V)`` when both sides share a tokenizer).
    """
    index = twin_index(twin)
    if index.largest >= min(expert_logprobs.shape[-1], anti_logprobs.shape[-1]):
        raise ValueError(
            f"proxy logprobs cover {expert_logprobs.shape[-1]} / {anti_logprobs.shape[-1]} ids, "
            f"but the bridge maps to proxy id {index.largest}"
        )
    if alpha == 0:
        return base_scores(base_ids, base_logprobs, twin, policy)
    seen = _seen(base_ids, base_logprobs, twin, policy)
    if seen.unseen_lp is None:  # the returned candidates alone
        proxy_ids = twin[seen.ids]
        expert, anti = expert_logprobs[proxy_ids], anti_logprobs[proxy_ids]
        difference = expert.to(torch.float64) - anti.to(torch.float64)
        return Candidates(seen.ids, seen.logprobs + alpha * difference, seen.dropped)
    # The whole shared vocabulary: one float64 buffer, written in place, since at a vocabulary of
    # 128k each pass over it is a megabyte. Bit for bit what base + alpha * (expert - anti) gives
    # term by term: the same roundings in the same order (f32 -> f64 is exact, + is commutative).
    if index.proxy is None:  # the same ids on both sides
        size = index.shared.numel()
        expert, anti = expert_logprobs[:size], anti_logprobs[:size]
    else:
        expert, anti = expert_logprobs[index.proxy], anti_logprobs[index.proxy]
    scores = expert.to(torch.float64, copy=True)
    scores.sub_(anti).mul_(alpha)
    returned = seen.logprobs + scores[seen.positions]
    scores.add_(seen.unseen_lp)
    scores[seen.positions] = returned
    return Candidates(index.shared, scores, seen.dropped)


@dataclass(frozen=True)
class _Seen:
    """The base's returned candidates in the shared vocabulary, and what ``policy`` gives the
    unseen ones (None: no unseen candidates, the returned ones alone)."""

    index: TwinIndex
    ids: torch.Tensor  # [n] base ids returned and shared
    logprobs: torch.Tensor  # [n] float64
    dropped: int
    unseen_lp: float | None
    positions: torch.Tensor  # [n] the ids' indices in ``index.shared``


def _seen(
    base_ids: torch.Tensor, base_logprobs: torch.Tensor, twin: torch.Tensor, policy: UnseenPolicy
) -> _Seen:
    if base_ids.dtype is not torch.int64:
        base_ids = base_ids.to(torch.int64)
    if base_logprobs.dtype is not torch.float64:
        base_logprobs = base_logprobs.to(torch.float64)
    index = twin_index(twin)
    seen_ids, seen_lp = base_ids, base_logprobs
    # Every id of the base has a twin (one tokenizer on both sides): only ids past the vocabulary
    # can be dropped, and one maximum says whether there is any.
    if index.identity and (not base_ids.numel() or int(base_ids.max()) < twin.numel()):
        dropped = 0
    else:
        known = index.has_twin[base_ids.clamp(max=twin.numel())]
        dropped = base_ids.numel() - int(known.sum())
        if dropped:  # a boolean selection is several passes: only where there is one to make
            seen_ids, seen_lp = base_ids[known], base_logprobs[known]
    # With no returned candidate in the shared vocabulary there is no floor to bound the unseen
    # by (``residual`` still spreads the leftover mass); the caller reports the empty set.
    if policy is UnseenPolicy.RESTRICT or (policy is UnseenPolicy.FLOOR and not seen_ids.numel()):
        return _Seen(index, seen_ids, seen_lp, dropped, None, seen_ids)
    n_unseen = index.shared.numel() - seen_ids.numel()
    if policy is UnseenPolicy.FLOOR:
        unseen_lp = float(seen_lp.min())
    elif policy is UnseenPolicy.RESIDUAL:
        # Mass of everything the server returned, dropped ids included: they are not "unseen".
        # (math.fsum: the exactly rounded sum, and a tenth of torch.logsumexp's cost at k = 20)
        returned_mass = math.fsum(map(math.exp, base_logprobs.tolist()))
        leftover = max(0.0, 1.0 - returned_mass)
        unseen_lp = math.log(leftover / n_unseen) if leftover > 0 and n_unseen else -math.inf
    else:
        raise ValueError(f"unknown unseen policy {policy!r}")
    positions = seen_ids if index.identity else index.position[seen_ids]
    return _Seen(index, seen_ids, seen_lp, dropped, unseen_lp, positions)
