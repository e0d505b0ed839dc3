"""llama.cpp server's native ``/completion``: token-array prompts, ``n_probs``, ids in answers.

Its OpenAI-style endpoints are the weaker surface (seen on llama-cpp-python's server 0.3.36):
``/v1/completions`` refuses token-id prompts (HTTP 500), echo puts prompt logprobs on the wrong
positions, and chat top_logprobs carry null ``bytes``. ``post_sampling_probs: false`` (the default)
makes the returned logprobs the model's own distribution rather than what the sampler chain left.

llama-server leaves the probabilities out when the one token it sampled is an incomplete UTF-8
character (it holds such text back), so an answer without them is asked again with another seed.
In a multi-token answer (``generate``) it drops such a token's entry from
``completion_probabilities`` and folds its bytes into the next entry, so the entries are aligned
with the generated ids (``return_tokens``) and kept up to the first one missing.

Streamed drafts: ``stream: true``, documented at
https://github.com/ggml-org/llama.cpp/blob/master/tools/server/README.md (``POST /completion``,
"Response format": server-sent events); the shapes as llama-server (commit 0c1e570) sends them
are in tests/fixtures/llamacpp/stream_*.sse. One event per token, with that token in ``tokens``,
its ``completion_probabilities`` entry and the running ``tokens_predicted``; a last event with
``stop: true`` names no token. A held-back token gets no event at all (its bytes go out with the
next token's text, whose event names only that next token), which shows as ``tokens_predicted``
running ahead: the stream is closed there, the positions before it stand, and the next request
goes on from them. llama-server cancels a streamed task whose client disconnects, so closing the
stream stops the generation.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from proxyclient.adapters.base import (
    Capabilities,
    Continuation,
    Prompt,
    ServerUsage,
    StreamedPosition,
    TopLogprobs,
)
from proxyclient.adapters.dialect import RESAMPLE_ATTEMPTS, DialectAdapter
from proxyclient.errors import ResponseFormatError


class _HeldBack(Exception):
    """The server sampled an incomplete UTF-8 character and sent no probabilities."""

    def __init__(self, token: int | None = None, usage: ServerUsage | None = None) -> None:
        super().__init__()
        self.token = token  # the token it generated (a multi-token answer says), if known
        self.usage = usage or ServerUsage()


class LlamaCppCompletion(DialectAdapter):
    """A base model served by llama-server. ``tokenizer`` is optional: answers name tokens by id."""

    dialect = "llamacpp"

    default_capabilities = Capabilities(
        max_k=None,
        token_id_prompts=True,
        ids_in_response=True,
        prompt_scoring=False,
        logprobs="raw",
        drafts=True,
        streams=True,
    )

    def build_request(self, prompt: Prompt, k: int) -> tuple[str, dict[str, Any]]:
        return "/completion", {
            "prompt": list(prompt.ids),
            "n_predict": 1,
            "n_probs": k,
            "temperature": 1.0,
            "post_sampling_probs": False,
            "cache_prompt": True,
        }

    async def top_logprobs(self, prompt: Prompt, k: int) -> TopLogprobs:
        return await self.resampled(
            prompt,
            k,
            lambda payload, seed: payload | {"seed": seed},
            _HeldBack,
            f"llama-server sent no probabilities {RESAMPLE_ATTEMPTS} times: each time the token "
            f"it sampled was an incomplete UTF-8 character",
        )

    def build_generate(
        self, prompt: Prompt, k: int, n: int, *, greedy: bool, seed: int | None
    ) -> tuple[str, dict[str, Any]]:
        """Up to ``n`` tokens: greedy (temperature 0 keeps only the argmax) or sampled at
        temperature 1 with no other sampler (``samplers`` lists the ones applied), so from the
        raw distribution. ``return_tokens`` lists every generated id, held-back ones included."""
        path, payload = self.build_request(prompt, k)
        payload |= {
            "n_predict": n,
            "temperature": 0.0 if greedy else 1.0,
            "samplers": ["temperature"],
            "return_tokens": True,
        }
        if seed is not None and not greedy:
            payload["seed"] = seed
        return path, payload

    async def generate(
        self, prompt: Prompt, k: int, n: int, *, greedy: bool, seed: int | None = None
    ) -> Continuation:
        try:
            return await super().generate(prompt, k, n, greedy=greedy, seed=seed)
        except _HeldBack as held:
            # The first token was held back: its top-k from a one-token request (resampled).
            top = await self.top_logprobs(prompt, k)
            own = dict(zip(top.token_ids, top.logprobs, strict=True)).get(held.token)
            return Continuation((held.token,), (top,), (own,), held.usage)

    @staticmethod
    def _top(position: dict[str, Any], k: int) -> TopLogprobs:
        entries = position["top_logprobs"]
        return TopLogprobs.from_pairs(((e.get("id"), e.get("logprob")) for e in entries), k=k)

    @staticmethod
    def _usage(body: dict[str, Any]) -> ServerUsage:
        timings = body.get("timings") or {}
        return ServerUsage(
            body.get("tokens_evaluated"), body.get("tokens_predicted"), timings.get("cache_n")
        )

    def parse_response(self, body: Any, prompt: Prompt, k: int) -> TopLogprobs:
        held_back = isinstance(body, dict) and not body.get("completion_probabilities")
        if held_back and "\ufffd" in str(body.get("content", "")):
            raise _HeldBack
        try:
            return self._top(body["completion_probabilities"][0], k)
        except (KeyError, IndexError, TypeError):
            raise ResponseFormatError(
                "the answer has no completion_probabilities[0].top_logprobs; is this llama.cpp's "
                "own server (llama-server) with n_probs support? (--api llamacpp)"
            ) from None

    def parse_generate(self, body: Any, prompt: Prompt, k: int) -> Continuation:
        """Every generated position the server gave probabilities for, up to the first it left
        out (a held-back incomplete UTF-8 character), EOS included: the token, its logprob, the
        top-k before it."""
        if not isinstance(body, dict) or not {"completion_probabilities", "tokens"} & set(body):
            raise ResponseFormatError(
                "the answer has no completion_probabilities; is this llama.cpp's own server "
                "(llama-server) with n_probs support? (--api llamacpp)"
            )
        positions = body.get("completion_probabilities") or []
        generated = body.get("tokens") or []
        if not isinstance(generated, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in generated
        ):
            raise ResponseFormatError(f"the answer's tokens are not all ids: {generated!r:.200}")
        if not generated and len(positions) == body.get("tokens_predicted"):
            generated = [position.get("id") for position in positions]  # none left out
        kept = 0  # positions before the first one the server left out
        for token, position in zip(generated, positions, strict=False):
            if position.get("id") != token:
                break
            kept += 1
        if kept == 0 and (generated or body.get("tokens_predicted")):
            raise _HeldBack(generated[0] if generated else None, self._usage(body))
        try:
            tops = tuple(self._top(position, k) for position in positions[:kept])
        except (KeyError, TypeError):
            raise ResponseFormatError(
                "an entry of completion_probabilities has no top_logprobs; does this "
                "llama-server support n_probs? (--api llamacpp)"
            ) from None
        return Continuation(
            tuple(generated[:kept]),
            tops,
            tuple(position.get("logprob") for position in positions[:kept]),
            self._usage(body),
        )

    def parse_streamed(self, event: Any, prompt: Prompt, k: int, seen: int) -> Continuation:
        """One streamed event's positions (none for the last, ``stop: true``), ``seen`` positions
        having come before it; raises _HeldBack where the server left a token out before it."""
        if not isinstance(event, dict) or event.get("stop"):
            return Continuation((), (), ())
        positions = event.get("completion_probabilities")
        generated = event.get("tokens") or []
        predicted = event.get("tokens_predicted")
        if isinstance(predicted, int) and predicted > seen + len(generated):
            raise _HeldBack
        if positions is None and generated:
            raise ResponseFormatError(
                "the streamed event has no completion_probabilities; is this llama.cpp's own "
                "server (llama-server) with n_probs support? (--api llamacpp)"
            )
        if [position.get("id") for position in positions or []] != list(generated):
            raise _HeldBack  # not aligned with the ids: keep what came before it
        return Continuation(
            tuple(generated),
            tuple(self._top(position, k) for position in positions or []),
            tuple(position.get("logprob") for position in positions or []),
        )

    def stream_draft(
        self, prompt: Prompt, k: int, n: int, *, greedy: bool, seed: int | None = None
    ) -> AsyncIterator[StreamedPosition]:
        """``generate``'s positions from one streamed request, each as its event arrives, up to
        the first token the server held back."""
        path, payload = self.build_generate(prompt, k, n, greedy=greedy, seed=seed)

        def parse(event: Any, seen: int) -> Continuation | None:
            try:
                return self.parse_streamed(event, prompt, k, seen)
            except _HeldBack:
                return None

        return self.stream_positions(
            path, payload | {"stream": True}, prompt, k, n, parse, error_status=_error_status
        )


def _error_status(event: Any) -> int:
    """The status of an error the server sent inside the stream (``{"error": {"code", ...}}``)."""
    error = event["error"]
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, int) and 400 <= code < 600 else 500
