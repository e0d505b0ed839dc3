"""Proxy-tuning's formula on a restricted candidate set. Pure tensor math: no I/O, no models.

    score(t) = base_logprob(t) + alpha * (expert_logprob(t) - anti_expert_logprob(t))

Log-probabilities stand in for logits: each model's normalising constant is the same for every
candidate, so it cancels in the softmax over any candidate set. That is why the formula is exact on
whatever part of the vocabulary the base reveals, and why local models with padded vocabularies
(more logits than tokens) need no special care beyond ignoring ids the others lack.

The arithmetic runs on numpy views of the (CPU) tensors: the same IEEE float64 operations in the
same order as torch's, at a quarter to a tenth of the cost per call on the small arrays of a
step (a top-k of 20, a vocabulary of a few thousand), where a torch call's dispatch is most of
its time; one combine is called per verified position. Results are tensors again (sharing the
arrays' memory).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
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
    passes over it). Arrays are numpy views; ``shared_ids`` the same as a tensor."""

    twin: np.ndarray  # [V_base] int64, the map itself
    shared: np.ndarray  # [S] int64, the base ids with a twin, ascending
    shared_ids: torch.Tensor  # ``shared``
    proxy: np.ndarray | None  # [S] their proxy ids; None when both are 0 .. S-1
    position: np.ndarray  # [V_base] int64, each base id's index in ``shared`` (-1: no twin)
    largest: int  # the largest proxy id the map names (-1: none)
    has_twin: np.ndarray  # [V_base + 1] bool; the last (ids past the map, -1) is False
    identity: bool  # every base id has a twin, and base id i is ``shared[i]`` = i


_INDEXES: dict[int, tuple[torch.Tensor, TwinIndex]] = {}
_MOST_INDEXES = 16  # a tuner has two maps (twin, prefix); tests build many


def twin_index(twin: torch.Tensor) -> TwinIndex:
    """``twin``'s TwinIndex (cached: twin maps are built once and never written)."""
    cached = _INDEXES.get(id(twin))
    if cached is not None and cached[0] is twin:
        return cached[1]
    array = numpy_view(twin).astype(np.int64, copy=False)
    shared = np.flatnonzero(array >= 0)
    proxy = array[shared]
    # The usual case, one tokenizer on both sides: base id i is proxy id i, for i < S.
    same = bool(np.array_equal(proxy, shared)) and int(shared[-1:].sum()) == shared.size - 1
    position = np.full(array.size, -1, dtype=np.int64)
    position[shared] = np.arange(shared.size)
    largest = int(array.max()) if array.size else -1
    has_twin = np.append(array >= 0, False)
    identity = same and shared.size == array.size
    index = TwinIndex(
        array,
        shared,
        torch.from_numpy(shared),
        None if same else proxy,
        position,
        largest,
        has_twin,
        identity,
    )
    if len(_INDEXES) >= _MOST_INDEXES:
        del _INDEXES[next(iter(_INDEXES))]
    _INDEXES[id(twin)] = (twin, index)
    return index


def base_scores(
    base_ids: torch.Tensor | np.ndarray,
    base_logprobs: torch.Tensor | np.ndarray,
    twin: torch.Tensor,
    policy: UnseenPolicy,
) -> Candidates:
    """The base's score for each candidate under ``policy``, before the proxies' correction.

    base_ids: [k] int64, base_logprobs: [k] float, finite (the adapter drops sentinels).
    twin: [V_base] int64, the proxy id of each base id, -1 where the proxies have none; the
    shared vocabulary is the base ids with a twin. Returned ids outside it are dropped.
    """
    seen = _seen(twin_index(twin), base_ids, base_logprobs, policy)
    if seen.unseen_lp is None:
        return _candidates(seen.ids, seen.logprobs, seen.dropped)
    index = seen.index
    scores = np.full(index.shared.size, seen.unseen_lp, dtype=np.float64)
    scores[seen.positions] = seen.logprobs
    return Candidates(index.shared_ids, torch.from_numpy(scores), seen.dropped)


