"""What a server can do, found out with one or two tiny requests; which dialect it speaks.

``probe`` asks once with k = 1 (does the endpoint answer with logprobs?), then with the adapter's
``probe_ks``: by default an absurd k, whose refusal names the server's cap; adapters whose servers
may allow the whole vocabulary try k = -1 first, and those whose servers may cap k silently ask at
the documented cap too (a smaller answer is the real cap: ``DialectAdapter.note_top_size``).
``sniff_dialect`` looks at a few read-only endpoints that each stack answers in its own way, for
error messages that say which --api to use.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from proxyclient.adapters.base import Capabilities, Prompt
from proxyclient.adapters.http import HTTPTransport
from proxyclient.errors import BaseModelError, ConfigError, TopKTooLargeError

if TYPE_CHECKING:
    from proxyclient.adapters.dialect import DialectAdapter

HUGE_K = 100_000


async def probe(adapter: Any, prompt: Prompt) -> Capabilities:
    """The adapter's capabilities with ``max_k`` measured on the live server."""
    if getattr(adapter, "needs_tokenizer", False) and getattr(adapter, "tokenizer", None) is None:
        raise ConfigError(
            f"the {adapter.dialect} dialect names tokens by text, so probing it needs the base's "
            f"tokenizer: pass tokenizer=... (a local Hugging Face tokenizer folder or "
            f"tiktoken:ENCODING)"
        )
    await adapter.top_logprobs(prompt, 1)  # raises with a clear message if it cannot work at all
    max_k = adapter.capabilities.max_k
    for k in getattr(adapter, "probe_ks", (HUGE_K,)):  # default for a BaseModel of its own
        try:
            answer = await adapter.top_logprobs(prompt, k)
        except TopKTooLargeError as exc:
            max_k = exc.server_max
            continue
        except BaseModelError:
            continue  # refused without naming a cap: keep the configured one
        max_k = -1 if k == -1 else max(len(answer), max_k or 0)
        break
    # A server that answered fewer than asked without saying so (DialectAdapter.note_top_size).
    seen = getattr(adapter, "k_cap_seen", None)
    if seen is not None and (max_k is None or max_k < 0 or max_k > seen):
        max_k = seen
    return dataclasses.replace(adapter.capabilities, max_k=max_k)


async def sniff_dialect(transport: HTTPTransport) -> str | None:
    """The dialect the server behind ``transport`` seems to speak, from read-only endpoints."""
    root = transport.base_url.removesuffix("/v1")
    info = await transport.peek(root + "/info")
    if isinstance(info, dict) and "model_id" in info:
        return "tgi"
    props = await transport.peek(root + "/props")
    if isinstance(props, dict) and ("default_generation_settings" in props or "n_ctx" in props):
        return "llamacpp"
    models = await transport.peek(root + "/v1/models")
    if isinstance(models, dict) and isinstance(models.get("data"), list):
        owners = {m.get("owned_by") for m in models["data"] if isinstance(m, dict)}
        return "vllm" if "vllm" in owners else "openai"
    return None


async def dialect_hint(transport: HTTPTransport, adapter: type[DialectAdapter]) -> str:
    """A sentence for error messages when a server does not answer like ``adapter`` expects."""
    found = await sniff_dialect(transport)
    if found is None or adapter.served_by(found):
        return ""
    return (
        f" The server at {transport.base_url} seems to speak {found}, not {adapter.dialect}: "
        f"try --api {found}."
    )


def steering_summary(capabilities: Capabilities) -> str:
    """What a base with these capabilities can be used for, in words (``proxyclient inspect``)."""
    if not capabilities.multi_step:
        return (
            "one-step choice only: the API cannot continue a partial answer "
            "(use choose, or max_new_tokens=1)"
        )
    speculation = [
        name
        for name, able in (
            ("base drafts", capabilities.drafts),
            ("expert drafts", capabilities.prompt_scoring),
        )
        if able
    ]
    extra = f"; speculation: {', '.join(speculation)}" if speculation else "; no speculation"
    return "multi-token steering" + extra
