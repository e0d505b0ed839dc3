"""Remote base models. Each dialect is one adapter; ``connect`` builds one by name.

Third parties add dialects through the entry-point group ``proxyclient.adapters``: a name mapped to
a factory ``(transport, model, *, tokenizer, **options) -> BaseModel``.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from proxyclient.adapters.base import BaseModel, Capabilities, Prompt, TopLogprobs
from proxyclient.adapters.http import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT, HTTPTransport
from proxyclient.adapters.llamacpp import LlamaCppCompletion
from proxyclient.adapters.openai import OpenAICompletions
from proxyclient.adapters.openai_chat import OpenAIChat
from proxyclient.adapters.tgi import TGIGenerate
from proxyclient.adapters.vllm import VLLMCompletions
from proxyclient.errors import ConfigError
from proxyclient.tokenizer import BaseTokenizer, load_base_tokenizer, tiktoken_for_model

__all__ = [
    "BaseModel",
    "Capabilities",
    "HTTPTransport",
    "Prompt",
    "TopLogprobs",
    "available",
    "connect",
]

AdapterFactory = Callable[..., BaseModel]

BUILTIN: dict[str, type] = {
    "vllm": VLLMCompletions,
    "openai": OpenAICompletions,
    "openai-chat": OpenAIChat,
    "tgi": TGIGenerate,
    "llamacpp": LlamaCppCompletion,
}
NEEDS_TOKENIZER = frozenset({"openai", "openai-chat", "tgi"})


def available() -> dict[str, AdapterFactory]:
    """Built-in adapters plus those registered by installed packages."""
    found: dict[str, AdapterFactory] = dict(BUILTIN)
    for entry in entry_points(group="proxyclient.adapters"):
        found.setdefault(entry.name, entry.load())
    return found


def connect(
    api: str,
    base_url: str,
    model: str,
    *,
    api_key: str | None = None,
    tokenizer: Any = None,
    timeout: Any = DEFAULT_TIMEOUT,
    max_retries: int = DEFAULT_MAX_RETRIES,
    transport: Any = None,
    **options: Any,
) -> BaseModel:
    """The base model ``model`` served at ``base_url`` in the dialect ``api``.

    ``base_url`` is what the dialect's paths hang off: ``http://host:8000/v1`` for vllm, openai
    and openai-chat, ``http://host:8080`` for tgi and llamacpp. ``tokenizer`` is the base's
    tokenizer (a BaseTokenizer, an HF tokenizer, a folder, or ``tiktoken:ENCODING``); dialects that
    name tokens by text need it, and OpenAI model names imply their tiktoken encoding.
    ``options`` go to the adapter (e.g. ``max_k``, ``continue_final_message``).
    """
    adapters = available()
    if api not in adapters:
        raise ConfigError(f"unknown api {api!r}; available: {', '.join(sorted(adapters))}")
    if not base_url.startswith(("http://", "https://")):
        raise ConfigError(
            f"base_url must start with http:// or https://, got {base_url!r} "
            f"(e.g. http://127.0.0.1:8000/v1)"
        )
    http = HTTPTransport(
        base_url, api_key=api_key, timeout=timeout, max_retries=max_retries, transport=transport
    )
    if api in NEEDS_TOKENIZER:
        options["tokenizer"] = _base_tokenizer(api, model, tokenizer)
    elif api not in BUILTIN and tokenizer is not None:
        options["tokenizer"] = load_base_tokenizer(tokenizer)
    return adapters[api](http, model, **options)


def _base_tokenizer(api: str, model: str, tokenizer: Any) -> BaseTokenizer:
    if tokenizer is None and api.startswith("openai"):
        encoding = tiktoken_for_model(model)
        if encoding is not None:
            tokenizer = f"tiktoken:{encoding}"
    if tokenizer is None:
        raise ConfigError(
            f"the {api} dialect names tokens by text, so it needs the base's tokenizer: pass "
            f"--base-tokenizer DIR (a local Hugging Face tokenizer) or tiktoken:ENCODING"
        )
    return load_base_tokenizer(tokenizer)
