"""OpenAI's legacy ``/v1/completions`` (OpenAI itself and the many hosts that copy it).

Top logprobs come back keyed by token *text*, so ids are recovered through the base tokenizer's
byte vocabulary (tiktoken for OpenAI models, a local HF tokenizer for open ones). A token whose
text is not valid UTF-8 alone comes back as ``bytes:\\xNN`` (OpenAI) or as "" / U+FFFD (other
hosts, which loses it); string keys also collapse tokens that decode alike. Such entries are
counted as unresolved, never guessed.

OpenAI itself shut its last completion models (gpt-3.5-turbo-instruct, davinci-002, babbage-002)
down on 2026-09-28 (its deprecations page): a 404 for them says so, with what to use instead.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Unpack

from proxyclient.adapters.base import Capabilities, Continuation, Prompt, TopLogprobs
from proxyclient.adapters.dialect import DialectAdapter, DialectOptions
from proxyclient.adapters.http import HTTPTransport
from proxyclient.adapters.openai_wire import (
    COMPLETIONS_PATH,
    completion_positions,
    completion_top_logprobs,
    completions_body,
    openai_explanation,
    sampling,
    server_usage,
)
from proxyclient.errors import APIStatusError, ProxyClientError
from proxyclient.tokenizer import BaseTokenizer, tiktoken_spec_for_model
from proxyclient.vocab import bytes_of_token_string

OPENAI_MAX_LOGPROBS = 5


class OpenAICompletions(DialectAdapter):
    dialect = "openai"
    default_base_url = "https://api.openai.com/v1"
    api_key_env = "OPENAI_API_KEY"
    needs_tokenizer = True
    also_served_by = frozenset({"vllm"})
    tokenizer: BaseTokenizer

    default_capabilities = Capabilities(
        max_k=OPENAI_MAX_LOGPROBS,
        token_id_prompts=True,
        ids_in_response=False,
        prompt_scoring=False,  # echo + logprobs is refused by OpenAI's current models
        logprobs="raw",
        drafts=True,
    )

    def __init__(
        self,
        transport: HTTPTransport,
        model: str,
        *,
        token_id_prompts: bool = True,
        **options: Unpack[DialectOptions],
    ) -> None:
        super().__init__(transport, model, **options)
        self.capabilities = dataclasses.replace(
            self.capabilities, token_id_prompts=token_id_prompts
        )

    @classmethod
    def default_tokenizer(cls, model: str) -> str | None:
        """OpenAI's model names imply their tiktoken encoding."""
        return tiktoken_spec_for_model(model)

    def build_request(self, prompt: Prompt, k: int) -> tuple[str, dict[str, Any]]:
        sent: list[int] | str = (
            list(prompt.ids)
            if self.capabilities.token_id_prompts
            else self.tokenizer.decode(prompt.ids)
        )
        return COMPLETIONS_PATH, completions_body(self.name, sent, k)

    def build_generate(
        self, prompt: Prompt, k: int, n: int, *, greedy: bool, seed: int | None
    ) -> tuple[str, dict[str, Any]]:
        """Up to ``n`` tokens, greedy (temperature 0) or sampled from the raw distribution; the
        logprobs are the raw model's either way."""
        path, payload = self.build_request(prompt, k)
        return path, payload | sampling(n, greedy=greedy, seed=seed)

    def _token_id(self, token: str) -> int | None:
        return self.tokenizer.token_id(bytes_of_token_string(token))

    def _top(self, entries: dict[str, Any], k: int) -> TopLogprobs:
        """One position's ``{token text: logprob}``, as ids."""
        pairs = [(self._token_id(token), logprob) for token, logprob in entries.items()]
        # OpenAI returns up to k + 1 entries (the sampled token is added); keep the k best.
        return TopLogprobs.from_pairs(pairs, k=k)

    def parse_response(self, body: Any, prompt: Prompt, k: int) -> TopLogprobs:
        return self._top(completion_top_logprobs(body), k)

    def parse_generate(self, body: Any, prompt: Prompt, k: int) -> Continuation:
        """Every generated position: the token (by its text), its logprob, the top-k before it.
        A server that leaves a final end-of-text token out may answer a stop with no position."""
        texts, tops, own = completion_positions(body, empty_ok=True)
        return Continuation(
            tuple(self._token_id(t) for t in texts),
            tuple(self._top(entries, k) for entries in tops),
            tuple(own),
            server_usage(body),
        )

    async def explain(self, exc: APIStatusError, prompt: Prompt, k: int) -> ProxyClientError:
        """A retired completion model or a refusal of logprobs, with what to do; else the
        shared explanations."""
        return openai_explanation(exc, self.name) or await super().explain(exc, prompt, k)
