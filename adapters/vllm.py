"""vLLM's OpenAI-compatible ``/v1/completions``, prompted with token ids.

We ask for one token at temperature 1 with no top_p, so the returned top logprobs are the model's
own distribution (vLLM's default ``--logprobs-mode raw_logprobs``), and for token ids in the answer
(``return_tokens_as_token_ids``): string keys collapse tokens that decode alike.
"""

from __future__ import annotations

import re
from typing import Any

from proxyclient.adapters.base import Capabilities, Prompt, TopLogprobs
from proxyclient.adapters.dialect import DialectAdapter, completion_top_logprobs
from proxyclient.adapters.discovery import HUGE_K
from proxyclient.adapters.http import HTTPTransport
from proxyclient.errors import ProxyClientError, ResponseFormatError
from proxyclient.tokenizer import BaseTokenizer

COMPLETIONS_PATH = "/completions"
_TOKEN_ID_KEY = re.compile(r"^token_id:(-?\d+)$")


def build_request(model: str, prompt_ids: list[int], k: int) -> tuple[str, dict[str, Any]]:
    """Path and JSON body asking for the top-k logprobs of the token after ``prompt_ids``."""
    return COMPLETIONS_PATH, {
        "model": model,
        "prompt": list(prompt_ids),
        "max_tokens": 1,
        "temperature": 1.0,
        "logprobs": k,
        "return_tokens_as_token_ids": True,
    }


def parse_response(body: Any, *, k: int) -> TopLogprobs:
    """The first generated position's top logprobs from a completions answer."""
    pairs = []
    for key, logprob in completion_top_logprobs(body).items():
        match = _TOKEN_ID_KEY.match(key)
        if match is None:
            raise ResponseFormatError(
                f"top logprobs are keyed by token text ({key!r}), not 'token_id:N': the server "
                f"ignored return_tokens_as_token_ids, so it is probably not vLLM. "
                f"Use the adapter of its dialect (e.g. --api openai)."
            )
        pairs.append((int(match.group(1)), logprob))
    # vLLM adds the sampled token when it is outside the top k: a random extra candidate.
    return TopLogprobs.from_pairs(pairs, k=k, complete=k == -1)


class VLLMCompletions(DialectAdapter):
    """A base model served by vLLM. ``tokenizer`` is optional: answers name tokens by id."""

    dialect = "vllm"
    probe_ks = (-1, HUGE_K)  # --max-logprobs -1 allows the whole vocabulary
    raise_k_cap = "restart vLLM with a larger --max-logprobs (-1 allows the whole vocabulary)"

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
            prompt_scoring=True,
            logprobs="raw",
        )

    def build_request(self, prompt: Prompt, k: int) -> tuple[str, dict[str, Any]]:
        return build_request(self.name, list(prompt.ids), k)

    def parse_response(self, body: Any, prompt: Prompt, k: int) -> TopLogprobs:
        return parse_response(body, k=k)

    async def tokenize(self, text: str) -> list[int] | None:
        """The server's own token ids for ``text`` (vLLM's /tokenize), or None if unavailable."""
        url = self.transport.base_url.removesuffix("/v1") + "/tokenize"
        try:
            body = await self.transport.request_json(
                "POST", url, {"model": self.name, "prompt": text}, what="tokenize the prompt"
            )
            return list(body["tokens"])
        except (ProxyClientError, KeyError, TypeError):
            return None
