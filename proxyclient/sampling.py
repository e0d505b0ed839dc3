"""Choosing the next token from scored candidates. Pure tensor math: no I/O, no models.

Steps, in the order transformers' warpers apply them:
1. temperature 0: greedy, the highest score wins (the first one on exact ties);
2. divide by temperature;
3. top-k: keep the k highest;
4. top-p: keep the smallest set of highest-probability candidates whose mass reaches p;
5. draw from the softmax with the caller's generator (seeded for reproducibility).

Speculative sampling (``verify``): a token drafted from a distribution p is kept with probability
min(1, q(x) / p(x)), else a token is drawn from the normalised positive part of q - p, where q is
the distribution ``choose`` would draw from. The result is distributed exactly as q (Leviathan et
al. 2023, Chen et al. 2023), whatever p is, provided p is the distribution the draft came from.
"""

from __future__ import annotations

import math

import torch

from proxyclient.combine import numpy_view


def warp(scores: torch.Tensor, *, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Scores after temperature, top-k and top-p; removed candidates get -inf. Input unchanged.

    scores: [n]. temperature > 0. top_k 0 and top_p 1.0 mean off.
    """
    logits = scores.to(torch.float64) / temperature
    if 0 < top_k < logits.numel():
        kth_best = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth_best, -torch.inf)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(dim=0).cumsum(dim=0)
        # Drop a candidate when the mass before it already reaches top_p; the best always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(dim=0)) >= top_p
        drop_sorted[0] = False
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, -torch.inf)
    return logits


def choose(
    scores: torch.Tensor,
    *,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> int:
    """Index (into ``scores``) of the chosen candidate. scores: [n], n >= 1."""
    if scores.numel() == 0:
        raise ValueError("no candidate to choose from")
    if temperature == 0:
        # numpy's argmax (the first maximum, as torch's): a tenth of torch's call on a step's few
        # thousand candidates, where the call's dispatch is most of the time
        return int(numpy_view(scores).argmax())
    probs = warp(scores, temperature=temperature, top_k=top_k, top_p=top_p).softmax(dim=0)
    return int(torch.multinomial(probs, 1, generator=generator))


def distribution(
    scores: torch.Tensor, *, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """The distribution ``choose`` draws from, [n] float64: one-hot on the argmax when greedy."""
    if temperature == 0:
        probs = torch.zeros(scores.numel(), dtype=torch.float64)
        probs[int(torch.argmax(scores))] = 1.0
        return probs
    return warp(scores, temperature=temperature, top_k=top_k, top_p=top_p).softmax(dim=0)


def verify(
    q: torch.Tensor,
    p: torch.Tensor,
    drafted: int | None,
    drafted_p: float,
    generator: torch.Generator | None = None,
) -> tuple[int, bool]:
    """Speculative acceptance of one drafted token: (index into q of the token to emit, whether
    it is the drafted one).

    q: [n] the target distribution over the candidates. p: [n] the draft distribution over the
    same candidates. drafted: the drafted token's index among them, None when it is not one
    (then q gives it nothing and it is always rejected). drafted_p: p of the drafted token, known
    exactly even when it is no candidate.
    """
    if drafted is not None:
        ratio = float(q[drafted]) / drafted_p if drafted_p > 0 else math.inf
        if ratio >= 1 or float(torch.rand((), generator=generator, dtype=torch.float64)) < ratio:
            return drafted, True
        p = p.clone()
        p[drafted] = drafted_p  # the exact value wins over an estimate
    residual = torch.clamp(q - p, min=0.0)
    if float(residual.sum()) <= 0:  # q == p up to rounding: rejection had probability ~0
        residual = q
    return int(torch.multinomial(residual / residual.sum(), 1, generator=generator)), False
