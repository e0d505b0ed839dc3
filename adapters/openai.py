"""OpenAI's legacy ``/v1/completions`` (OpenAI itself and the many hosts that copy it).

Top logprobs come back keyed by token *text*, so ids are recovered through the base tokenizer's
byte vocabulary (tiktoken for OpenAI models, a local HF tokenizer for open ones). A token whose
text is not valid UTF-8 alone comes back as ``bytes:\\xNN`` (OpenAI) or as "" / U+FFFD (other
hosts, which loses it); string keys also collapse tokens that decode alike. Such entries are
counted as unresolved, never guessed.
"""

from __future__ import annotations

from typing import Any

from proxyclient.adapters.base import Capabilities, Prompt, TopLogprobs
from proxyclient.adapters.dialect import DialectAdapter, completion_top_logprobs
from proxyclient.adapters.http import HTTPTransport
from proxyclient.tokenizer import BaseTokenizer, tiktoken_spec_for_model
from proxyclient.vocab import bytes_of_token_string

OPENAI_MAX_LOGPROBS = 5


class OpenAICompletions(DialectAdapter):
    dialect = "openai"
    needs_tokenizer = True
    also_served_by = frozenset({"vllm"})
    tokenizer: BaseTokenizer

    def __init__(
        self,
        transport: HTTPTransport,
        model: str,
        *,
        tokenizer: BaseTokenizer,
        max_k: int | None = OPENAI_MAX_LOGPROBS,
        token_id_prompts: bool = True,
    ) -> None:
        super().__init__(transport, model, tokenizer=tokenizer)
        self.capabilities = Capabilities(
            max_k=max_k,
            token_id_prompts=token_id_prompts,
            ids_in_response=False,
            prompt_scoring=False,  # echo + logprobs is refused by OpenAI's current models
            logprobs="raw",
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
        return "/completions", {
            "model": self.name,
            "prompt": sent,
            "max_tokens": 1,
            "temperature": 1.0,
            "logprobs": k,
        }

    def parse_response(self, body: Any, prompt: Prompt, k: int) -> TopLogprobs:
        token_id = self.tokenizer.token_id
        pairs = [
            (token_id(bytes_of_token_string(token)), logprob)
            for token, logprob in completion_top_logprobs(body).items()
        ]
        # OpenAI returns up to k + 1 entries (the sampled token is added); keep the k best.
        return TopLogprobs.from_pairs(pairs, k=k)
