"""A fixture server that speaks Fireworks' ``POST /inference/v1/completions``, backed by the tiny
model.

Shapes from the documentation: https://docs.fireworks.ai/api-reference/post-completions (the
OpenAPI schema: ``CompletionRequest`` with ``additionalProperties: false``, ``prompt`` a string or
an array of token ids, ``logprobs`` an integer 0..5 (the legacy ``LogProbs``: ``tokens``,
``token_logprobs``, ``top_logprobs`` {text: logprob}, ``text_offset``, ``token_ids``) or ``true``
with ``top_logprobs`` 0..5 (``NewLogProbs``: ``content[]`` of {``token``, ``logprob``,
``sampling_logprob``, ``bytes``, ``token_id``, ``text_offset``, ``top_logprobs[]`` of {``token``,
``logprob``, ``token_id``, ``bytes``}}), ``echo``, ``echo_last``, ``context_length_exceeded_
behavior`` (default ``truncate``), ``return_token_ids``, ``raw_output``; ``Choice``, ``UsageInfo``
with ``prompt_tokens_details.cached_tokens``; a 422 ``HTTPValidationError`` {``detail``: [{``loc``,
``msg``, ``type``}]} for a request outside the schema) and
https://docs.fireworks.ai/guides/inference-error-codes (404 for a model that does not exist or is
not deployed; recorded wording "Model not found, inaccessible, and/or not deployed").

The cap on ``top_logprobs`` is the server's ``max_k`` (default 5, the documented range; a
deployment may allow more); a larger one is refused with a 422 in pydantic's wording ("Input
should be less than or equal to 5"). Assumed where nothing is documented: string prompts get BOS
("most models will automatically prepend the beginning-of-sequence token"); a final EOS is listed
with the generated tokens; ``logprob`` is the raw model's and ``sampling_logprob`` the one after
the request's sampler; the first prompt token, when echoed, has no logprob.

``stream: true`` answers ``CompletionStreamResponse`` chunks as data-only server-sent events
ending with ``data: [DONE]`` (the ``stream`` field's description): one chunk per token with its
``text`` and ``logprobs`` in the answer's shape (``CompletionResponseStreamChoice``), then one with
the ``finish_reason`` and ``usage`` (assumed: the schema says only that ``usage`` may be null);
``echo`` is not streamed here (a 400 of this fixture's own).

Importing this module registers the dialect ``"fireworks"`` with ``DialectServer``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers import LogitsProcessorList

from tests.support.dialect_servers import (
    Generation,
    Json,
    Refusal,
    _Core,
    _finite,
    _generator,
    _warpers,
    char_offsets,
    decode_ids,
    encode_text,
    register_dialect,
    render_token,
)
from tests.support.hosted import decode_steps, event_stream, text_pieces

FIREWORKS_MAX_TOP_LOGPROBS = 5
DEFAULT_MAX_TOKENS = 16
NOT_FOUND = "Model not found, inaccessible, and/or not deployed"
_REQUEST_FIELDS = frozenset(
    {
        *("model", "prompt", "images", "user", "prompt_cache_isolation_key", "raw_output"),
        *("perf_metrics_in_response", "stream", "n", "stop", "max_tokens"),
        *("max_completion_tokens", "temperature", "top_k", "top_p", "min_p", "typical_p"),
        *("frequency_penalty", "presence_penalty", "repetition_penalty", "mirostat_target"),
        *("mirostat_lr", "seed", "logprobs", "top_logprobs", "echo", "echo_last", "ignore_eos"),
        *("context_length_exceeded_behavior", "response_format", "logit_bias", "speculation"),
        *("prediction", "metadata", "reasoning_effort", "reasoning_history", "thinking"),
        "return_token_ids",
    }
)


def fireworks_error(status: int, message: str, **extra: Any) -> Refusal:
    body = {"object": "error", "type": "invalid_request_error", "message": message} | extra
    return Refusal(status, {"error": body})


def validation_error(field: str, msg: str, type_: str, value: Any = None) -> Refusal:
    detail = {"loc": ["body", field], "msg": msg, "type": type_}
    if value is not None:
        detail["input"] = value
    return Refusal(422, {"detail": [detail]})


class _Fireworks:
    generation_paths = frozenset({"/inference/v1/completions"})

    def __init__(self, core: _Core) -> None:
        self.core = core
        self.settings = core.settings
        self.routes: dict[tuple[str, str], Callable[[Any], Any]] = {
            ("POST", "/inference/v1/completions"): self.completions,
            ("GET", "/inference/v1/models"): self.models,
        }

    def authorize(self, method: str, path: str, headers: dict[str, str]) -> None:
        expected = self.settings.api_key
        if expected is None:
            return
        if headers.get("authorization", "") != f"Bearer {expected}":
            raise fireworks_error(401, "The API key you provided is invalid.", code="UNAUTHORIZED")

    def injected(self, status: int, retry_after_ms: int) -> Refusal:
        if status == 429:
            refusal = fireworks_error(429, "Request rate limit exceeded, please try again later")
            refusal.headers["retry-after"] = str(max(1, retry_after_ms // 1000))
            return refusal
        return fireworks_error(status, f"Injected failure (HTTP {status})", type="server_error")

    def unknown_route(self, method: str, path: str) -> Refusal:
        return Refusal(404, {"detail": "Not Found"})

    def bad_json(self, error: str) -> Refusal:
        return Refusal(422, {"detail": [{"loc": ["body"], "msg": error, "type": "json_invalid"}]})

    def models(self, _body: Any) -> Json:
        model = {
            "id": self.settings.served_name,
            "object": "model",
            "created": 1_700_000_000,
            "owned_by": "fireworks",
            "kind": "HF_BASE_MODEL",
            "supports_chat": False,
            "context_length": self.settings.max_context,
        }
        return {"object": "list", "data": [model]}

    def check(self, body: Json) -> None:
        """The schema's checks (422), then the model (404)."""
        for name in body:
            if name not in _REQUEST_FIELDS:
                raise validation_error(name, "Extra inputs are not permitted", "extra_forbidden")
        for name in ("prompt", "model"):
            if name not in body:
                raise validation_error(name, "Field required", "missing")
        logprobs, top = body.get("logprobs"), body.get("top_logprobs")
        cap = self.settings.max_k
        for name, value in (("logprobs", logprobs), ("top_logprobs", top)):
            if isinstance(value, int) and not isinstance(value, bool):
                if value > cap:
                    message = f"Input should be less than or equal to {cap}"
                    raise validation_error(name, message, "less_than_equal", value)
                if value < 0:
                    message = "Input should be greater than or equal to 0"
                    raise validation_error(name, message, "greater_than_equal", value)
        if body["model"] != self.settings.served_name:
            raise fireworks_error(404, NOT_FOUND, param="model", code="NOT_FOUND")

    def prompt_ids(self, prompt: Any) -> list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # several prompts: answered for the first only
        if isinstance(prompt, str):
            ids = encode_text(self.core.tokenizer, prompt, add_special_tokens=True)
        elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
        else:
            raise validation_error("prompt", "Input should be a valid string", "string_type")
        if not ids:
            raise fireworks_error(400, "The prompt is empty")
        return ids

    def sampling(self, body: Json) -> tuple[LogitsProcessorList, bool, torch.Generator]:
        temperature = 1.0 if body.get("temperature") is None else float(body["temperature"])
        if temperature == 0:
            return LogitsProcessorList(), False, _generator(0)
        top_p = 1.0 if body.get("top_p") is None else float(body["top_p"])
        warpers = _warpers(temperature, int(body.get("top_k") or 0), top_p)
        return LogitsProcessorList(warpers), True, _generator(body.get("seed"))

    def completions(self, body: Json) -> Json:
        self.check(body)
        ids = self.prompt_ids(body["prompt"])
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
        max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else int(max_tokens)
        limit = self.settings.max_context
        if len(ids) + max_tokens > limit:
            if body.get("context_length_exceeded_behavior", "truncate") == "error":
                message = (
                    f"The prompt is too long: {len(ids)}, max_tokens: {max_tokens}, model maximum "
                    f"context length: {limit}"
                )
                raise fireworks_error(400, message)
            max_tokens = max(0, limit - len(ids))
        processors, sample, generator = self.sampling(body)
        if body.get("stream"):
            if body.get("echo") or body.get("echo_last"):
                raise fireworks_error(400, "echo is not streamed by this fixture")
            steps = decode_steps(
                self.core, ids, max_tokens, processors=processors, sample=sample,
                generator=generator,
            )  # fmt: skip
            return event_stream(self.chunks(body, ids, steps))
        generation = self.core.model.generate(
            ids, max_tokens, processors=processors, sample=sample, generator=generator
        )
        echoed = len(ids) if body.get("echo") else int(body.get("echo_last") or 0)
        echoed = min(echoed, len(ids))
        generated = [s.token_id for s in generation.steps]
        shown = [t for t in ids[len(ids) - echoed :] + generated if t not in self.core.special_ids]
        choice: Json = {
            "index": 0,
            "text": decode_ids(self.core.tokenizer, shown),
            "logprobs": self.logprobs(body, ids, echoed, generation),
            "finish_reason": "stop" if generation.stopped else "length",
        }
        if body.get("return_token_ids"):
            choice |= {"prompt_token_ids": list(ids), "token_ids": generated}
        if body.get("raw_output"):
            choice["raw_output"] = {
                "prompt_fragments": [decode_ids(self.core.tokenizer, ids)],
                "prompt_token_ids": list(ids),
                "completion": choice["text"],
                "completion_token_ids": generated,
            }
        return {
            "id": str(uuid.uuid4()),
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.settings.served_name,
            "choices": [choice],
            "usage": {
                "prompt_tokens": len(ids),
                "total_tokens": len(ids) + len(generated),
                "completion_tokens": len(generated),
                "prompt_tokens_details": {"cached_tokens": 0},
            },
        }

    def chunks(self, body: Json, ids: list[int], steps: Iterator[Any]) -> Iterator[Json]:
        """The streamed answer: a chunk per token (a final EOS included, as in the whole
        answer), then the finish with ``usage``."""
        head = {
            "id": str(uuid.uuid4()),
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.settings.served_name,
        }
        piece, text, generated, finish = (
            text_pieces(self.core),
            self.core.joined_bytes(ids),
            0,
            "length",
        )
        for step in steps:
            generated += 1
            offset = char_offsets(text, [self.core.token_bytes(step.token_id)])[0]
            text += self.core.token_bytes(step.token_id)
            choice: Json = {"index": 0, "text": piece(step.token_id), "finish_reason": None}
            choice["logprobs"] = self.streamed_logprobs(body, step, offset)
            yield head | {"choices": [choice], "usage": None}
            if step.token_id in self.core.model.stop_ids:
                finish = "stop"
        usage = {
            "prompt_tokens": len(ids),
            "total_tokens": len(ids) + generated,
            "completion_tokens": generated,
            "prompt_tokens_details": {"cached_tokens": 0},
        }
        last = {"index": 0, "text": "", "logprobs": None, "finish_reason": finish}
        yield head | {"choices": [last], "usage": usage}

    def streamed_logprobs(self, body: Json, step: Any, offset: int) -> Any:
        """One token's ``logprobs`` in the shape asked for (see ``logprobs``)."""
        asked = body.get("logprobs")
        if asked is None or asked is False:
            return None
        if asked is True:
            k = int(body.get("top_logprobs") or 0)
            return {"content": [self.entry(step.token_id, step.raw, step.processed, k, offset)]}
        return {
            "tokens": [self.token_string(step.token_id)],
            "token_logprobs": [_finite(float(step.raw[step.token_id]))],
            "top_logprobs": [self.top_dict(step.raw, int(asked), step.token_id)],
            "text_offset": [offset],
            "token_ids": [step.token_id],
        }

    def token_string(self, token_id: int) -> str:
        return render_token(self.core.token_bytes(token_id), "replacement", bytes_prefix="")

    def rows(
        self, ids: list[int], echoed: int, generation: Generation
    ) -> list[tuple[int, torch.Tensor | None, torch.Tensor | None]]:
        """(token, its raw distribution, its sampling distribution) for each listed position:
        the echoed prompt tokens (the first prompt token has none), then the generated ones."""
        rows: list[tuple[int, torch.Tensor | None, torch.Tensor | None]] = []
        for j in range(len(ids) - echoed, len(ids)):
            row = generation.prompt_logprobs[j - 1] if j > 0 else None
            rows.append((ids[j], row, row))
        rows += [(s.token_id, s.raw, s.processed) for s in generation.steps]
        return rows

    def logprobs(self, body: Json, ids: list[int], echoed: int, generation: Generation) -> Any:
        asked = body.get("logprobs")
        if asked is None or asked is False:
            return None
        rows = self.rows(ids, echoed, generation)
        pieces = [self.core.token_bytes(t) for t, _, _ in rows]
        offsets = char_offsets(self.core.joined_bytes(ids[: len(ids) - echoed]), pieces)
        if asked is True:
            k = int(body.get("top_logprobs") or 0)
            entries = [
                self.entry(t, raw, sampled, k, offset)
                for (t, raw, sampled), offset in zip(rows, offsets, strict=True)
            ]
            return {"content": entries}
        k = int(asked)
        return {
            "tokens": [self.token_string(t) for t, _, _ in rows],
            "token_logprobs": [
                None if raw is None else _finite(float(raw[t])) for t, raw, _ in rows
            ],
            "top_logprobs": [
                None if raw is None else self.top_dict(raw, k, t) for t, raw, _ in rows
            ],
            "text_offset": offsets,
            "token_ids": [t for t, _, _ in rows],
        }

    def entry(
        self,
        token_id: int,
        raw: torch.Tensor | None,
        sampled: torch.Tensor | None,
        k: int,
        offset: int,
    ) -> Json:
        top = []
        if raw is not None and k > 0:
            values, indices = torch.topk(raw, k)
            top = [
                {
                    "token": self.token_string(t),
                    "logprob": _finite(v),
                    "token_id": t,
                    "bytes": list(self.core.token_bytes(t)),
                }
                for t, v in zip(indices.tolist(), values.tolist(), strict=True)
            ]
        return {
            "token": self.token_string(token_id),
            "logprob": None if raw is None else _finite(float(raw[token_id])),
            "sampling_logprob": None if sampled is None else _finite(float(sampled[token_id])),
            "bytes": list(self.core.token_bytes(token_id)),
            "token_id": token_id,
            "text_offset": offset,
            "top_logprobs": top,
        }

    def top_dict(self, logprobs: torch.Tensor, k: int, chosen: int) -> dict[str, float]:
        values, indices = torch.topk(logprobs, k)
        pairs = list(zip(indices.tolist(), values.tolist(), strict=True))
        if chosen not in {t for t, _ in pairs}:
            pairs.append((chosen, float(logprobs[chosen])))
        out: dict[str, float] = {}
        for token_id, logprob in pairs:
            out.setdefault(self.token_string(token_id), logprob)
        return out


register_dialect(
    "fireworks", _Fireworks, max_k=FIREWORKS_MAX_TOP_LOGPROBS, url_suffix="/inference/v1"
)
