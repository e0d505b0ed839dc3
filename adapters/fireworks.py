"""Fireworks' ``POST /inference/v1/completions``: token-id prompts, token ids in the answer.

Documentation: https://docs.fireworks.ai/api-reference/post-completions (the OpenAPI schema of
``CompletionRequest``, ``Choice``, ``LogProbs``, ``NewLogProbs``, ``HTTPValidationError``) and
https://docs.fireworks.ai/guides/inference-error-codes.

``prompt`` may be an array of token ids. ``logprobs: true`` with ``top_logprobs: k`` answers in the
OpenAI-compatible ``NewLogProbs`` shape: ``choices[0].logprobs.content[]``, one entry per token
with its ``token_id``, ``logprob`` (the model's), ``sampling_logprob`` (after the sampler) and
``top_logprobs[]`` of ``{token, logprob, token_id, bytes}``; so every candidate comes with its id.
``echo_last: n`` puts the prompt's last n tokens first in ``content``, scored the same way, so one
request scores a continuation and generates the token after it. The documented range of
``top_logprobs`` is 0..5 (a deployment may allow more); a larger k is refused with a 422
``HTTPValidationError`` whose message states the cap, which discovery reads.

Streamed drafts: ``stream: true`` answers server-sent events ending with ``data: [DONE]``, each a
``CompletionStreamResponse`` whose ``choices[].logprobs`` has the answer's shape
(``CompletionResponseStreamChoice``: ``LogProbs`` or ``NewLogProbs``, the same schema page), so
each chunk's ``content`` positions are read as an answer's are. ``stream_options`` is not in the
request schema (``additionalProperties: false``), so the tokens received are what is counted.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from proxyclient.adapters.base import (
    Capabilities,
    Continuation,
    Prompt,
    StreamedPosition,
    TopLogprobs,
)
from proxyclient.adapters.dialect import DialectAdapter
from proxyclient.adapters.openai_wire import (
    COMPLETIONS_PATH,
    choice_logprobs,
    content_top,
    sampling,
    server_usage,
    stream_positions,
)
from proxyclient.errors import ConfigError, ResponseFormatError

FIREWORKS_MAX_TOP_LOGPROBS = 5  # the documented range of top_logprobs


def _content(body: Any) -> list[dict[str, Any]]:
    logprobs = choice_logprobs(body)
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(content, list):
        raise ResponseFormatError(
            "the answer has no choices[0].logprobs.content (the OpenAI-compatible logprobs that "
            "logprobs: true asks for); is this Fireworks' /inference/v1/completions (--api "
            "fireworks)?"
        )
    return content


def _top(entry: dict[str, Any], k: int) -> TopLogprobs:
    return content_top(entry, k, lambda alternative: alternative.get("token_id"))


class FireworksCompletions(DialectAdapter):
    """A base model on Fireworks (serverless, or a deployment ``accounts/A/deployments/D``).
    ``tokenizer`` is optional: answers name tokens by id."""

    dialect = "fireworks"
    default_base_url = "https://api.fireworks.ai/inference/v1"
    api_key_env = "FIREWORKS_API_KEY"
    raise_k_cap = "use a Fireworks deployment that allows more top_logprobs"

    default_capabilities = Capabilities(
        max_k=FIREWORKS_MAX_TOP_LOGPROBS,
        token_id_prompts=True,
        ids_in_response=True,
        prompt_scoring=True,
        logprobs="raw",
        drafts=True,
        streams=True,
    )

    def build_request(self, prompt: Prompt, k: int) -> tuple[str, dict[str, Any]]:
        """One token after the prompt's ids with the top-k before it. The ``logprob`` fields are
        the model's whatever the sampler does; top_p 1 keeps a sampled draft on the model's
        distribution (top_k is left at its default, which the schema does not state)."""
        if k < 0:
            raise ConfigError("Fireworks has no whole-vocabulary mode: pass a top-logprobs k >= 0")
        return COMPLETIONS_PATH, {
            "model": self.name,
            "prompt": list(prompt.ids),
            "max_tokens": 1,
            "temperature": 1.0,
            "top_p": 1.0,
            "logprobs": True,
            "top_logprobs": k,
            "context_length_exceeded_behavior": "error",
        }

    def build_generate(
        self, prompt: Prompt, k: int, n: int, *, greedy: bool, seed: int | None
    ) -> tuple[str, dict[str, Any]]:
        """Up to ``n`` tokens, greedy (temperature 0) or sampled at temperature 1 with top_p 1;
        the ``logprob`` fields are the model's either way."""
        path, payload = self.build_request(prompt, k)
        return path, payload | sampling(n, greedy=greedy, seed=seed)

    def stream_draft(
        self, prompt: Prompt, k: int, n: int, *, greedy: bool, seed: int | None = None
    ) -> AsyncIterator[StreamedPosition]:
        """``generate``'s positions from one streamed request, each as its chunk arrives."""
        path, payload = self.build_generate(prompt, k, n, greedy=greedy, seed=seed)
        parse = lambda chunk: self.parse_generate(chunk, prompt, k)  # noqa: E731
        return stream_positions(self, path, payload | {"stream": True}, prompt, k, n, parse)

    def build_score(
        self, prompt: Prompt, continuation: Sequence[int], k: int
    ) -> tuple[str, dict[str, Any]]:
        """The continuation after the prompt, its last tokens echoed (``echo_last``) with the
        top-k at each, and one token generated after it."""
        path, payload = self.build_request(Prompt((*prompt.ids, *continuation), 0), k)
        return path, payload | {"echo_last": len(continuation)}

    def parse_response(self, body: Any, prompt: Prompt, k: int) -> TopLogprobs:
        """The top-k before the first generated token."""
        generated = self.parse_generate(body, prompt, k)
        if not generated.tops:
            raise ResponseFormatError("Fireworks sent no logprobs for the generated token")
        return generated.tops[0]

    def parse_generate(self, body: Any, prompt: Prompt, k: int) -> Continuation:
        """The positions of ``content`` (echoed prompt tokens first, after ``build_score``):
        each token, its logprob and the top-k before it. A final EOS is included as Fireworks
        sends it."""
        content = _content(body)
        if content and not content[0].get("top_logprobs"):
            raise ResponseFormatError(
                "Fireworks sent logprobs without top_logprobs; was top_logprobs > 0?"
            )
        return Continuation(
            tuple(entry.get("token_id") for entry in content),
            tuple(_top(entry, k) for entry in content),
            tuple(entry.get("logprob") for entry in content),
            server_usage(body),
        )

    def parse_score(
        self, body: Any, prompt: Prompt, continuation: Sequence[int], k: int
    ) -> Continuation:
        """The echoed continuation's top-k at each of its tokens, then the generated token's."""
        n = len(continuation)
        scored = self.parse_generate(body, prompt, k)
        if len(scored) < n + 1 or list(scored.tokens[:n]) != list(continuation):
            raise ResponseFormatError(
                f"asked to echo the last {n} prompt tokens and got {len(scored)} positions that "
                f"do not start with them: does this deployment support echo_last?"
            )
        return Continuation(
            scored.tokens[: n + 1],
            scored.tops[: n + 1],
            scored.token_logprobs[: n + 1],
            scored.usage,
        )
