"""Ollama's native ``POST /api/generate`` (the server root, default ``http://127.0.0.1:11434``).

Documentation: https://docs.ollama.com/api/generate (``GenerateRequest``: ``raw``, ``stream``,
``logprobs``, ``top_logprobs``, ``options``; ``GenerateResponse.logprobs[]``: ``token``,
``logprob``, ``bytes``, ``top_logprobs[]``) and https://docs.ollama.com/api/errors. Log
probabilities need Ollama 0.12.11 or later; ``top_logprobs`` is limited to 0..20 ("top_logprobs
must be between 0 and 20", server/routes.go).

The prompt goes as text with ``raw: true`` (no prompt template) and Ollama tokenizes it again:
where its split differs from our ids the step is marked ``retokenized`` (as for TGI). Tokens come
back as text, so the base's tokenizer maps them to ids; a token that is part of a character comes
back as U+FFFD (its ``bytes`` are those of U+FFFD too) and counts as unresolved. The logprobs are
the model's own (a softmax of the logits, before any sampler), but Ollama's defaults sample at
temperature 0.8 with top-k 40, top-p 0.9 and a repeat penalty of 1.1, so every option that would
change which token is generated is sent. An answer whose only token was the end of the text may
carry no logprobs at all; it is asked again with another seed.

Streamed drafts: the same request with ``"stream": true`` (the documented default, "Streaming
responses" on the generate page above and https://docs.ollama.com/api/streaming), answered with
newline-delimited JSON (``application/x-ndjson``): one ``GenerateResponse`` a line, each with
its new tokens' ``logprobs`` in the unstreamed answer's shape, the last with ``done: true`` and
the counts. An error after the stream opened comes as a line ``{"error": "..."}`` in the 200
answer ("Errors that occur while streaming" on the errors page above). Ollama runs the
completion under the request's context, which ends when the client disconnects, so closing the
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
from proxyclient.adapters.dialect import RESAMPLE_ATTEMPTS, TextPromptAdapter
from proxyclient.adapters.openai_wire import content_top
from proxyclient.errors import ConfigError, ResponseFormatError
from proxyclient.vocab import bytes_of_token_string

GENERATE_PATH = "/api/generate"
OLLAMA_MAX_TOP_LOGPROBS = 20
# Ollama's defaults are 40, 0.9, 0.0 and 1.1: these turn every warper and the penalty off.
_NO_WARPERS = {"top_k": 0, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0}


class _NoLogprobs(Exception):
    """Ollama answered without a single logprob (it generated only the end of the text)."""


class OllamaGenerate(TextPromptAdapter):
    dialect = "ollama"
    default_base_url = "http://127.0.0.1:11434"

    default_capabilities = Capabilities(
        max_k=OLLAMA_MAX_TOP_LOGPROBS,
        token_id_prompts=False,
        ids_in_response=False,
        prompt_scoring=False,  # /api/generate scores generated tokens only
        logprobs="raw",
        drafts=True,
        streams=True,
    )

    def build_request(self, prompt: Prompt, k: int) -> tuple[str, dict[str, Any]]:
        if k < 0:
            raise ConfigError("Ollama has no whole-vocabulary mode: pass a top-logprobs k >= 0")
        return GENERATE_PATH, {
            "model": self.name,
            "prompt": self.prompt_text(prompt),
            "raw": True,
            "stream": False,
            "logprobs": True,
            "top_logprobs": k,
            "options": {"num_predict": 1, "temperature": 1.0, **_NO_WARPERS},
        }

    async def top_logprobs(self, prompt: Prompt, k: int) -> TopLogprobs:
        return await self.resampled(
            prompt,
            k,
            lambda payload, seed: payload | {"options": payload["options"] | {"seed": seed}},
            _NoLogprobs,
            f"Ollama sent no logprobs {RESAMPLE_ATTEMPTS} times: each time the token it sampled "
            f"ended the text (or the prompt was empty)",
        )

    def build_generate(
        self, prompt: Prompt, k: int, n: int, *, greedy: bool, seed: int | None
    ) -> tuple[str, dict[str, Any]]:
        """Up to ``n`` tokens, greedy (temperature 0) or sampled at temperature 1 with no warper
        and no penalty, so from the model's own distribution."""
        path, payload = self.build_request(prompt, k)
        options = payload["options"] | {"num_predict": n, "temperature": 0.0 if greedy else 1.0}
        if seed is not None and not greedy:
            options["seed"] = seed
        return path, payload | {"options": options}

    async def generate(
        self, prompt: Prompt, k: int, n: int, *, greedy: bool, seed: int | None = None
    ) -> Continuation:
        try:
            return await super().generate(prompt, k, n, greedy=greedy, seed=seed)
        except _NoLogprobs:
            return Continuation((), (), ())  # it ended at once: the engine asks for one position

    def _token_id(self, entry: dict[str, Any]) -> int | None:
        """The id of a ``{token, logprob, bytes}`` entry: by its bytes where they are the token's
        own (not valid UTF-8 alone), else by its text; U+FFFD and "" cannot be mapped."""
        raw = entry.get("bytes")
        if isinstance(raw, list) and raw and all(isinstance(b, int) for b in raw):
            data = bytes(b & 0xFF for b in raw)
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                return self.tokenizer.token_id(data)
        text = entry.get("token")
        if not isinstance(text, str):
            return None
        return self.tokenizer.token_id(bytes_of_token_string(text))

    def _positions(self, body: Any) -> list[dict[str, Any]]:
        if not isinstance(body, dict) or "response" not in body:
            raise ResponseFormatError(
                f"the answer is not an Ollama /api/generate response: {str(body)[:200]!r}; is "
                f"this Ollama (--api ollama, the server root without /api)?"
            )
        positions = body.get("logprobs")
        if positions is None:
            raise ResponseFormatError(
                "Ollama sent no logprobs: log probabilities need Ollama 0.12.11 or later"
            )
        if not positions:
            raise _NoLogprobs
        if not positions[0].get("top_logprobs"):
            raise ResponseFormatError("Ollama sent logprobs without top_logprobs; was k > 0?")
        return positions

    def parse_response(self, body: Any, prompt: Prompt, k: int) -> TopLogprobs:
        top = self._positions(body)[0]
        return content_top(top, k, self._token_id, retokenized=self.retokenized(prompt))

    def parse_generate(self, body: Any, prompt: Prompt, k: int) -> Continuation:
        """Every position Ollama gave logprobs for: the token (by its text), its logprob and the
        top-k before it; all share the prompt's ``retokenized``."""
        positions = self._positions(body)
        retokenized = self.retokenized(prompt)
        return Continuation(
            tuple(self._token_id(p) for p in positions),
            tuple(content_top(p, k, self._token_id, retokenized=retokenized) for p in positions),
            tuple(p.get("logprob") for p in positions),
            ServerUsage(body.get("prompt_eval_count"), body.get("eval_count")),
        )

    def parse_streamed(self, line: Any, k: int, retokenized: bool) -> Continuation:
        """One streamed line's positions (the last line, ``done``, usually has none)."""
        if not isinstance(line, dict) or "response" not in line:
            raise ResponseFormatError(
                f"the streamed line is not an Ollama /api/generate response: {str(line)[:200]!r}"
            )
        positions = line.get("logprobs")
        if positions is None and line.get("response"):
            raise ResponseFormatError(
                "Ollama sent no logprobs: log probabilities need Ollama 0.12.11 or later"
            )
        positions = positions or []
        if any(not p.get("top_logprobs") for p in positions):
            raise ResponseFormatError("Ollama sent logprobs without top_logprobs; was k > 0?")
        return Continuation(
            tuple(self._token_id(p) for p in positions),
            tuple(content_top(p, k, self._token_id, retokenized=retokenized) for p in positions),
            tuple(p.get("logprob") for p in positions),
        )

    def stream_draft(
        self, prompt: Prompt, k: int, n: int, *, greedy: bool, seed: int | None = None
    ) -> AsyncIterator[StreamedPosition]:
        """``generate``'s positions from one streamed request, each as its line arrives."""
        path, payload = self.build_generate(prompt, k, n, greedy=greedy, seed=seed)
        retokenized = self.retokenized(prompt)
        return self.stream_positions(
            path,
            payload | {"stream": True},
            prompt,
            k,
            n,
            lambda line, _seen: self.parse_streamed(line, k, retokenized),
            error_status=lambda _event: 500,
            ndjson=True,
        )

    async def _served_models_hint(self) -> str:
        return "`ollama list` shows the models this Ollama has; `ollama pull NAME` adds one."
