"""llama.cpp server's native ``/completion``: token-array prompts, ``n_probs``, ids in answers.

Its OpenAI-style endpoints are the weaker surface (seen on llama-cpp-python's server 0.3.36):
``/v1/completions`` refuses token-id prompts (HTTP 500), echo puts prompt logprobs on the wrong
positions, and chat top_logprobs carry null ``bytes``. ``post_sampling_probs: false`` (the default)
makes the returned logprobs the model's own distribution rather than what the sampler chain left.

llama-server leaves the probabilities out when the one token it sampled is an incomplete UTF-8
character (it holds such text back), so an answer without them is asked again with another seed.
"""

from __future__ import annotations

from typing import Any

from proxyclient.adapters.base import Capabilities, Prompt, TopLogprobs
from proxyclient.adapters.dialect import DialectAdapter
from proxyclient.adapters.http import HTTPTransport
from proxyclient.errors import ResponseFormatError
from proxyclient.tokenizer import BaseTokenizer

RESAMPLE_ATTEMPTS = 8


class _HeldBack(Exception):
    """The server sampled an incomplete UTF-8 character and sent no probabilities."""


class LlamaCppCompletion(DialectAdapter):
    """A base model served by llama-server. ``tokenizer`` is optional: answers name tokens by id."""

    dialect = "llamacpp"

    def __init__(
        self,
        transport: HTTPTransport,
        model: str,
        *,
        tokenizer: BaseTokenizer | None = None,
        max_k: int | None = None,
    ) -> None:
        super().__init__(transport, model, tokenizer=tokenizer)
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

    async def top_logprobs(self, prompt: Prompt, k: int) -> TopLogprobs:
        path, payload = self.build_request(prompt, k)
        for seed in range(RESAMPLE_ATTEMPTS):
            try:
                return await self.send(path, payload | {"seed": seed}, prompt, k)
            except _HeldBack:
                continue
        raise ResponseFormatError(
            f"llama-server sent no probabilities {RESAMPLE_ATTEMPTS} times: each time the token "
            f"it sampled was an incomplete UTF-8 character"
        )

    def parse_response(self, body: Any, prompt: Prompt, k: int) -> TopLogprobs:
        held_back = isinstance(body, dict) and not body.get("completion_probabilities")
        if held_back and "\ufffd" in str(body.get("content", "")):
            raise _HeldBack
        try:
            top = body["completion_probabilities"][0]["top_logprobs"]
        except (KeyError, IndexError, TypeError):
            raise ResponseFormatError(
                "the answer has no completion_probabilities[0].top_logprobs; is this llama.cpp's "
                "own server (llama-server) with n_probs support? (--api llamacpp)"
            ) from None
        return TopLogprobs.from_pairs(((e.get("id"), e.get("logprob")) for e in top), k=k)
