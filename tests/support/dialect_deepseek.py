"""A DeepSeek API server for tests, backed by the real tiny model: ``DialectServer("deepseek",
...)`` once this module is imported; its base URL ends in ``/beta``, as beta features need.

It answers as DeepSeek documents (read 2026-11-30):

* ``POST /beta/chat/completions`` — https://api-docs.deepseek.com/api/create-chat-completion:
  ``messages``, ``max_tokens`` ("the valid range of max_tokens is [1, 8192]"), ``temperature``,
  ``top_p``, ``logprobs``, ``top_logprobs`` (0 to 20), ``thinking``; the answer in OpenAI's chat
  shape (``choices[].logprobs.content[]`` of ``token``, ``logprob``, ``bytes``, ``top_logprobs``;
  the stop token left out) with DeepSeek's ``usage`` (``prompt_cache_hit_tokens``,
  ``prompt_cache_miss_tokens`` and ``prompt_tokens_details.cached_tokens``; hits are the longest
  prefix shared with an earlier request, in whole 64-token units, as
  https://api-docs.deepseek.com/guides/kv_cache describes).
* Chat prefix completion, https://api-docs.deepseek.com/guides/chat_prefix_completion: a last
  ``assistant`` message with ``prefix: true`` is continued (the chat template, left open); without
  ``prefix`` a new assistant turn starts.
* Thinking, https://api-docs.deepseek.com/guides/thinking_mode: on by default, off with
  ``thinking: {"type": "disabled"}``; a thinking answer carries ``message.reasoning_content``.
* Streaming (the same page: ``stream``, "data-only server-sent events ... terminated by a
  ``data: [DONE]`` message", and ``stream_options.include_usage``): chat completion chunks, the
  role first, a thinking model's ``delta.reasoning_content`` next, then one chunk per token with
  its ``logprobs.content`` entry, the finish, and the usage chunk when asked for.
* ``GET /beta/models`` and ``GET /models`` — the served names, in OpenAI's list shape.
* Errors in OpenAI's shape with DeepSeek's recorded wording: an unknown model (400 "Model Not
  Exist"), a bad key (401 "Authentication Fails, Your api key: ****abcd is invalid",
  ``authentication_error``; a missing key gets the same), a parameter deepseek-reasoner refuses
  ("deepseek-reasoner does not support the parameter `presence_penalty`", recorded for that
  parameter; https://api-docs.deepseek.com/guides/reasoning_model says logprobs and top_logprobs
  "will trigger an error"), a trailing assistant message on deepseek-reasoner without prefix
  ("The last message of deepseek-reasoner must be a user message, or an assistant message with
  prefix mode on ..."), and ``top_logprobs`` out of range worded as DeepSeek words max_tokens.

One server answers several model names (``model_names``): the served name (a current model:
thinks unless told not to), ``deepseek-reasoner`` (refuses logprobs), ``{name}-thinking``
(thinks whatever it is told), and ``{name}-degenerate``, whose top logprobs are only 0 and -9999,
as users have reported DeepSeek answering.
"""

from __future__ import annotations

import random
import string
import threading
import time
from collections.abc import Callable
from typing import Any

from tests.support.dialect_servers import (
    Generation,
    Json,
    Refusal,
    _Core,
    _OpenAIChat,
    _text_content,
    openai_error,
    register_dialect,
)
from tests.support.hosted import chat_chunks, decode_steps, event_stream

DEEPSEEK_MAX_K = 20
MAX_TOKENS = 8192
CACHE_UNIT = 64
REASONER = "deepseek-reasoner"
THINKING = "-thinking"
DEGENERATE = "-degenerate"
THOUGHT = "The user wants this continued. I will continue it."
# The fields DeepSeek's chat completions document (thinking and reasoning_effort for thinking).
_PARAM_NAMES = (
    "model messages thinking reasoning_effort frequency_penalty max_tokens presence_penalty "
    "response_format stop stream stream_options temperature top_p tools tool_choice logprobs "
    "top_logprobs"
)
PARAMS = frozenset(_PARAM_NAMES.split())


def model_names(served: str) -> dict[str, str]:
    """Every model name one server answers, with how it behaves."""
    return {
        served: "default",
        REASONER: "reasoner",
        served + THINKING: "thinks",
        served + DEGENERATE: "degenerate",
    }