def combine(
    base_ids: torch.Tensor | np.ndarray,
    base_logprobs: torch.Tensor | np.ndarray,
    expert_logprobs: torch.Tensor,
    anti_logprobs: torch.Tensor,
    *,
    alpha: float,
    policy: UnseenPolicy,
    twin: torch.Tensor,
) -> Candidates:
    """Proxy-tuned scores of the candidates.

    base_ids, base_logprobs: [k] the base's returned top-k (tensors, or numpy arrays as a step
    passes them).
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
    seen = _seen(index, base_ids, base_logprobs, policy)
    expert_all, anti_all = numpy_view(expert_logprobs), numpy_view(anti_logprobs)
    if seen.unseen_lp is None:  # the returned candidates alone
        proxy_ids = index.twin[seen.ids]
        expert = expert_all[proxy_ids].astype(np.float64)
        difference = expert - anti_all[proxy_ids]
        return _candidates(seen.ids, seen.logprobs + alpha * difference, seen.dropped)
    # The whole shared vocabulary: one float64 buffer, written in place, since at a vocabulary of
    # 128k each pass over it is a megabyte. Bit for bit what base + alpha * (expert - anti) gives
    # term by term: the same roundings in the same order (f32 -> f64 is exact, + is commutative).
    if index.proxy is None:  # the same ids on both sides
        size = index.shared.size
        expert, anti = expert_all[:size], anti_all[:size]
    else:
        expert, anti = expert_all[index.proxy], anti_all[index.proxy]
    scores = expert.astype(np.float64)
    scores -= anti
    scores *= alpha
    returned = seen.logprobs + scores[seen.positions]
    scores += seen.unseen_lp
    scores[seen.positions] = returned
    return Candidates(index.shared_ids, torch.from_numpy(scores), seen.dropped)


class _Seen(NamedTuple):  # (a tuple: a fifth of a frozen dataclass's construction, per position)
    """The base's returned candidates in the shared vocabulary, and what ``policy`` gives the
    unseen ones (None: no unseen candidates, the returned ones alone)."""

    index: TwinIndex
    ids: np.ndarray  # [n] base ids returned and shared
    logprobs: np.ndarray  # [n] float64
    dropped: int
    unseen_lp: float | None
    positions: np.ndarray  # [n] the ids' indices in ``index.shared``


def _seen(
    index: TwinIndex,
    base_ids: torch.Tensor | np.ndarray,
    base_logprobs: torch.Tensor | np.ndarray,
    policy: UnseenPolicy,
) -> _Seen:
    ids = numpy_view(base_ids).astype(np.int64, copy=False)
    logprobs = numpy_view(base_logprobs).astype(np.float64, copy=False)
    seen_ids, seen_lp = ids, logprobs
    size = index.twin.size
    # Every id of the base has a twin (one tokenizer on both sides): only ids past the vocabulary
    # can be dropped, and one maximum says whether there is any.
    if index.identity and (not ids.size or int(ids.max()) < size):
        dropped = 0
    else:
        known = index.has_twin[np.minimum(ids, size)]
        dropped = ids.size - int(np.count_nonzero(known))
        if dropped:  # a boolean selection is several passes: only where there is one to make
            seen_ids, seen_lp = ids[known], logprobs[known]
    # With no returned candidate in the shared vocabulary there is no floor to bound the unseen
    # by (``residual`` still spreads the leftover mass); the caller reports the empty set.
    if policy is UnseenPolicy.RESTRICT or (policy is UnseenPolicy.FLOOR and not seen_ids.size):
        return _Seen(index, seen_ids, seen_lp, dropped, None, seen_ids)
    n_unseen = index.shared.size - seen_ids.size
    if policy is UnseenPolicy.FLOOR:
        unseen_lp = float(seen_lp.min())
    elif policy is UnseenPolicy.RESIDUAL:
        # Mass of everything the server returned, dropped ids included: they are not "unseen".
        # (math.fsum: the exactly rounded sum, and a tenth of torch.logsumexp's cost at k = 20)
        returned_mass = math.fsum(map(math.exp, logprobs.tolist()))
        leftover = max(0.0, 1.0 - returned_mass)
        unseen_lp = math.log(leftover / n_unseen) if leftover > 0 and n_unseen else -math.inf
    else:
        raise ValueError(f"unknown unseen policy {policy!r}")
    positions = seen_ids if index.identity else index.position[seen_ids]
    return _Seen(index, seen_ids, seen_lp, dropped, unseen_lp, positions)


def numpy_view(tensor: torch.Tensor | np.ndarray) -> np.ndarray:
    """A numpy view of a CPU tensor (a copy from another device, or of a dtype numpy lacks); an
    array as it is."""
    if type(tensor) is np.ndarray:
        return tensor
    try:
        return tensor.numpy()
    except (TypeError, RuntimeError):  # on a GPU, bfloat16 (numpy has none), or in a graph
        tensor = tensor.detach().cpu()
        return (tensor.float() if tensor.dtype is torch.bfloat16 else tensor).numpy()


def _candidates(ids: np.ndarray, scores: np.ndarray, dropped: int) -> Candidates:
    return Candidates(torch.from_numpy(ids), torch.from_numpy(scores), dropped)
