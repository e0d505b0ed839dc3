"""``/v1/chat/completions`` with ``logprobs: true, top_logprobs: k`` (OpenAI: k <= 20).

Each top-logprob entry carries the token's ``bytes``, exact on OpenAI; vLLM sends the bytes of
U+FFFD for a token that is not valid UTF-8 alone, so such entries count as unresolved.
A plain chat API cannot continue a partial assistant message: it scores only the first token of
the answer, so this adapter supports one step (``multi_step=False``), which is what
``ProxyTuner.choose`` needs. Servers that can continue (vLLM: ``continue_final_message``) get
token-by-token generation with ``continue_final_message=True``.

A chat prompt goes as its messages, system, user and assistant turns as given
(https://platform.openai.com/docs/api-reference/chat/create); a text prompt as one user turn.
The answer so far (a chat prompt's response prefix, then the generated tokens' text) is a
trailing assistant message sent with vLLM's ``continue_final_message: true,
add_generation_prompt: false`` (the chat API's extra parameters,
https://docs.vllm.ai/en/latest/serving/openai_compatible_server.html), which only a server that
continues can take: a response prefix without ``continue_final_message=True`` is refused.

OpenAI's reasoning models refuse logprobs (o-series always; gpt-5.x while they reason:
``reasoning_effort="none"`` is sent where given): the 400/403 says so with the fix. Azure OpenAI
deployments answer at most 5 top logprobs where 20 are asked, without an error: the first answer
with fewer entries than asked (where the vocabulary has more) lowers ``max_k`` to what came back,
with a warning (``DialectAdapter.note_top_size``); ``inspect`` asks at 20 to find it.

Streamed drafts, where the server continues (``continue_final_message=True``): the same request
with ``stream: true`` answers chat completion chunks as server-sent events ending with
``data: [DONE]``, each with ``choices[0].logprobs.content`` for its new tokens
(https://platform.openai.com/docs/api-reference/chat-streaming; vLLM's chat streams alike and
aborts a request whose client disconnects). The usage chunk (``stream_options``) is not asked
for: it comes last, after a stream that is usually closed early, so the tokens received are what
is counted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any, Unpack

from proxyclient.adapters.base import (
    Capabilities,
    Continuation,
    Prompt,
    StreamedPosition,
    TopLogprobs,
)
from proxyclient.adapters.dialect import DialectAdapter, DialectOptions
from proxyclient.adapters.discovery import HUGE_K
from proxyclient.adapters.http import HTTPTransport
from proxyclient.adapters.openai_wire import (
    CHAT_PATH,
    chat_body,
    chat_conversation,
    chat_logprobs_content,
    chat_token_id,
    chat_top,
    openai_explanation,
    sampling,
    server_usage,
    stream_positions,
)
from proxyclient.errors import APIStatusError, ConfigError, ProxyClientError, ResponseFormatError
from proxyclient.tokenizer import BaseTokenizer, tiktoken_spec_for_model

OPENAI_MAX_TOP_LOGPROBS = 20


class OpenAIChat(DialectAdapter):
    dialect = "openai-chat"
    default_base_url = "https://api.openai.com/v1"
    api_key_env = "OPENAI_API_KEY"
    needs_tokenizer = True
    # vLLM serves chat; so does any OpenAI-style host, which sniff_dialect calls "openai".
    also_served_by = frozenset({"vllm", "openai"})
    # After the absurd k (whose refusal names the cap), the documented cap itself: a server
    # that answers fewer entries there caps k silently (Azure OpenAI: 5).
    probe_ks = (HUGE_K, OPENAI_MAX_TOP_LOGPROBS)
    tokenizer: BaseTokenizer

    # multi_step, drafts and streams: only with continue_final_message (see __init__).
    default_capabilities = Capabilities(
        max_k=OPENAI_MAX_TOP_LOGPROBS,
        token_id_prompts=False,
        ids_in_response=False,
        prompt_scoring=False,
        logprobs="raw",
        multi_step=False,
        drafts=False,
    )

    def __init__(
        self,
        transport: HTTPTransport,
        model: str,
        *,
        continue_final_message: bool = False,
        reasoning_effort: str | None = None,
        **options: Unpack[DialectOptions],
    ) -> None:
        super().__init__(transport, model, **options)
        self.continue_final_message = continue_final_message
        self.reasoning_effort = reasoning_effort  # sent where given ("none": gpt-5.x, no reasoning)
        self.capabilities = dataclasses.replace(
            self.capabilities,
            multi_step=continue_final_message,
            drafts=continue_final_message,  # a draft after the first step continues the answer
            streams=continue_final_message,
        )

    @classmethod
    def default_tokenizer(cls, model: str) -> str | None:
        """OpenAI's model names imply their tiktoken encoding."""
        return tiktoken_spec_for_model(model)

    def build_request(self, prompt: Prompt, k: int) -> tuple[str, dict[str, Any]]:
        messages, answer = chat_conversation(prompt, self.tokenizer.decode)
        payload = chat_body(self.name, messages, k)
        if self.reasoning_effort is not None:
            payload["reasoning_effort"] = self.reasoning_effort
        if answer is not None:
            if not prompt.generated and not self.continue_final_message:
                raise ConfigError(
                    f"response_prefix {prompt.response_prefix!r} starts the answer, and a plain "
                    f"chat API starts a new one after it: connect with continue_final_message="
                    f"True (a vLLM server), or leave response_prefix out"
                )
            messages.append({"role": "assistant", "content": answer})
            payload |= {"continue_final_message": True, "add_generation_prompt": False}
        return CHAT_PATH, payload

    def build_generate(
        self, prompt: Prompt, k: int, n: int, *, greedy: bool, seed: int | None
    ) -> tuple[str, dict[str, Any]]:
        """Up to ``n`` tokens of the answer, greedy (temperature 0) or sampled from the raw
        distribution; the logprobs are the raw model's either way."""
        path, payload = self.build_request(prompt, k)
        return path, payload | sampling(n, greedy=greedy, seed=seed)

    def stream_draft(
        self, prompt: Prompt, k: int, n: int, *, greedy: bool, seed: int | None = None
    ) -> AsyncIterator[StreamedPosition]:
        """``generate``'s positions from one streamed request, each as its chunk arrives."""
        path, payload = self.build_generate(prompt, k, n, greedy=greedy, seed=seed)
        parse = lambda chunk: self.parse_generate(chunk, prompt, k)  # noqa: E731
        return stream_positions(self, path, payload | {"stream": True}, prompt, k, n, parse)

    @staticmethod
    def _no_logprobs() -> ResponseFormatError:
        return ResponseFormatError(
            "the chat answer has no logprobs.content[0].top_logprobs; does this model allow "
            "logprobs (OpenAI's reasoning models do not)?"
        )

    def parse_response(self, body: Any, prompt: Prompt, k: int) -> TopLogprobs:
        content = chat_logprobs_content(body)
        if not content or not content[0].get("top_logprobs"):
            raise self._no_logprobs()
        self.note_top_size(len(content[0]["top_logprobs"]), k)
        return chat_top(self.tokenizer, content[0], k)

    def parse_generate(self, body: Any, prompt: Prompt, k: int) -> Continuation:
        """Every generated position: the token, its logprob, the top-k before it. The final stop
        token is left out (OpenAI's shape), so a stop leaves fewer positions, maybe none."""
        content = chat_logprobs_content(body)
        if content is None or (content and not content[0].get("top_logprobs")):
            raise self._no_logprobs()
        if content:
            self.note_top_size(len(content[0]["top_logprobs"]), k)
        return Continuation(
            tuple(chat_token_id(self.tokenizer, position) for position in content),
            tuple(chat_top(self.tokenizer, position, k) for position in content),
            tuple(position.get("logprob") for position in content),
            server_usage(body),
        )

    async def explain(self, exc: APIStatusError, prompt: Prompt, k: int) -> ProxyClientError:
        """A model that refuses logprobs (OpenAI's reasoning models), with the fix; else the
        shared explanations."""
        return openai_explanation(exc, self.name) or await super().explain(exc, prompt, k)
