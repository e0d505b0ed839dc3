"""vLLM's OpenAI-compatible ``/v1/completions``, prompted with token ids.

We ask for one token at temperature 1 with no top_p, so the returned top logprobs are the model's
own distribution (vLLM's default ``--logprobs-mode raw_logprobs``), and for token ids in the answer
(``return_tokens_as_token_ids``): string keys collapse tokens that decode alike.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from proxyclient.adapters.base import Capabilities, TopLogprobs
from proxyclient.adapters.http import HTTPTransport
from proxyclient.errors import (
    BadRequestError,
    ContextLengthError,
    NotFoundError,
    ProxyClientError,
    ResponseFormatError,
    TopKTooLargeError,
)

COMPLETIONS_PATH = "/completions"
_TOKEN_ID_KEY = re.compile(r"^token_id:(-?\d+)$")
_MAX_ALLOWED = re.compile(r"max(?:imum)? allowed:?\s*(-?\d+)", re.IGNORECASE)
# The last alternative is what vLLM 0.32 says when the prompt fills the context exactly: it
# shrinks max_tokens to the room left, which is 0.
_CONTEXT = re.compile(
    r"context length|max_model_len|maximum model length|max_tokens must be at least 1, got 0",
    re.IGNORECASE,
)


def build_request(model: str, prompt_ids: Sequence[int], k: int) -> tuple[str, dict[str, Any]]:
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
    try:
        logprobs = body["choices"][0]["logprobs"]
    except (KeyError, IndexError, TypeError):
        raise ResponseFormatError(
            f"the answer has no choices[0].logprobs: {str(body)[:200]!r}"
        ) from None
    top = (logprobs or {}).get("top_logprobs") or []
    if not top or not top[0]:
        raise ResponseFormatError(
            "the server returned no top logprobs; does it support the `logprobs` parameter "
            "of /v1/completions? (vLLM does; for other servers pick their --api)"
        )
    pairs = []
    for key, logprob in top[0].items():
        match = _TOKEN_ID_KEY.match(key)
        if match is None:
            raise ResponseFormatError(
                f"top logprobs are keyed by token text ({key!r}), not 'token_id:N': the server "
                f"ignored return_tokens_as_token_ids, so it is probably not vLLM. "
                f"Use the adapter of its dialect (e.g. --api openai)."
            )
        pairs.append((int(match.group(1)), logprob))
    top_logprobs = TopLogprobs.from_pairs(pairs, complete=k == -1)
    # vLLM adds the sampled token when it is outside the top k: a random extra candidate.
    return top_logprobs.first(k) if k > 0 else top_logprobs


class VLLMCompletions:
    """A base model served by vLLM."""

    def __init__(self, transport: HTTPTransport, model: str, *, max_k: int | None = None) -> None:
        self.transport = transport
        self.name = model
        self.capabilities = Capabilities(
            max_k=max_k,
            token_id_prompts=True,
            ids_in_response=True,
            prompt_scoring=True,
            logprobs="raw",
        )

    def __repr__(self) -> str:
        return f"VLLMCompletions(model={self.name!r}, transport={self.transport!r})"

    async def top_logprobs(self, prompt_ids: Sequence[int], k: int) -> TopLogprobs:
        path, payload = build_request(self.name, prompt_ids, k)
        what = f"model {self.name!r}, {len(prompt_ids)} prompt tokens, logprobs={k}"
        try:
            body = await self.transport.request_json("POST", path, payload, what=what)
        except BadRequestError as exc:
            raise self._refine(exc, k, len(prompt_ids)) from None
        except NotFoundError as exc:
            raise NotFoundError(
                f"{exc} — {await self._served_models_hint()}",
                status_code=exc.status_code,
                body=exc.body,
            ) from None
        return parse_response(body, k=k)

    def _refine(self, exc: BadRequestError, k: int, n_prompt: int) -> ProxyClientError:
        text = str(exc)
        if "logprobs" in text.lower() and (match := _MAX_ALLOWED.search(text)):
            server_max = int(match.group(1))
            fix = (
                f"pass --top-logprobs {server_max} (top_logprobs={server_max}) or less"
                if server_max > 0
                else "pass a smaller --top-logprobs"
            )
            return TopKTooLargeError(
                f"{text}\nThe server allows at most {server_max} top logprobs and {k} were asked "
                f"for: {fix}, or restart vLLM with a larger --max-logprobs "
                f"(-1 allows the whole vocabulary).",
                status_code=exc.status_code,
                body=exc.body,
                server_max=server_max,
            )
        if _CONTEXT.search(text):
            return ContextLengthError(
                f"{text}\nThe prompt plus the tokens generated so far ({n_prompt} tokens) no "
                f"longer fit the server's context window: shorten the prompt or lower "
                f"max_new_tokens.",
                status_code=exc.status_code,
                body=exc.body,
            )
        return exc

    async def _served_models_hint(self) -> str:
        try:
            body = await self.transport.request_json("GET", "/models", what="list models")
            names = [m["id"] for m in body.get("data", [])]
        except (ProxyClientError, KeyError, TypeError, AttributeError):
            return "check --base-model (GET /v1/models lists what the server serves)."
        return f"the server serves {names}; pass one of them as --base-model."

    async def aclose(self) -> None:
        await self.transport.aclose()
