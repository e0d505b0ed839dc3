"""OpenAI's wire shapes, built and read in one place: the bodies of ``/v1/completions`` and
``/v1/chat/completions``, their sampling fields, and the answers' logprobs and usage.

Completions (legacy) logprobs: ``choices[0].logprobs`` holds ``tokens``, ``token_logprobs`` and,
per position, ``top_logprobs``: ``{token: logprob}`` (vllm, openai, together). Chat logprobs (and
Fireworks' completions with ``logprobs: true``): ``choices[0].logprobs.content[]``, one entry per
token with its ``logprob`` and ``top_logprobs[]`` of ``{token, logprob, bytes}`` (openai-chat,
deepseek, fireworks). The dialects add what their servers take beyond these.

Streamed drafts (``stream: true``): the answer comes as server-sent events, each a chunk in the
answer's own shape holding the positions generated since the last (``choices[0].logprobs`` of a
completion chunk, ``choices[0].logprobs.content`` of a chat completion chunk,
https://platform.openai.com/docs/api-reference/chat-streaming); ``stream_positions`` reads them
with the dialect's own parser, one position at a time, for every dialect that streams.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any

from proxyclient.adapters.base import (
    Continuation,
    Prompt,
    ServerUsage,
    StreamedPosition,
    TopLogprobs,
)
from proxyclient.adapters.dialect import NO_POSITIONS, DialectAdapter
from proxyclient.errors import APIStatusError, NotFoundError, ProxyClientError, ResponseFormatError
from proxyclient.tokenizer import BaseTokenizer
from proxyclient.vocab import bytes_of_token_string

COMPLETIONS_PATH = "/completions"
CHAT_PATH = "/chat/completions"

# OpenAI's last legacy completion models, shut down on 2026-09-28 (OpenAI's deprecations page,
# https://platform.openai.com/docs/deprecations, as given in issue 24; read 2026-12-03). Since
# then OpenAI serves no model on /v1/completions that returns logprobs.
OPENAI_COMPLETIONS_SHUTDOWN = "2026-09-28"
RETIRED_COMPLETION_MODELS = frozenset({"gpt-3.5-turbo-instruct", "davinci-002", "babbage-002"})
# OpenAI's words for a retired model (404 model_not_found, as recorded for text-davinci-003:
# "The model `text-davinci-003` has been deprecated, learn more here: .../docs/deprecations").
_RETIRED_WORDS = re.compile(
    r"has been deprecated|has been shut ?down|no longer (?:available|served)"
)
# A model that refuses logprobs: OpenAI's reasoning models (o1, o3, o4-mini; gpt-5.x while it
# reasons) answer 400 "Unsupported parameter: 'logprobs' is not supported with this model." or
# 403 "You are not allowed to request logprobs from this model".
_LOGPROBS_REFUSED = re.compile(
    r"logprobs.*(?:not allowed|not supported)|not allowed.*logprobs", re.IGNORECASE
)
_O_SERIES = re.compile(r"^(?:.*/)?o\d")  # o1, o3-mini, o4-mini, ...
_GPT_5 = re.compile(r"^(?:.*/)?gpt-5")


# -- requests -----------------------------------------------------------------------------------


def completions_body(model: str, prompt: list[int] | str, k: int) -> dict[str, Any]:
    """One token after ``prompt`` at temperature 1, with the top-k logprobs."""
    return {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 1.0, "logprobs": k}


def chat_body(model: str, messages: list[dict[str, Any]], k: int) -> dict[str, Any]:
    """One token of the answer to ``messages`` at temperature 1, with the top-k logprobs."""
    return {
        "model": model,
        "messages": messages,
        "max_tokens": 1,
        "temperature": 1.0,
        "logprobs": True,
        "top_logprobs": k,
    }


def sampling(n: int, *, greedy: bool, seed: int | None, top_p: bool = True) -> dict[str, Any]:
    """The fields of a draft: up to ``n`` tokens, greedy (temperature 0) or sampled at
    temperature 1 (with ``seed``, if given), with top_p 1 unless ``top_p`` is False."""
    fields: dict[str, Any] = {"max_tokens": n, "temperature": 0.0 if greedy else 1.0}
    if top_p:
        fields["top_p"] = 1.0
    if seed is not None and not greedy:
        fields["seed"] = seed
    return fields


def chat_conversation(
    prompt: Prompt, decode: Callable[[Sequence[int]], str]
) -> tuple[list[dict[str, str]], str | None]:
    """What a chat dialect sends for ``prompt``: the conversation, and the assistant's answer so
    far (None: there is none, a new answer starts).

    A chat prompt (``prompt.messages``) goes as its messages, with their roles, and its answer is
    the response prefix and the generated ids' text; the prompt's own ids (the base's rendering
    of the conversation) are not decoded. A text prompt is one user turn, its ids decoded."""
    generated = decode(prompt.generated) if prompt.generated else ""
    if prompt.messages is None:
        turns = [{"role": "user", "content": decode(prompt.ids[: prompt.prompt_len])}]
        return turns, generated if prompt.generated else None
    turns = [{"role": m["role"], "content": m["content"]} for m in prompt.messages]
    if not prompt.generated and not prompt.response_prefix:
        return turns, None
    return turns, prompt.response_prefix + generated


# -- errors -------------------------------------------------------------------------------------


def retired_model_note(model: str, message: str = "") -> str | None:
    """Why ``model`` cannot be served on OpenAI's ``/v1/completions``, or None: one of the legacy
    completion models OpenAI shut down (by name, or by the 404's own words)."""
    name = model.rsplit("/", 1)[-1]
    if name not in RETIRED_COMPLETION_MODELS and not _RETIRED_WORDS.search(message):
        return None
    return (
        f"OpenAI shut down its legacy completion models (gpt-3.5-turbo-instruct, davinci-002, "
        f"babbage-002) on {OPENAI_COMPLETIONS_SHUTDOWN} (platform.openai.com/docs/deprecations), "
        f"so no OpenAI model can be steered token by token any more: use a chat model that gives "
        f"logprobs with --api openai-chat and `proxyclient choose` (one-step choice), or an "
        f"open-weight base on a host that serves completions (vllm, together, fireworks)"
    )


def logprobs_refusal_fix(model: str) -> str:
    """What to do about a model that refused logprobs (OpenAI's reasoning models)."""
    if _GPT_5.search(model):
        return (
            f"{model!r} is a reasoning model, and OpenAI gives no logprobs while it reasons: turn "
            f'reasoning off (connect(..., reasoning_effort="none") with --api openai-chat, on '
            f"the gpt-5.x models that allow it) or use a non-reasoning chat model (gpt-4.1, "
            f"gpt-4o)"
        )
    if _O_SERIES.search(model):
        return (
            f"{model!r} is an o-series reasoning model, which never gives logprobs: use a "
            f"non-reasoning chat model (gpt-4.1, gpt-4o, or a gpt-5.x with "
            f'reasoning_effort="none")'
        )
    return (
        f"model {model!r} gives no logprobs (OpenAI's reasoning models refuse them), and "
        f"proxy-tuning needs them: use a model that does (a non-reasoning chat model, or a "
        f'gpt-5.x with reasoning_effort="none")'
    )


def openai_explanation(exc: APIStatusError, model: str) -> ProxyClientError | None:
    """OpenAI's own refusals with what to do: a retired completion model (404) and a model that
    refuses logprobs (400/403); None for any other error."""
    text = str(exc)
    fields = {"status_code": exc.status_code, "body": exc.body}
    if exc.status_code in (400, 403) and _LOGPROBS_REFUSED.search(text):
        return type(exc)(
            f"{text}\nThis model does not give logprobs: {logprobs_refusal_fix(model)}.", **fields
        )
    if isinstance(exc, NotFoundError) and (note := retired_model_note(model, text)):
        return NotFoundError(f"{text} — {note}.", **fields)
    return None


# -- answers ------------------------------------------------------------------------------------


def server_usage(body: Any) -> ServerUsage:
    """The ``usage`` of an OpenAI-style answer, cached prompt tokens included where reported
    (OpenAI and vLLM: ``prompt_tokens_details.cached_tokens``; DeepSeek:
    ``prompt_cache_hit_tokens``)."""
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return ServerUsage()
    details = usage.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    if cached is None:
        cached = usage.get("prompt_cache_hit_tokens")
    return ServerUsage(usage.get("prompt_tokens"), usage.get("completion_tokens"), cached)


def choice_logprobs(body: Any) -> Any:
    """``choices[0].logprobs`` of an OpenAI-style answer (possibly null), or a clear error."""
    try:
        return body["choices"][0]["logprobs"]
    except (KeyError, IndexError, TypeError):
        raise ResponseFormatError(
            f"the answer has no choices[0].logprobs: {str(body)[:200]!r}"
        ) from None


def completion_top_logprobs(body: Any) -> dict[str, Any]:
    """``choices[0].logprobs.top_logprobs[0]`` of an OpenAI-style completion, or a clear error."""
    logprobs = choice_logprobs(body)
    top = (logprobs or {}).get("top_logprobs") or []
    if not top or not top[0]:
        raise ResponseFormatError(
            "the server returned no top logprobs; does it support the `logprobs` parameter "
            "of /v1/completions? (vLLM does; for other servers pick their --api)"
        )
    return top[0]


def completion_positions(
    body: Any, *, empty_ok: bool = False
) -> tuple[list[Any], list[dict[str, Any]], list[Any]]:
    """The generated positions of a completion: each token, its ``{token: logprob}`` top
    logprobs and its own logprob. ``empty_ok``: an answer with no token (a server that leaves a
    final end-of-text out) has no positions, rather than being an error."""
    try:
        logprobs = body["choices"][0]["logprobs"]
    except (KeyError, IndexError, TypeError):
        logprobs = None
    if not (empty_ok and isinstance(logprobs, dict) and not logprobs.get("tokens")):
        completion_top_logprobs(body)  # the clear error when there are no top logprobs
    tokens = logprobs.get("tokens") or []
    tops = [entries or {} for entries in logprobs.get("top_logprobs") or []]
    if len(tokens) != len(tops):
        raise ResponseFormatError(
            f"the answer has {len(tokens)} tokens but {len(tops)} top-logprob entries"
        )
    return tokens, tops, logprobs.get("token_logprobs") or [None] * len(tokens)


def chat_logprobs_content(body: Any) -> list[dict[str, Any]] | None:
    """``choices[0].logprobs.content`` of an OpenAI-style chat answer ([] for an answer without
    tokens), or None when the answer has no logprobs."""
    try:
        logprobs = body["choices"][0]["logprobs"]
    except (KeyError, IndexError, TypeError):
        return None
    if not isinstance(logprobs, dict):
        return None
    content = logprobs.get("content") or []
    return content if isinstance(content, list) else None


def chat_token_id(tokenizer: BaseTokenizer, entry: dict[str, Any]) -> int | None:
    """The id of a token that a chat answer's logprobs entry names by its ``bytes`` (else by its
    text); None for U+FFFD's bytes, which vLLM sends for part of a character, not its own."""
    raw = entry.get("bytes")
    data = bytes(raw) if raw is not None else bytes_of_token_string(entry.get("token", ""))
    if data is not None and "\ufffd".encode() in data:
        return None
    return tokenizer.token_id(data)


def content_top(
    position: dict[str, Any],
    k: int,
    token_id: Callable[[dict[str, Any]], int | None],
    *,
    retokenized: bool = False,
) -> TopLogprobs:
    """One ``content`` entry's ``top_logprobs[]`` as ids (``token_id`` names each entry's);
    entries that are not objects are skipped."""
    entries: Iterable[Any] = position.get("top_logprobs") or []
    pairs = ((token_id(e), e.get("logprob")) for e in entries if isinstance(e, dict))
    return TopLogprobs.from_pairs(pairs, k=k, retokenized=retokenized)


def chat_top(tokenizer: BaseTokenizer, position: dict[str, Any], k: int) -> TopLogprobs:
    """One chat ``logprobs.content`` entry's top logprobs, named by their ``bytes`` (else their
    text), as ids."""
    return content_top(position, k, lambda entry: chat_token_id(tokenizer, entry))


# -- streamed drafts ----------------------------------------------------------------------------


def content_positions_in(chunk: Any) -> bool:
    """Whether a streamed chunk holds positions in ``choices[0].logprobs.content`` (chat, and
    Fireworks' completions): the role chunk, the finish chunk and a usage chunk hold none."""
    content = chat_logprobs_content(chunk)
    return bool(content)


def stream_positions(
    adapter: DialectAdapter,
    path: str,
    payload: dict[str, Any],
    prompt: Prompt,
    k: int,
    n: int,
    parse: Callable[[Any], Continuation],
    has_positions: Callable[[Any], bool] = content_positions_in,
) -> AsyncIterator[StreamedPosition]:
    """``adapter.stream_positions`` over chunks in the shape of a whole answer (``parse``, the
    dialect's parser of one), skipping those that hold no positions (``has_positions``)."""
    return adapter.stream_positions(
        path,
        payload,
        prompt,
        k,
        n,
        lambda chunk, _seen: parse(chunk) if has_positions(chunk) else NO_POSITIONS,
    )