class _DeepSeek(_OpenAIChat):
    generation_paths = frozenset({"/beta/chat/completions"})

    def __init__(self, core: _Core) -> None:
        super().__init__(core)
        self.names = model_names(self.settings.served_name)
        self.routes: dict[tuple[str, str], Callable[[Any], Any]] = {
            ("POST", "/beta/chat/completions"): self.chat,
            ("GET", "/beta/models"): self.models,
            ("GET", "/models"): self.models,
        }
        self._seen: list[tuple[int, ...]] = []  # prompts so far, for the prefix cache
        self._seen_lock = threading.Lock()

    def authorize(self, method: str, path: str, headers: dict[str, str]) -> None:
        expected = self.settings.api_key
        if expected is None:
            return
        scheme, _, key = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or key.strip() != expected:
            message = f"Authentication Fails, Your api key: ****{key.strip()[-4:]} is invalid"
            raise openai_error(
                401, message, type_="authentication_error", code="invalid_request_error"
            )

    def models(self, _body: Any) -> Json:
        data = [{"id": name, "object": "model", "owned_by": "deepseek"} for name in self.names]
        return {"object": "list", "data": data}

    def chat(self, body: Json) -> Json:
        model = body.get("model")
        if model not in self.names:
            raise _error("Model Not Exist")
        behaviour = self.names[model]
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _error("Invalid request: messages must not be empty")
        want_logprobs = bool(body.get("logprobs"))
        if behaviour == "reasoner":
            for name in ("logprobs", "top_logprobs"):
                if body.get(name) is not None:
                    raise _error(f"deepseek-reasoner does not support the parameter `{name}`")
        last = messages[-1]
        prefix = last.get("role") == "assistant" and bool(last.get("prefix"))
        if behaviour == "reasoner" and last.get("role") == "assistant" and not prefix:
            raise _error(
                "The last message of deepseek-reasoner must be a user message, or an assistant "
                "message with prefix mode on (refer to "
                "https://api-docs.deepseek.com/guides/chat_prefix_completion)."
            )
        k = body.get("top_logprobs")
        if k is not None and not want_logprobs:
            raise _error("top_logprobs requires logprobs to be true")
        if k is not None and (not isinstance(k, int) or not 0 <= k <= self.settings.max_k):
            raise _error(
                f"Invalid top_logprobs value, the valid range of top_logprobs is "
                f"[0, {self.settings.max_k}]"
            )
        max_tokens = body.get("max_tokens")
        if max_tokens is not None and not (
            isinstance(max_tokens, int) and 1 <= max_tokens <= MAX_TOKENS
        ):
            raise _error(
                f"Invalid max_tokens value, the valid range of max_tokens is [1, {MAX_TOKENS}]"
            )
        thinking = (body.get("thinking") or {}).get("type", "enabled")
        thinks = behaviour in ("reasoner", "thinks") or thinking != "disabled"
        plain = [
            {"role": m.get("role", "user"), "content": _text_content(m.get("content"))}
            for m in messages
        ]
        ids = self.core.render_chat(
            plain, add_generation_prompt=not prefix, continue_final_message=prefix
        )
        limit = self.settings.max_context
        if len(ids) > limit:
            raise _error(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(ids)} tokens ({len(ids)} in the messages, 0 in the completion). Please "
                f"reduce the length of the messages or completion."
            )
        wanted = MAX_TOKENS if max_tokens is None else max_tokens
        max_new = min(wanted, limit - len(ids))
        processors, sample, generator = self.sampling(body)
        if body.get("stream"):
            hits = self.cache_hits(ids)
            steps = decode_steps(
                self.core, ids, max_new, processors=processors, sample=sample, generator=generator
            )
            cached = {
                "prompt_tokens_details": {"cached_tokens": hits},
                "prompt_cache_hit_tokens": hits,
                "prompt_cache_miss_tokens": len(ids) - hits,
            }
            chunks = chat_chunks(
                self,
                steps,
                k if want_logprobs else None,
                model=model,
                prompt_tokens=len(ids),
                include_usage=bool((body.get("stream_options") or {}).get("include_usage")),
                reasoning=THOUGHT if thinks else None,
                shape=_degenerate if behaviour == "degenerate" else lambda entry: entry,
                usage_extra=lambda: cached,
            )
            return event_stream(chunks)
        generation = self.core.model.generate(
            ids, max_new, processors=processors, sample=sample, generator=generator
        )
        choice = self.deepseek_choice(generation, k if want_logprobs else None, behaviour)
        if thinks:
            choice["message"]["reasoning_content"] = THOUGHT
        hits = self.cache_hits(ids)
        generated = len(generation.steps)
        return {
            "id": "".join(random.choices(string.hexdigits.lower(), k=32)),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
            "usage": {
                "prompt_tokens": len(ids),
                "completion_tokens": generated,
                "total_tokens": len(ids) + generated,
                "prompt_tokens_details": {"cached_tokens": hits},
                "prompt_cache_hit_tokens": hits,
                "prompt_cache_miss_tokens": len(ids) - hits,
            },
            "system_fingerprint": "fp_dialectsrv_prod0820_fp8_kvcache",
        }

    def deepseek_choice(self, generation: Generation, k: int | None, behaviour: str) -> Json:
        choice = self.choice(0, generation, k)
        if behaviour == "degenerate" and choice["logprobs"] is not None:
            for position in choice["logprobs"]["content"]:
                _degenerate(position)
        return choice

    def cache_hits(self, ids: list[int]) -> int:
        """Prompt tokens an earlier request already had, in whole cache units."""
        with self._seen_lock:
            shared = max((_common_prefix(ids, seen) for seen in self._seen), default=0)
            self._seen.append(tuple(ids))
        return shared // CACHE_UNIT * CACHE_UNIT


def _degenerate(position: Json) -> Json:
    """A position's logprobs as a degenerate answer has them: only 0 and -9999."""
    position["logprob"] = 0.0
    for rank, entry in enumerate(position["top_logprobs"]):
        entry["logprob"] = 0.0 if rank == 0 else -9999.0
    return position


def _error(message: str) -> Refusal:
    return openai_error(400, message, code="invalid_request_error")


def _common_prefix(a: list[int], b: tuple[int, ...]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


register_dialect("deepseek", _DeepSeek, max_k=DEEPSEEK_MAX_K, url_suffix="/beta")
