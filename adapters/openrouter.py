"""OpenRouter: one key, many upstream providers, in OpenAI's chat shape
(``POST https://openrouter.ai/api/v1/chat/completions``, ``logprobs: true, top_logprobs: k``).

Sources, read 2026-12-03: OpenRouter's Python SDK ``openrouter`` 1.3.84, generated from its API
schema (``components/chatrequest.py``: ``logprobs`` "Return log probabilities", ``top_logprobs``
"Number of top log probabilities to return (0-20)", ``provider``: routing preferences;
``components/providerpreferences.py``: ``require_parameters`` "Whether to filter providers to only
those that support the parameters you've provided. If this setting is omitted or set to false,
then providers will receive only the parameters they support, and ignore the rest.";
``components/chattokenlogprob.py``: ``top_logprobs[]`` of ``token``, ``logprob`` and ``bytes``,
which may be null; ``components/model.py``: each model of ``GET /models`` lists its
``supported_parameters``; ``sdkconfiguration.py``: ``https://openrouter.ai/api/v1``).

So this is OpenAI's chat shape (``openai_wire``) with OpenRouter's endpoint and key, and every
request asks for ``provider.require_parameters: true``: without it an upstream that has no logprobs
would get the request without them and answer anyway. Logprobs then come from whichever upstream
serves the model, where it has them; a model none of whose upstreams does is refused, and the error
says which models list ``top_logprobs`` among their ``supported_parameters``. One step only, as on
any plain chat API (``ProxyTuner.choose``): OpenRouter does not document that a trailing assistant
message is continued by every upstream. Tokens are named by their ``bytes`` (else their text),
mapped to ids with the base tokenizer given. ``connect("openrouter", ..., app_url=...,
app_title=...)`` sends OpenRouter's optional app attribution headers (``HTTP-Referer``,
``X-OpenRouter-Title``) with every request.
"""

from __future__ import annotations

from typing import Any

from proxyclient.adapters.base import Capabilities, Prompt, TopLogprobs
from proxyclient.adapters.dialect import DialectAdapter
from proxyclient.adapters.openai_wire import (
    CHAT_PATH,
    chat_body,
    chat_conversation,
    chat_logprobs_content,
    chat_top,
)
from proxyclient.errors import (
    APIStatusError,
    ConfigError,
    NotFoundError,
    ProxyClientError,
    ResponseFormatError,
)
from proxyclient.tokenizer import BaseTokenizer, tiktoken_spec_for_model

OPENROUTER_MAX_TOP_LOGPROBS = 20  # "(0-20)"


class OpenRouterChat(DialectAdapter):
    dialect = "openrouter"
    default_base_url = "https://openrouter.ai/api/v1"
    api_key_env = "OPENROUTER_API_KEY"
    needs_tokenizer = True
    also_served_by = frozenset({"openai"})
    tokenizer: BaseTokenizer

    default_capabilities = Capabilities(
        max_k=OPENROUTER_MAX_TOP_LOGPROBS,
        token_id_prompts=False,
        ids_in_response=False,
        prompt_scoring=False,
        logprobs="raw",  # OpenAI's shape, sent at temperature 1: as the upstream gives them
        multi_step=False,
        drafts=False,
    )

    @classmethod
    def extra_headers(cls, options: dict[str, Any]) -> dict[str, str]:
        """OpenRouter's optional app attribution, taken out of ``connect``'s ``options``:
        ``app_url`` as ``HTTP-Referer``, ``app_title`` as ``X-OpenRouter-Title``."""
        headers = {}
        for option, header in (("app_url", "HTTP-Referer"), ("app_title", "X-OpenRouter-Title")):
            value = options.pop(option, None)
            if value is None:
                continue
            if not isinstance(value, str) or not value.isascii() or not value.isprintable():
                raise ConfigError(f"{option} must be printable ASCII text, got {value!r}")
            headers[header] = value
        return headers

    @classmethod
    def default_tokenizer(cls, model: str) -> str | None:
        """``openai/gpt-4o``-style names imply OpenAI's tiktoken encoding."""
        return tiktoken_spec_for_model(model.removeprefix("openai/"))

    def build_request(self, prompt: Prompt, k: int) -> tuple[str, dict[str, Any]]:
        messages, answer = chat_conversation(prompt, self.tokenizer.decode)
        if answer is not None:
            raise ConfigError(
                "OpenRouter's chat API scores only the first token of a new answer: use "
                "ProxyTuner.choose() (proxyclient choose) or max_new_tokens=1, and leave "
                "response_prefix out"
            )
        payload = chat_body(self.name, messages, k)
        return CHAT_PATH, payload | {"provider": {"require_parameters": True}}

    def parse_response(self, body: Any, prompt: Prompt, k: int) -> TopLogprobs:
        content = chat_logprobs_content(body)
        if not content or not content[0].get("top_logprobs"):
            raise ResponseFormatError(
                f"the OpenRouter answer has no logprobs.content[0].top_logprobs; does an "
                f"upstream of {self.name!r} give logprobs? (its supported_parameters say)"
            )
        self.note_top_size(len(content[0]["top_logprobs"]), k)
        return chat_top(self.tokenizer, content[0], k)

    async def explain(self, exc: APIStatusError, prompt: Prompt, k: int) -> ProxyClientError:
        """A model no upstream of which gives logprobs, with where to find one that does."""
        if isinstance(exc, NotFoundError) and "endpoint" in str(exc).lower():
            return NotFoundError(
                f"{exc} — no upstream that serves {self.name!r} on OpenRouter takes "
                f"logprobs/top_logprobs (requests ask for provider.require_parameters): pick a "
                f"model whose supported_parameters (GET {self.transport.base_url}/models) "
                f"include top_logprobs.",
                status_code=exc.status_code,
                body=exc.body,
            )
        return await super().explain(exc, prompt, k)
