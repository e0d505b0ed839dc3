"""``echo`` with ``logprobs``: the prompt's own tokens scored by the proxy-tuned model.

This is what lm-evaluation-harness's ``local-completions`` sends for loglikelihood requests
(context + continuation as one prompt, ``echo: true``, ``logprobs: 1``, ``max_tokens: 1``): it
reads ``token_logprobs[ctxlen:-1]``, ctxlen counted in its tokenizer's tokens. So the echoed
tokens are the prompt's tokens as the base tokenizer splits it *without* special tokens (a BOS
the tuner adds is context, not echoed), each with its proxy-tuned logprob given everything
before it (``ProxyTuner.ascore("", text)``: one scoring request to the base, one forward of
each proxy).
"""

from __future__ import annotations

from typing import Any

from proxyclient.config import GenerationConfig
from proxyclient.server.logprobs import Scored
from proxyclient.server.prompts import PromptTokens
from proxyclient.server.protocol import APIError, finite
from proxyclient.server.served import ServedTuner


async def score_prompt(
    tuner: ServedTuner, tokens: PromptTokens, ids: list[int], config: GenerationConfig, top: int
) -> tuple[list[Scored], Any]:
    """Each of ``ids`` (the prompt's base ids, as the client sent or the tokenizer split them)
    with its proxy-tuned logprob given the tokens before it (and the tuner's BOS); and the Score.
    Tokens nothing precedes (no BOS), and special tokens the client put first, get None."""
    body = _strip_leading_specials(tokens, ids)
    lead = len(ids) - len(body)
    if not body:
        return [Scored(tokens.decode([t]), None) for t in ids], None
    score = await tuner.ascore("", tokens.decode(body), config)
    scored_ids = list(score.tokens)
    unscored = len(body) - len(scored_ids)
    if unscored < 0 or body[unscored:] != scored_ids:
        raise APIError(
            400,
            "prompt: the base tokenizer splits the prompt's text differently from its token "
            "ids, so its tokens cannot be echoed with logprobs; send the prompt as text",
            param="prompt",
            code="token_ids_not_canonical",
        )
    scored = [Scored(tokens.decode([t]), None) for t in ids[: lead + unscored]]
    traces = list(getattr(score, "steps", None) or [])
    pairs = zip(score.token_texts, score.token_logprobs, strict=True)
    for i, (text, logprob) in enumerate(pairs):
        trace = traces[i] if traces else None
        scored.append(Scored(text, logprob, _top(text, logprob, trace, top), trace))
    return scored, score


def _top(text: str, logprob: float, trace: Any, n: int) -> dict[str, float]:
    """The position's best alternatives (where the score traced them) and the token itself."""
    best: dict[str, float] = {}
    if trace is not None:
        for alternative in trace.top[:n]:
            best.setdefault(alternative.text, finite(alternative.logprob))  # type: ignore[arg-type]
    best.setdefault(text, finite(logprob))  # type: ignore[arg-type]
    return best


def _strip_leading_specials(tokens: PromptTokens, ids: list[int]) -> list[int]:
    """``ids`` without the special tokens the tokenizer puts first (a client-sent BOS)."""
    text = tokens.decode(ids)
    body = tokens.encode(text)
    return ids[len(ids) - len(body) :] if ids[len(ids) - len(body) :] == body else ids
