"""Together's OpenAI-like ``POST /v1/completions``: a text prompt, the chosen tokens' ids back.

Documentation: https://docs.together.ai/reference/completions-1 and
https://docs.together.ai/docs/logprobs (schema: github.com/togethercomputer/openapi,
``CompletionRequest``, ``CompletionChoicesData``, ``LogprobsPart``, ``PromptPart``).

``prompt`` is a string (the schema allows no token ids), so the ids the loop tracks are decoded and
Together tokenizes them again; where its split differs from ours the step is marked
``retokenized`` (as for TGI). ``logprobs`` is an integer 0..20; each choice's ``logprobs`` holds
``token_ids``, ``tokens`` and ``token_logprobs`` of the generated tokens and, per position,
``top_logprobs``: ``{token text: logprob}`` (not in the schema; seen in Together's answers), so the
alternatives are named by text and mapped to ids through the base's tokenizer. A text that is
U+FFFD or "" (part of a character) cannot be mapped and counts as unresolved, except when it is the
generated token itself, whose id ``token_ids`` gives. ``echo`` returns the prompt's tokens with
their own logprobs only (``PromptPart``: no top-k), so a continuation cannot be scored: the base
drafts (several tokens per request) but the expert cannot. The semantics of the logprobs (before
or after temperature) are not documented; the adapter asks at temperature 1 with no top_p (which
has been reported to corrupt Together's top logprobs).

No streamed drafts: Together's streamed chunk (the schema's ``CompletionChunk``; the SDK's
``together/types/completion_chunk.py``) carries the generated token alone (``token``: ``id``,
``text``, ``logprob``, ``special``; ``choices[].delta.token_id``), no top-k at its position, so a
stream cannot be verified position by position; base drafts are one request each.
"""

from __future__ import annotations

from typing import Any

from proxyclient.adapters.base import Capabilities, Continuation, Prompt, TopLogprobs
from proxyclient.adapters.dialect import TextPromptAdapter
from proxyclient.adapters.openai_wire import (
    COMPLETIONS_PATH,
    choice_logprobs,
    completions_body,
    sampling,
    server_usage,
)
from proxyclient.errors import ConfigError, ResponseFormatError
from proxyclient.vocab import bytes_of_token_string

TOGETHER_MAX_LOGPROBS = 20  # the schema's maximum for `logprobs`
_SAME_LOGPROB = 1e-6


class TogetherCompletions(TextPromptAdapter):
    dialect = "together"
    default_base_url = "https://api.together.xyz/v1"
    api_key_env = "TOGETHER_API_KEY"

    default_capabilities = Capabilities(
        max_k=TOGETHER_MAX_LOGPROBS,
        token_id_prompts=False,
        ids_in_response=False,  # the generated tokens' ids only: the top-k are named by text
        prompt_scoring=False,  # echo gives the prompt tokens' own logprobs, no top-k
        logprobs="raw",
        drafts=True,
    )

    def build_request(self, prompt: Prompt, k: int) -> tuple[str, dict[str, Any]]:
        if k < 0:
            raise ConfigError("Together has no whole-vocabulary mode: pass a top-logprobs k >= 0")
        return COMPLETIONS_PATH, completions_body(self.name, self.prompt_text(prompt), k)

    def build_generate(
        self, prompt: Prompt, k: int, n: int, *, greedy: bool, seed: int | None
    ) -> tuple[str, dict[str, Any]]:
        """Up to ``n`` tokens, greedy (temperature 0) or sampled at temperature 1 (no top_p)."""
        path, payload = self.build_request(prompt, k)
        return path, payload | sampling(n, greedy=greedy, seed=seed, top_p=False)

    def _token_id(self, text: str) -> int | None:
        return self.tokenizer.token_id(bytes_of_token_string(text))

    def _top(
        self,
        entries: dict[str, Any],
        k: int,
        chosen: tuple[str | None, int | None, float | None],
        retokenized: bool,
    ) -> TopLogprobs:
        """One position's ``{token text: logprob}`` as ids. The generated token's id is known
        from ``token_ids``: an entry that names it (its text and logprob) takes that id."""
        text, token_id, logprob = chosen

        def resolve(key: str, value: Any) -> int | None:
            found = self._token_id(key)
            names_chosen = key == text and token_id is not None and logprob is not None
            if found is None and names_chosen and isinstance(value, (int, float)):
                return token_id if abs(value - logprob) <= _SAME_LOGPROB else None
            return found

        pairs = [(resolve(key, value), value) for key, value in entries.items()]
        return TopLogprobs.from_pairs(pairs, k=k, retokenized=retokenized)

    def _positions(self, body: Any) -> dict[str, Any]:
        logprobs = choice_logprobs(body)
        if not isinstance(logprobs, dict) or not logprobs.get("top_logprobs"):
            raise ResponseFormatError(
                "Together sent no top_logprobs; was logprobs > 0, and is this Together's "
                "/v1/completions (--api together)?"
            )
        return logprobs

    def parse_response(self, body: Any, prompt: Prompt, k: int) -> TopLogprobs:
        return self.parse_generate(body, prompt, k).tops[0]

    def parse_generate(self, body: Any, prompt: Prompt, k: int) -> Continuation:
        """Every generated position: the token (by ``token_ids``, else by its text), its logprob
        and the top-k before it; all share the prompt's ``retokenized``."""
        logprobs = self._positions(body)
        tops = logprobs["top_logprobs"]
        texts = list(logprobs.get("tokens") or [None] * len(tops))
        ids = list(logprobs.get("token_ids") or [None] * len(tops))
        own = list(logprobs.get("token_logprobs") or [None] * len(tops))
        if not len(texts) == len(ids) == len(own) == len(tops):
            raise ResponseFormatError(
                f"the answer has {len(texts)} tokens, {len(ids)} token_ids, {len(own)} "
                f"token_logprobs and {len(tops)} top_logprobs entries"
            )
        retokenized = self.retokenized(prompt)
        tokens = tuple(
            int(i) if i is not None else (self._token_id(t) if t is not None else None)
            for i, t in zip(ids, texts, strict=True)
        )
        return Continuation(
            tokens,
            tuple(
                self._top(entries or {}, k, (t, i, lp), retokenized)
                for entries, t, i, lp in zip(tops, texts, tokens, own, strict=True)
            ),
            tuple(own),
            server_usage(body),
        )
