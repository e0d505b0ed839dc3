"""Remote base models. Each dialect is one adapter; ``connect`` builds one by name.

Third parties add dialects through the entry-point group ``proxyclient.adapters``: a name mapped to
a factory ``(base_url, model, *, api_key, timeout, max_retries, **options) -> BaseModel``.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from proxyclient.adapters.base import BaseModel, Capabilities, TopLogprobs
from proxyclient.adapters.http import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT, HTTPTransport
from proxyclient.adapters.vllm import VLLMCompletions
from proxyclient.errors import ConfigError

__all__ = ["BaseModel", "Capabilities", "HTTPTransport", "TopLogprobs", "available", "connect"]

AdapterFactory = Callable[..., BaseModel]


def _vllm(base_url: str, model: str, *, max_k: int | None = None, **http: Any) -> BaseModel:
    return VLLMCompletions(HTTPTransport(base_url, **http), model, max_k=max_k)


BUILTIN: dict[str, AdapterFactory] = {"vllm": _vllm}


def available() -> dict[str, AdapterFactory]:
    """Built-in adapters plus those registered by installed packages."""
    found = dict(BUILTIN)
    for entry in entry_points(group="proxyclient.adapters"):
        found.setdefault(entry.name, entry.load())
    return found


def connect(
    api: str,
    base_url: str,
    model: str,
    *,
    api_key: str | None = None,
    timeout: Any = DEFAULT_TIMEOUT,
    max_retries: int = DEFAULT_MAX_RETRIES,
    **options: Any,
) -> BaseModel:
    """The base model ``model`` served at ``base_url`` (e.g. ``http://127.0.0.1:8000/v1``) in the
    dialect ``api``."""
    adapters = available()
    if api not in adapters:
        raise ConfigError(f"unknown api {api!r}; available: {', '.join(sorted(adapters))}")
    if not base_url.startswith(("http://", "https://")):
        raise ConfigError(
            f"base_url must start with http:// or https://, got {base_url!r} "
            f"(e.g. http://127.0.0.1:8000/v1)"
        )
    return adapters[api](
        base_url, model, api_key=api_key, timeout=timeout, max_retries=max_retries, **options
    )
