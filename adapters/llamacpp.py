"""llama.cpp server's native ``/completion``: token-array prompts, ``n_probs``, ids in answers.

Its OpenAI-style endpoints are the weaker surface (no token-id prompts, wrong echo logprobs, null
chat bytes; shared/notes/real-servers.md). ``post_sampling_probs: false`` (the default) makes the
returned logprobs the model's own distribution rather than what the sampler chain left.
"""

from __future__ import annotations

from typing import Any

from proxyclient.adapters.base import Capabilities, Prompt, TopLogprobs
from proxyclient.adapters.dialect import DialectAdapter
from proxyclient.adapters.http import HTTPTransport
from proxyclient.errors import ResponseFormatError


class LlamaCppCompletion(DialectAdapter):
    dialect = "llamacpp"

    def __init__(self, transport: HTTPTransport, model: str, *, max_k: int | None = None) -> None:
        super().__init__(transport, model)
        self.capabilities = Capabilities(
            max_k=max_k,
            token_id_prompts=True,
            ids_in_response=True,
            prompt_scoring=False,
            logprobs="raw",
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

    def parse_response(self, body: Any, prompt: Prompt, k: int) -> TopLogprobs:
        try:
            top = body["completion_probabilities"][0]["top_logprobs"]
        except (KeyError, IndexError, TypeError):
            raise ResponseFormatError(
                "the answer has no completion_probabilities[0].top_logprobs; is this llama.cpp's "
                "own server (llama-server) with n_probs support? (--api llamacpp)"
            ) from None
        return TopLogprobs.from_pairs(((e.get("id"), e.get("logprob")) for e in top), k=k)
