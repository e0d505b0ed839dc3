"""vLLM's OpenAI-compatible ``/v1/completions``, prompted with token ids.

We ask for one token at temperature 1 with no top_p, so the returned top logprobs are the model's
own distribution (vLLM's default ``--logprobs-mode raw_logprobs``), and for token ids in the answer
(``return_tokens_as_token_ids``): string keys collapse tokens that decode alike. Streamed drafts
(``stream: true``) arrive as completion chunks, each with its new tokens' ``logprobs`` in the
answer's shape; vLLM aborts a request whose client disconnects, so closing the stream stops the
generation.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from typing import Any

from proxyclient.adapters.base import (
    Capabilities,
    Continuation,
    Prompt,
    StreamedPosition,
    TopLogprobs,
)
from proxyclient.adapters.dialect import NO_POSITIONS, DialectAdapter
from proxyclient.adapters.discovery import HUGE_K
from proxyclient.adapters.openai_wire import (
    COMPLETIONS_PATH,
    completion_positions,
    completion_top_logprobs,
    completions_body,
    sampling,
    server_usage,
)
from proxyclient.errors import ProxyClientError, ResponseFormatError

_TOKEN_ID_KEY = re.compile(r"token_id:(-?\d+)", re.ASCII)


def _token_id(key: str) -> int:
    digits = key[9:]
    if key.startswith("token_id:") and digits.isascii() and digits.isdigit():
        return int(digits)  # the usual key, read without the regular expression (per candidate)
    match = _TOKEN_ID_KEY.fullmatch(key)
    if match is None:
        raise ResponseFormatError(
            f"top logprobs are keyed by token text ({key!r}), not 'token_id:N': the server "
            f"ignored return_tokens_as_token_ids, so it is probably not vLLM. "
            f"Use the adapter of its dialect (e.g. --api openai)."
        )
    return int(match.group(1))


_TOKEN_ID_KEYS = re.compile(r"token_id:\d+(?:\ntoken_id:\d+)*", re.ASCII)


def _top(entries: dict[str, Any], k: int) -> TopLogprobs:
    # vLLM adds the sampled token when it is outside the top k: a random extra candidate.
    keys = "\n".join(entries)
    if _TOKEN_ID_KEYS.fullmatch(keys):  # every key as vLLM writes it: checked in one pass
        ids = [int(key[9:]) for key in entries]
    else:
        ids = [_token_id(key) for key in entries]
    return TopLogprobs.from_columns(ids, list(entries.values()), k=k, complete=k == -1)


class VLLMCompletions(DialectAdapter):
    """A base model served by vLLM. ``tokenizer`` is optional: answers name tokens by id."""

    dialect = "vllm"
    probe_ks = (-1, HUGE_K)  # --max-logprobs -1 allows the whole vocabulary
    raise_k_cap = "restart vLLM with a larger --max-logprobs (-1 allows the whole vocabulary)"

    default_capabilities = Capabilities(
        max_k=None,
        token_id_prompts=True,
        ids_in_response=True,
        prompt_scoring=True,
        logprobs="raw",
        drafts=True,
        streams=True,
    )

    def build_request(self, prompt: Prompt, k: int) -> tuple[str, dict[str, Any]]:
        """The top-k logprobs of the token after the prompt's ids, named by id."""
        body = completions_body(self.name, list(prompt.ids), k)
        return COMPLETIONS_PATH, body | {"return_tokens_as_token_ids": True}

    def build_generate(
        self, prompt: Prompt, k: int, n: int, *, greedy: bool, seed: int | None
    ) -> tuple[str, dict[str, Any]]:
        """Up to ``n`` tokens, greedy or sampled from the raw distribution, top-k at each. The
        logprobs are the raw model's either way (``--logprobs-mode raw_logprobs``)."""
        path, payload = self.build_request(prompt, k)
        return path, payload | sampling(n, greedy=greedy, seed=seed)

    def build_score(
        self, prompt: Prompt, continuation: Sequence[int], k: int
    ) -> tuple[str, dict[str, Any]]:
        """The top-k at every position of ``continuation`` (``prompt_logprobs``) and after it."""
        path, payload = self.build_request(Prompt((*prompt.ids, *continuation), 0), k)
        return path, payload | {"prompt_logprobs": k}

    def parse_response(self, body: Any, prompt: Prompt, k: int) -> TopLogprobs:
        """The first generated position's top logprobs from a completions answer."""
        return _top(completion_top_logprobs(body), k)

    def parse_generate(self, body: Any, prompt: Prompt, k: int) -> Continuation:
        """Every generated position: the token, its logprob, and the top-k before it."""
        tokens, tops, own = completion_positions(body)
        return Continuation(
            tuple(_token_id(t) for t in tokens),
            tuple(_top(entries, k) for entries in tops),
            tuple(own),
            server_usage(body),
        )

    def parse_score(
        self, body: Any, prompt: Prompt, continuation: Sequence[int], k: int
    ) -> Continuation:
        """The top-k before each continuation token (from ``prompt_logprobs``: each position's
        best entries, ranked, plus the prompt token itself, which is kept only where it ranks
        within k) and before the token the server generated after them."""
        after = self.parse_generate(body, prompt, k)
        scored = body["choices"][0].get("prompt_logprobs") or []
        if len(scored) < len(continuation) or not after.tops:
            raise ResponseFormatError(
                f"asked for the logprobs of a {len(continuation)}-token continuation and got "
                f"{len(scored)} prompt positions: does this vLLM support prompt_logprobs?"
            )
        tops, token_logprobs = [], []
        tail = scored[len(scored) - len(continuation) :]
        for token, entries in zip(continuation, tail, strict=True):
            entries = entries or {}
            ranked = {
                int(i): e["logprob"]
                for i, e in entries.items()
                if k == -1 or e.get("rank", k + 1) <= k
            }
            tops.append(TopLogprobs.from_pairs(ranked.items(), k=k, complete=k == -1))
            own = entries.get(str(token))
            token_logprobs.append(own["logprob"] if own else None)
        return Continuation(
            (*continuation, after.tokens[0]),
            (*tops, after.tops[0]),
            (*token_logprobs, after.token_logprobs[0]),
            after.usage,
        )

    def stream_draft(
        self, prompt: Prompt, k: int, n: int, *, greedy: bool, seed: int | None = None
    ) -> AsyncIterator[StreamedPosition]:
        """``generate``'s positions from one streamed request, each as its chunk arrives."""
        path, payload = self.build_generate(prompt, k, n, greedy=greedy, seed=seed)

        def parse(chunk: Any, _seen: int) -> Continuation:
            # The finish chunk, or one with text held back, has no positions.
            if not _has_positions(chunk):
                return NO_POSITIONS
            return self.parse_generate(chunk, prompt, k)

        return self.stream_positions(path, payload | {"stream": True}, prompt, k, n, parse)

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


def _has_positions(chunk: Any) -> bool:
    try:
        return bool(chunk["choices"][0]["logprobs"]["tokens"])
    except (KeyError, IndexError, TypeError):
        return False
