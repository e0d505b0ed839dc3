"""DeepSeek's chat prefix completion (beta): ``POST {base}/chat/completions`` with
``logprobs: true, top_logprobs: k`` (k <= 20), the answer so far as a last message
``{"role": "assistant", "content": ..., "prefix": true}``, which the model continues.

Sources, read 2026-11-30: https://api-docs.deepseek.com/guides/chat_prefix_completion (the last
message is the assistant's with ``prefix`` true; base URL ``https://api.deepseek.com/beta``),
https://api-docs.deepseek.com/api/create-chat-completion (``top_logprobs`` "between 0 and 20";
answers in OpenAI's chat shape, ``bytes`` with each token; ``usage.prompt_cache_hit_tokens``),
https://api-docs.deepseek.com/guides/thinking_mode (current models think by default;
``thinking: {"type": "disabled"}`` turns it off) and
https://api-docs.deepseek.com/guides/reasoning_model (deepseek-reasoner: "Setting logprobs,
top_logprobs will trigger an error").

Every step sends the prompt (a chat prompt's messages, system, user and assistant turns as given;
a text prompt as one user message) and the answer so far (a chat prompt's response prefix, then
the tokens generated) as the assistant's prefix, so generation is multi-step, and one request can
draft several tokens with the top-k at each (``drafts``; greedy is temperature 0; DeepSeek takes
no seed, so a sampled draft is not reproducible). Tokens come back with their ``bytes``, mapped
to ids with the base tokenizer given (DeepSeek's is on Hugging Face). Thinking is turned off
(``thinking="disabled"``), since a model that thinks gives no logprobs for the token after the
prefix: deepseek-reasoner, a refusal that names its parameter, or an answer with
``reasoning_content`` is an error that says to use deepseek-chat. DeepSeek has been seen to answer
top logprobs that carry no information (only 0 and -9999): such an answer is an error (retried,
like any broken answer), never steered on.

Streamed drafts: the same request with ``stream: true`` (the create-chat-completion page:
"partial message deltas will be sent", as data-only server-sent events ending with ``data:
[DONE]``) answers chat completion chunks, each with ``choices[0].logprobs.content`` for its new
tokens and ``choices[0].delta`` for the text (``delta.reasoning_content`` while a model thinks:
the same error as a thinking answer). ``stream_options.include_usage`` is not asked for: its
usage chunk comes last, after a stream that is usually closed early, so the tokens received are
what is counted.

Not used: the beta FIM ``/completions`` (``echo``, ``logprobs`` <= 20), which could score a given
continuation (``prompt_scoring``). It conditions on the raw text, not on the chat conversation
that prefix completion conditions on, so its numbers are those of another context than the
steps'; its top logprobs are keyed by token text (OpenAI's legacy shape), which loses partial
characters and tokens that read alike; and the docs do not say that ``echo`` returns logprobs for
the prompt's own positions, which scoring needs.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any, Unpack

from proxyclient.adapters.base import (
    SENTINEL_LOGPROB,
    Capabilities,
    Continuation,
    Prompt,
    StreamedPosition,
    TopLogprobs,
)
from proxyclient.adapters.dialect import DialectAdapter, DialectOptions
from proxyclient.adapters.http import HTTPTransport
from proxyclient.adapters.openai_wire import (
    CHAT_PATH,
    chat_body,
    chat_conversation,
    chat_logprobs_content,
    chat_token_id,
    chat_top,
    content_positions_in,
    sampling,
    server_usage,
    stream_positions,
)
from proxyclient.errors import (
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    BaseModelError,
    NotFoundError,
    ProxyClientError,
    ResponseFormatError,
    TopKTooLargeError,
)
from proxyclient.tokenizer import BaseTokenizer

DEEPSEEK_MAX_TOP_LOGPROBS = 20

# "deepseek-reasoner does not support the parameter `presence_penalty`" is DeepSeek's recorded
# wording for a parameter a thinking model refuses.
_THINKING_REFUSAL = re.compile(r"does not support the parameter `?(?:top_)?logprobs", re.I)
# As DeepSeek words ranges: "Invalid max_tokens value, the valid range of max_tokens is [1, 8192]".
_K_RANGE = re.compile(r"valid range of top_logprobs is \[\s*-?\d+\s*,\s*(\d+)\s*\]", re.I)
_NO_MODEL = re.compile(r"Model Not Exist", re.IGNORECASE)


def degenerate(entries: list[dict[str, Any]]) -> bool:
    """Whether one position's top logprobs say nothing: two or more entries, each 0 or at the
    -9999 floor. No distribution gives two tokens probability 1, and a model's softmax leaves its
    runners-up far above the floor."""
    logprobs = [e.get("logprob") for e in entries]
    return len(logprobs) >= 2 and all(
        isinstance(lp, int | float) and (lp == 0 or lp <= SENTINEL_LOGPROB) for lp in logprobs
    )


class DeepSeekChat(DialectAdapter):
    dialect = "deepseek"
    default_base_url = "https://api.deepseek.com/beta"
    api_key_env = "DEEPSEEK_API_KEY"
    needs_tokenizer = True
    tokenizer: BaseTokenizer

    default_capabilities = Capabilities(
        max_k=DEEPSEEK_MAX_TOP_LOGPROBS,
        token_id_prompts=False,
        ids_in_response=False,
        prompt_scoring=False,  # see the module's docstring: FIM scores another context
        logprobs="processed",  # not documented either way; we send temperature 1
        multi_step=True,
        drafts=True,
        streams=True,
    )

    def __init__(
        self,
        transport: HTTPTransport,
        model: str,
        *,
        thinking: str | None = "disabled",
        **options: Unpack[DialectOptions],
    ) -> None:
        super().__init__(transport, model, **options)
        self.thinking = thinking  # sent as {"thinking": {"type": thinking}}; None: not sent

    def build_request(self, prompt: Prompt, k: int) -> tuple[str, dict[str, Any]]:
        turns, answer = chat_conversation(prompt, self.tokenizer.decode)
        messages: list[dict[str, Any]] = list(turns)
        if answer is not None:
            messages.append({"role": "assistant", "content": answer, "prefix": True})
        payload = chat_body(self.name, messages, k)
        if self.thinking is not None:
            payload["thinking"] = {"type": self.thinking}
        return CHAT_PATH, payload

    def build_generate(
        self, prompt: Prompt, k: int, n: int, *, greedy: bool, seed: int | None
    ) -> tuple[str, dict[str, Any]]:
        """Up to ``n`` tokens of the answer, greedy (temperature 0) or sampled at temperature 1
        (``seed`` is not sent: DeepSeek takes none)."""
        path, payload = self.build_request(prompt, k)
        return path, payload | sampling(n, greedy=greedy, seed=None)

    def stream_draft(
        self, prompt: Prompt, k: int, n: int, *, greedy: bool, seed: int | None = None
    ) -> AsyncIterator[StreamedPosition]:
        """``generate``'s positions from one streamed request, each as its chunk arrives."""
        path, payload = self.build_generate(prompt, k, n, greedy=greedy, seed=seed)
        parse = lambda chunk: self.parse_generate(chunk, prompt, k)  # noqa: E731
        return stream_positions(
            self, path, payload | {"stream": True}, prompt, k, n, parse, _has_positions
        )

    def parse_response(self, body: Any, prompt: Prompt, k: int) -> TopLogprobs:
        content = self._content(body)
        if not content:
            raise ResponseFormatError(
                "the DeepSeek answer ended before its first token, so it holds no logprobs"
            )
        return chat_top(self.tokenizer, content[0], k)

    def parse_generate(self, body: Any, prompt: Prompt, k: int) -> Continuation:
        """Every generated position: the token, its logprob, the top-k before it. The final stop
        token is left out (OpenAI's shape), so a stop leaves fewer positions, maybe none."""
        content = self._content(body)
        return Continuation(
            tuple(chat_token_id(self.tokenizer, position) for position in content),
            tuple(chat_top(self.tokenizer, position, k) for position in content),
            tuple(position.get("logprob") for position in content),
            server_usage(body),
        )

    def _content(self, body: Any) -> list[dict[str, Any]]:
        """``logprobs.content``, checked: no thinking, top logprobs present and informative."""
        try:
            choice = body["choices"][0]
            message = choice.get("message") or choice.get("delta") or {}  # delta: a chunk's
        except (KeyError, IndexError, TypeError, AttributeError):
            message = {}
        if isinstance(message, dict) and message.get("reasoning_content"):
            raise BaseModelError(
                f"DeepSeek model {self.name!r} answered in thinking mode (reasoning_content), "
                f"so its logprobs are not those of the token after the prefix: "
                f"{self._thinking_fix()}"
            )
        content = chat_logprobs_content(body)
        if content is None or (content and not content[0].get("top_logprobs")):
            raise ResponseFormatError(
                f"the DeepSeek answer has no logprobs.content[0].top_logprobs; does model "
                f"{self.name!r} give logprobs? (deepseek-reasoner does not; deepseek-chat does)"
            )
        for position in content:
            entries = position.get("top_logprobs") or []
            if degenerate(entries):
                shown = ", ".join(f"{e.get('token')!r}: {e.get('logprob')}" for e in entries[:4])
                raise ResponseFormatError(
                    f"DeepSeek's top logprobs carry no information (every entry is 0 or -9999: "
                    f"{shown}, ...), and steering on them would steer on noise; DeepSeek has "
                    f"been seen to answer so: try again later, or use another base model"
                )
        return content

    @staticmethod
    def _thinking_fix() -> str:
        return (
            "use deepseek-chat (not deepseek-reasoner), or a model whose thinking can be turned "
            'off (this adapter sends thinking {"type": "disabled"} unless given thinking=...)'
        )

    async def explain(self, exc: APIStatusError, prompt: Prompt, k: int) -> ProxyClientError:
        """DeepSeek's errors (OpenAI's shape, its own wording) with what to do."""
        text = str(exc)
        fields = {"status_code": exc.status_code, "body": exc.body}
        if isinstance(exc, BadRequestError):
            if match := _K_RANGE.search(text):
                cap = int(match.group(1))
                return TopKTooLargeError(
                    f"{text} — DeepSeek gives at most {cap} top logprobs and {k} were asked "
                    f"for: pass base_k={cap} or less.",
                    server_max=cap,
                    **fields,
                )
            if _THINKING_REFUSAL.search(text):
                return BadRequestError(
                    f"{text} — model {self.name!r} thinks before it answers, and DeepSeek gives "
                    f"no logprobs then: {self._thinking_fix()}.",
                    **fields,
                )
            if _NO_MODEL.search(text):
                hint = await self._served_models_hint()
                return NotFoundError(
                    f"{text} — DeepSeek has no model {self.name!r}: {hint}", **fields
                )
        if exc.status_code == 401:
            return AuthenticationError(
                f"{text} — check the API key: pass api_key=..., or set DEEPSEEK_API_KEY to a key "
                f"from https://platform.deepseek.com/api_keys.",
                **fields,
            )
        if exc.status_code == 402:
            return APIStatusError(
                f"{text} — the DeepSeek account has no balance left: top it up at "
                f"https://platform.deepseek.com/top_up.",
                **fields,
            )
        return await super().explain(exc, prompt, k)


def _has_positions(chunk: Any) -> bool:
    """Whether a streamed chunk is to be read: it holds positions, or it thinks (an error)."""
    if content_positions_in(chunk):
        return True
    try:
        return bool((chunk["choices"][0].get("delta") or {}).get("reasoning_content"))
    except (KeyError, IndexError, TypeError, AttributeError):
        return False
