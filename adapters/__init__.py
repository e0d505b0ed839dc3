"""Remote base models. Each dialect is one adapter; ``connect`` builds one by name.

A dialect is an adapter class (a ``DialectAdapter``: its requests, its parsing, and the facts about
its dialect as class attributes) and an entry in ``BUILTIN``; nothing else names dialects.
Third parties add dialects through the entry-point group ``proxyclient.adapters``: a name mapped to
a ``DialectAdapter`` subclass, or to any factory ``(transport, model, *, tokenizer, **options) ->
BaseModel`` (given ``tokenizer`` only when there is one).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from proxyclient.adapters.base import BaseModel, Capabilities, Prompt, TopLogprobs
from proxyclient.adapters.deepseek import DeepSeekChat
from proxyclient.adapters.dialect import DialectAdapter
from proxyclient.adapters.fireworks import FireworksCompletions
from proxyclient.adapters.gemini import GeminiGenerateContent
from proxyclient.adapters.http import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_MAX_RETRY_TIME_S,
    DEFAULT_TIMEOUT,
    HTTPTransport,
    RateLimits,
)
from proxyclient.adapters.llamacpp import LlamaCppCompletion
from proxyclient.adapters.ollama import OllamaGenerate
from proxyclient.adapters.openai import OpenAICompletions
from proxyclient.adapters.openai_chat import OpenAIChat
from proxyclient.adapters.openrouter import OpenRouterChat
from proxyclient.adapters.sglang import SGLangGenerate
from proxyclient.adapters.tgi import TGIGenerate
from proxyclient.adapters.together import TogetherCompletions
from proxyclient.adapters.vllm import VLLMCompletions
from proxyclient.errors import ConfigError
from proxyclient.tokenizer import load_base_tokenizer

__all__ = [
    "BaseModel",
    "Capabilities",
    "DialectAdapter",
    "HTTPTransport",
    "Prompt",
    "RateLimits",
    "TopLogprobs",
    "available",
    "connect",
    "tokenizer_needed",
]

AdapterFactory = Callable[..., BaseModel]

BUILTIN: dict[str, type[DialectAdapter]] = {
    adapter.dialect: adapter
    for adapter in (
        VLLMCompletions,
        OpenAICompletions,
        OpenAIChat,
        TGIGenerate,
        LlamaCppCompletion,
        TogetherCompletions,
        FireworksCompletions,
        SGLangGenerate,
        OllamaGenerate,
        GeminiGenerateContent,
        DeepSeekChat,
        OpenRouterChat,
    )
}

# APIs asked for by name that cannot be a base, and why (read 2026-12-03).
NOT_A_BASE: dict[str, str] = {
    "mistral": (
        "Mistral's chat API (api.mistral.ai/v1/chat/completions) documents no logprobs: its "
        "docs describe none, and the fields `logprobs`/`top_logprobs` in its SDK's schema "
        "(mistralai 3.7.0) carry no description, cap or guarantee, so proxyclient has no "
        "mistral dialect; a Mistral open-weight base can be steered on a host that serves it "
        "(vllm, together, fireworks)"
    ),
}


def available() -> dict[str, AdapterFactory]:
    """Built-in adapters plus those registered by installed packages."""
    found: dict[str, AdapterFactory] = dict(BUILTIN)
    for entry in entry_points(group="proxyclient.adapters"):
        found.setdefault(entry.name, entry.load())
    return found


def tokenizer_needed(api: str, model: str) -> bool:
    """Whether ``connect(api, ..., model)`` must be given the base's tokenizer: the dialect names
    tokens by text and ``model``'s name implies no tokenizer."""
    factory = _adapter(api, available())
    return _names_tokens_by_text(factory) and _default_tokenizer(factory, model) is None


