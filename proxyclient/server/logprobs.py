"""Per-token traces (``proxyclient.result.TokenTrace``) in OpenAI's logprobs shapes.

The logprobs are the proxy-tuned distribution's (temperature 1, over the step's candidates).
Extension fields give, per token, the base's, the expert's and the anti-expert's logprob of the
chosen token (null where unknown: outside the base's top-k, no proxy twin, or alpha 0):
completions add the parallel lists ``base_token_logprobs``, ``expert_token_logprobs`` and
``anti_expert_token_logprobs``; chat adds ``base_logprob``, ``expert_logprob`` and
``anti_expert_logprob`` to each entry of ``logprobs.content``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from proxyclient.server.protocol import finite


@dataclass(frozen=True)
class Scored:
    """A prompt token with its proxy-tuned logprob (echo); ``logprob`` None for the first."""

    text: str
    logprob: float | None
    top: dict[str, float] | None = None
    trace: Any = None  # the position's TokenTrace, where the score has one


class CompletionLogprobs:
    """The ``logprobs`` object of a completion choice, built piece by piece (streaming sends each
    piece's tokens in its chunk; ``text_offset`` counts on across chunks)."""

    def __init__(self, top: int, offset: int = 0) -> None:
        self.top = top
        self.offset = offset

    def block(
        self, traces: Sequence[Any], scored: Sequence[Scored] = (), tail: Sequence[Scored] = ()
    ) -> dict[str, Any]:
        """Entries for ``scored`` (echoed prompt tokens), ``traces`` (generated tokens) and
        ``tail`` (an EOS that ended the generation), in that order."""
        rows: list[tuple[str, float | None, dict[str, float] | None, Any]] = [
            (token.text, token.logprob, token.top, token.trace) for token in scored
        ]
        rows += [(trace.text, trace.logprob, self._top(trace), trace) for trace in traces]
        rows += [(token.text, token.logprob, token.top, None) for token in tail]
        offsets = []
        for text, *_ in rows:
            offsets.append(self.offset)
            self.offset += len(text)

        def of_trace(name: str) -> list[float | None]:
            return [finite(getattr(t, name)) if t is not None else None for *_, t in rows]

        return {
            "tokens": [text for text, *_ in rows],
            "token_logprobs": [finite(logprob) for _, logprob, _, _ in rows],
            "top_logprobs": [top for _, _, top, _ in rows],
            "text_offset": offsets,
            "base_token_logprobs": of_trace("base_logprob"),
            "expert_token_logprobs": of_trace("expert_logprob"),
            "anti_expert_token_logprobs": of_trace("anti_logprob"),
            # The base's own top-1 at each position (where it is not the token, steering chose)
            "base_top_tokens": [
                t.base_top.text if t is not None and t.base_top is not None else None
                for *_, t in rows
            ],
            "base_top_logprobs": [
                finite(t.base_top.logprob) if t is not None and t.base_top is not None else None
                for *_, t in rows
            ],
        }

    def _top(self, trace: Any) -> dict[str, float]:
        """The best alternatives by tuned logprob, and the chosen token (as OpenAI lists it)."""
        best: dict[str, float] = {}
        for alternative in trace.top[: self.top]:
            best.setdefault(alternative.text, finite(alternative.logprob))  # type: ignore[arg-type]
        best.setdefault(trace.text, finite(trace.logprob))  # type: ignore[arg-type]
        return best


def chat_logprobs(traces: Sequence[Any], top: int) -> dict[str, Any]:
    """``logprobs`` of a chat choice (or of one chunk): ``{"content": [...]}``."""
    return {"content": [_chat_entry(trace, top) for trace in traces], "refusal": None}


def _chat_entry(trace: Any, top: int) -> dict[str, Any]:
    return {
        "token": trace.text,
        "logprob": finite(trace.logprob),
        "bytes": trace.token_bytes,
        "top_logprobs": [
            {"token": a.text, "logprob": finite(a.logprob), "bytes": a.token_bytes}
            for a in trace.top[:top]
        ],
        "base_logprob": finite(trace.base_logprob),
        "expert_logprob": finite(trace.expert_logprob),
        "anti_expert_logprob": finite(trace.anti_logprob),
        "base_top": (
            {"token": trace.base_top.text, "logprob": finite(trace.base_top.logprob)}
            if trace.base_top is not None
            else None
        ),
    }
