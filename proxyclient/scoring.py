"""Scoring a given continuation under the proxy-tuned model: what evaluation harnesses ask for
multiple-choice tasks (loglikelihood). Pure math over what the step combined at each position;
the requests and the combination are the engine's (``Engine.score``), the same as a generation's.

Each continuation token's log-prob is the proxy-tuned distribution's (temperature 1) over that
position's candidates, as in the trace: with the whole vocabulary (k = -1) it is exactly the
paper's formula; with a top-k base it is the formula over what the unseen-token policy makes of
the rest (under ``restrict`` a token outside the base's top-k gets -inf).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from proxyclient.combine import Candidates
from proxyclient.result import TokenTrace, Usage


@dataclass
class Score:
    """A continuation's log-likelihood under the proxy-tuned model.

    ``logprob``: the sum over its tokens; ``is_greedy``: every token was the tuned argmax;
    ``steps``: each token's trace (tuned, base, expert and anti-expert log-probs; alternatives as
    ``GenerationConfig.trace`` asks, none by default).
    """

    logprob: float
    is_greedy: bool
    tokens: list[int]  # base ids of the continuation
    token_texts: list[str]
    token_logprobs: list[float]
    steps: list[TokenTrace]
    usage: Usage = field(default_factory=Usage)


def score_tokens(
    continuation: Sequence[int], candidates: Sequence[Candidates], steps: Sequence[TokenTrace]
) -> Score:
    """``continuation``'s score from each of its positions' ``candidates`` (what the step
    combined there) and its tokens' traces (``steps``)."""
    greedy = all(
        c.ids.numel() > 0 and int(c.ids[torch.argmax(c.scores)]) == token
        for token, c in zip(continuation, candidates, strict=True)
    )
    logprobs = [s.logprob for s in steps]
    return Score(
        logprob=math.fsum(logprobs),
        is_greedy=greedy,
        tokens=list(continuation),
        token_texts=[s.text for s in steps],
        token_logprobs=logprobs,
        steps=list(steps),
    )