def connect(
    api: str,
    base_url: str | None,
    model: str,
    *,
    api_key: str | None = None,
    tokenizer: Any = None,
    timeout: Any = DEFAULT_TIMEOUT,
    connect_timeout: float | None = None,
    max_retries: int = DEFAULT_MAX_RETRIES,
    max_retry_time: float = DEFAULT_MAX_RETRY_TIME_S,
    transport: Any = None,
    limits: RateLimits | None = None,
    **options: Any,
) -> BaseModel:
    """The base model ``model`` served at ``base_url`` in the dialect ``api``.

    ``base_url`` is what the dialect's paths hang off: ``http://host:8000/v1`` for vllm, openai
    and openai-chat, ``http://host:8080`` for tgi and llamacpp; None means the hosted provider's
    public endpoint (an error for self-hosted dialects). ``api_key`` defaults to the provider's
    usual environment variable (``OPENAI_API_KEY``, ``GEMINI_API_KEY``, ...). ``tokenizer`` is
    the base's tokenizer (a BaseTokenizer, an HF tokenizer, a folder, or ``tiktoken:ENCODING``);
    without one, the adapter's ``default_tokenizer(model)`` (OpenAI model names imply their
    tiktoken encoding); a dialect that names tokens by text and gets none is lent the proxies' by
    ``ProxyTuner`` (or its ``base_tokenizer``). The adapter keeps it as ``.tokenizer`` (None when
    there is none). ``limits`` (``RateLimits``: max concurrency,
    requests and tokens per minute) hold for everything sent to this base, from every
    generation; a 429 with Retry-After pauses them all. ``timeout`` (seconds per read, or an
    ``httpx.Timeout``), ``connect_timeout``, ``max_retries`` and ``max_retry_time`` (seconds all
    attempts of one request may take) bound every request. ``options`` go to the adapter (e.g.
    ``max_k``, ``continue_final_message``), or become headers of every request where the dialect
    says so (openrouter's ``app_url``, ``app_title``).
    """
    factory = _adapter(api, available())
    if base_url is None:
        base_url = getattr(factory, "default_base_url", None)
        if base_url is None:
            raise ConfigError(
                f"the {api} dialect has no public endpoint: give the server's base URL "
                f"(--base-url, e.g. http://127.0.0.1:8000/v1)"
            )
    if not base_url.startswith(("http://", "https://")):
        raise ConfigError(
            f"base_url must start with http:// or https://, got {base_url!r} "
            f"(e.g. http://127.0.0.1:8000/v1)"
        )
    if tokenizer is None:
        tokenizer = _default_tokenizer(factory, model)
    base_tokenizer = load_base_tokenizer(tokenizer) if tokenizer is not None else None
    # A factory that is no DialectAdapter may predate the tokenizer keyword: pass only a real one.
    if base_tokenizer is not None or _is_dialect_adapter(factory):
        options["tokenizer"] = base_tokenizer
    # Options that the dialect sends as headers (OpenRouter's app_url, app_title), taken out.
    headers_of = getattr(factory, "extra_headers", None)
    extra_headers = headers_of(options) if callable(headers_of) else None
    key_env = getattr(factory, "api_key_env", None)
    if api_key is None and key_env:
        api_key = os.environ.get(key_env)
    http = HTTPTransport(
        base_url,
        api_key=api_key,
        auth_header=getattr(factory, "api_key_header", ("Authorization", "Bearer {key}")),
        timeout=timeout,
        connect_timeout=connect_timeout,
        max_retries=max_retries,
        max_retry_time=max_retry_time,
        transport=transport,
        limits=limits,
        extra_headers=extra_headers,
    )
    base = factory(http, model, **options)
    if not hasattr(base, "tokenizer"):
        base.tokenizer = base_tokenizer  # every adapter has one, for the engine to adopt
    return base


def _adapter(api: str, adapters: dict[str, AdapterFactory]) -> AdapterFactory:
    if api not in adapters:
        why = f"{NOT_A_BASE[api]}. " if api in NOT_A_BASE else ""
        raise ConfigError(f"{why}unknown api {api!r}; available: {', '.join(sorted(adapters))}")
    return adapters[api]


def _is_dialect_adapter(factory: AdapterFactory) -> bool:
    return isinstance(factory, type) and issubclass(factory, DialectAdapter)


def _default_tokenizer(factory: AdapterFactory, model: str) -> str | None:
    default = getattr(factory, "default_tokenizer", None)
    return default(model) if callable(default) else None


def _names_tokens_by_text(factory: AdapterFactory) -> bool:
    return bool(getattr(factory, "needs_tokenizer", False))
