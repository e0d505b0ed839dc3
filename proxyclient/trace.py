"""The per-token trace: what each model said about a chosen token. Pure tensor math, no I/O.

The tuned log-prob is the proxy-tuned distribution at temperature 1 over the step's candidates
(``log_softmax`` of ``base + alpha * (expert - anti)``): what an OpenAI-style ``logprobs`` field
reports for the customised model. The base's is its returned log-prob (None outside its top-k);
the expert's and anti-expert's are over their whole vocabularies, at the candidate's proxy twin
(None for a token with none).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from proxyclient.adapters.base import TopLogprobs
from proxyclient.combine import Candidates
from proxyclient.result import Alternative, TokenTrace


def trace_token(
    token: int,
    candidates: Candidates,
    top: TopLogprobs,
    expert: torch.Tensor | None,
    anti: torch.Tensor | None,
    twin: torch.Tensor,
    alternatives: int,
    text_of: Callable[[int], str],
    bytes_of: Callable[[int], bytes],
) -> TokenTrace:
    """The trace of ``token`` chosen among ``candidates`` (base ids, tuned scores); ``top`` the
    base's answer, ``expert``/``anti`` the proxies' log-probs ([V]; None when alpha = 0: no
    forward ran), ``twin`` the base-to-proxy id map the step combined with, ``alternatives``
    the number of best tuned candidates to list, ``text_of`` and ``bytes_of`` a base id's text and
    bytes."""
    tuned = torch.log_softmax(candidates.scores, dim=-1)
    where = torch.nonzero(candidates.ids == token).flatten()
    logprob = float(tuned[where[0]]) if where.numel() else float("-inf")
    base = dict(zip(top.token_ids, top.logprobs, strict=True)).get(token)
    proxy = int(twin[token]) if 0 <= token < twin.numel() else -1
    expert_lp = float(expert[proxy]) if expert is not None and proxy >= 0 else None
    anti_lp = float(anti[proxy]) if anti is not None and proxy >= 0 else None
    best = torch.topk(tuned, min(alternatives, tuned.numel()))
    base_best = None
    if len(top):
        i = max(range(len(top)), key=top.logprobs.__getitem__)
        first = top.token_ids[i]
        base_best = Alternative(first, text_of(first), top.logprobs[i], list(bytes_of(first)))
    alternative_ids = [int(candidates.ids[i]) for i in best.indices]
    return TokenTrace(
        token_id=token,
        text=text_of(token),
        logprob=logprob,
        base_logprob=base,
        expert_logprob=expert_lp,
        anti_logprob=anti_lp,
        top=[
            Alternative(i, text_of(i), float(lp), list(bytes_of(i)))
            for lp, i in zip(best.values, alternative_ids, strict=True)
        ],
        token_bytes=list(bytes_of(token)),
        base_top=base_best,
    )
