"""Scoring a given continuation under the proxy-tuned model: what evaluation harnesses ask for
multiple-choice tasks (loglikelihood). Pure tensor math over what the models said; the requests
are the tuner's (``ProxyTuner.ascore``).

Each continuation token's log-prob is the proxy-tuned distribution's (temperature 1) over that
position's candidates, as in the trace: with the whole vocabulary (k = -1) it is exactly the
paper's formula; with a top-k base it is the formula over what the unseen-token policy makes of
the rest (under ``restrict`` a token outside the base's top-k gets -inf).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from proxyclient.adapters.base import TopLogprobs
from proxyclient.combine import combine
from proxyclient.config import GenerationConfig
from proxyclient.result import TokenTrace, Usage
from proxyclient.trace import trace_token


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
    continuation: Sequence[int],
    tops: Sequence[TopLogprobs],
    expert: torch.Tensor,
    anti: torch.Tensor,
    config: GenerationConfig,
    twin: torch.Tensor,
    text_of: Callable[[int], str],
    bytes_of: Callable[[int], bytes],
) -> Score:
    """``continuation``'s score from the base's top-k before each of its tokens (``tops``) and
    the proxies' log-probs there (``expert``, ``anti``: [len(continuation), V]); ``text_of`` and
    ``bytes_of`` a base id's text and bytes."""
    steps, greedy = [], True
    for i, token in enumerate(continuation):
        top = tops[i]
        candidates = combine(
            torch.tensor(top.token_ids, dtype=torch.int64),
            torch.tensor(top.logprobs, dtype=torch.float64),
            expert[i],
            anti[i],
            alpha=config.alpha,
            policy=config.unseen,
            twin=twin,
        )
        step = trace_token(
            token, candidates, top, expert[i], anti[i], twin, config.trace or 0, text_of, bytes_of
        )
        if candidates.ids.numel():
            greedy &= int(candidates.ids[torch.argmax(candidates.scores)]) == token
        else:
            greedy = False
        steps.append(step)
    logprobs = [s.logprob for s in steps]
    return Score(
        logprob=math.fsum(logprobs),
        is_greedy=greedy,
        tokens=list(continuation),
        token_texts=[s.text for s in steps],
        token_logprobs=logprobs,
        steps=steps,
    )
