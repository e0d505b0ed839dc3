"""A Gemini API server for tests, backed by the real tiny model: ``DialectServer("gemini", ...)``
once this module is imported.

It answers as Google's Gemini API documents (read 2026-11-30):

* ``POST /v1beta/models/{model}:generateContent`` — request and response fields from
  https://ai.google.dev/api/generate-content: ``contents[]`` of ``role`` (user/model) and
  ``parts[].text``; ``systemInstruction`` (its parts' text, rendered as the chat template's system
  message, before the turns); ``generationConfig`` with ``responseLogprobs``, ``logprobs`` ("in
  the range of [0, 20]"), ``maxOutputTokens``, ``temperature``, ``topP``, ``candidateCount``,
  ``seed``; the answer's ``candidates[].logprobsResult`` (``topCandidates[].candidates[]`` and
  ``chosenCandidates[]`` of ``token``, ``tokenId``, ``logProbability``; ``logProbabilitySum``),
  ``avgLogprobs``, ``finishReason``, and ``usageMetadata``. The end of the answer is no token in
  ``chosenCandidates`` and its text (as OpenAI's chat leaves out its stop token). The logprobs
  are the model's own, whatever the temperature; a token that is part of a character has U+FFFD as
  its text (proto strings are UTF-8). Gemini's fixed topK (64 on 2.x models) is not modelled.
* ``POST /v1beta/models/{model}:streamGenerateContent`` (``?alt=sse``) — the same request,
  answered as "a stream of GenerateContentResponse instances" (the same reference), each a
  server-sent event; the stream just ends (no ``[DONE]``). One event per token, its text and its
  ``logprobsResult`` entries (real streams group several tokens an event), ``usageMetadata`` so
  far in each, and a last event with the ``finishReason`` and no token. Only the first candidate
  is streamed.
* ``GET /v1beta/models`` — ListModels: ``models[].name`` ("models/..."), limits and
  ``supportedGenerationMethods``.
* Errors: ``{"error": {"code", "message", "status"}}`` as in
  https://ai.google.dev/gemini-api/docs/troubleshooting. Recorded wordings: an unknown model
  (404 NOT_FOUND "models/X is not found for API version v1beta, or is not supported for
  generateContent. Call ListModels ..."), a model without logprobs (400 INVALID_ARGUMENT
  "Logprobs is not enabled for models/X"), a trailing model turn on models that no longer take one
  (400 INVALID_ARGUMENT "Requests ending with a model turn are not supported unless the last part
  is a function response.", https://ai.google.dev/gemini-api/docs/latest-model), a missing key
  (403 PERMISSION_DENIED "Method doesn't allow unregistered callers ..."), a wrong one (400
  INVALID_ARGUMENT "API key not valid. Please pass a valid API key." with an ErrorInfo
  API_KEY_INVALID), too long a prompt (400 "The input token count (N) exceeds the maximum number of
  tokens allowed (M)."), unknown fields ("Invalid JSON payload received. Unknown name ..."). A
  ``logprobs`` out of range is worded as Google words ranges ("Unable to submit request because it
  has a maxOutputTokens value of 70000 but the supported range is from 1 (inclusive) to 65537
  (exclusive)"). ``refuse_logprobs=True`` answers logprobs with 403 PERMISSION_DENIED (a project
  not allowed them; no recorded wording, ours).

One server answers several model names, each a way real models behave (``model_names``): the
served name continues a trailing model turn (Gemini 2.x); ``{name}-no-prefill`` refuses it (Gemini
3.6 Flash, 3.5 Flash-Lite); ``{name}-no-logprobs`` refuses logprobs (400, as gemini-2.5-pro did).
The API key travels in ``x-goog-api-key``.
"""

from __future__ import annotations

import functools
import math
import random
import re
import string
from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers import LogitsProcessorList

from tests.support.dialect_servers import (
    Generation,
    Json,
    Refusal,
    _Core,
    _generator,
    _text_content,
    _warpers,
    register_dialect,
)
from tests.support.hosted import decode_steps, event_stream, text_pieces

GEMINI_MAX_K = 20
OUTPUT_TOKEN_LIMIT = 8192
DEFAULT_CANDIDATES_MAX = 8
NO_PREFILL = "-no-prefill"
NO_LOGPROBS = "-no-logprobs"
MODEL_TURN_REFUSED = (
    "Requests ending with a model turn are not supported unless the last part is a function "
    "response."
)
_GENERATE = re.compile(
    r"^/v1beta/models/(?P<model>[^/:]+):(?:generateContent|streamGenerateContent)$"
)
_REQUEST_FIELD_NAMES = (
    "contents tools toolConfig safetySettings systemInstruction generationConfig cachedContent"
)
_CONFIG_FIELD_NAMES = (
    "stopSequences responseMimeType responseSchema responseJsonSchema responseModalities "
    "candidateCount maxOutputTokens temperature topP topK seed presencePenalty frequencyPenalty "
    "responseLogprobs logprobs enableEnhancedCivicAnswers speechConfig thinkingConfig imageConfig "
    "mediaResolution"
)
_REQUEST_FIELDS = frozenset(_REQUEST_FIELD_NAMES.split())
_CONFIG_FIELDS = frozenset(_CONFIG_FIELD_NAMES.split())


def gemini_error(code: int, message: str, status: str, **extra: Any) -> Refusal:
    return Refusal(code, {"error": {"code": code, "message": message, "status": status, **extra}})


def model_names(served: str) -> dict[str, str]:
    """Every model name one server answers, with how it behaves."""
    return {served: "continues", served + NO_PREFILL: "no-prefill", served + NO_LOGPROBS: "none"}


def out_of_range(name: str, value: Any, low: float, high: float, *, exclusive: bool) -> Refusal:
    end = "exclusive" if exclusive else "inclusive"
    return gemini_error(
        400,
        f"Unable to submit request because it has a {name} value of {value} but the supported "
        f"range is from {low:g} (inclusive) to {high:g} ({end}). Update the value and try again.",
        "INVALID_ARGUMENT",
    )


class _Gemini:
    def __init__(self, core: _Core) -> None:
        self.core = core
        self.settings = core.settings
        self.models = model_names(self.settings.served_name)
        self.routes: dict[tuple[str, str], Callable[[Any], Any]] = {
            ("GET", "/v1beta/models"): self.list_models
        }
        for name in self.models:
            path = f"/v1beta/models/{name}:generateContent"
            self.routes[("POST", path)] = functools.partial(self.generate, name)
            path = f"/v1beta/models/{name}:streamGenerateContent"
            self.routes[("POST", path)] = functools.partial(self.stream_generate, name)
        self.generation_paths = frozenset(p for m, p in self.routes if m == "POST")

    # -- the server's protocol ----------------------------------------------------------------

    def authorize(self, method: str, path: str, headers: dict[str, str]) -> None:
        expected = self.settings.api_key
        if expected is None:
            return
        key = headers.get("x-goog-api-key", "")
        if not key:
            raise gemini_error(
                403,
                "Method doesn't allow unregistered callers (callers without established "
                "identity). Please use API Key or other form of API consumer identity to call "
                "this API.",
                "PERMISSION_DENIED",
            )
        if key != expected:
            info = {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "API_KEY_INVALID",
                "domain": "googleapis.com",
                "metadata": {"service": "generativelanguage.googleapis.com"},
            }
            raise gemini_error(
                400,
                "API key not valid. Please pass a valid API key.",
                "INVALID_ARGUMENT",
                details=[info],
            )

    def injected(self, status: int, retry_after_ms: int) -> Refusal:
        if status == 429:
            retry = {
                "@type": "type.googleapis.com/google.rpc.RetryInfo",
                "retryDelay": f"{math.ceil(retry_after_ms / 1000)}s",
            }
            return gemini_error(
                429,
                "You exceeded your current quota, please check your plan and billing details.",
                "RESOURCE_EXHAUSTED",
                details=[retry],
            )
        if status == 503:
            return gemini_error(
                503, "The model is overloaded. Please try again later.", "UNAVAILABLE"
            )
        if status >= 500:
            return gemini_error(status, "An internal error has occurred.", "INTERNAL")
        return gemini_error(status, f"Injected failure (HTTP {status}).", "INVALID_ARGUMENT")

    def unknown_route(self, method: str, path: str) -> Refusal:
        if match := _GENERATE.match(path):
            return gemini_error(
                404,
                f"models/{match['model']} is not found for API version v1beta, or is not supported "
                f"for generateContent. Call ListModels to see the list of available models and "
                f"their supported methods.",
                "NOT_FOUND",
            )
        return gemini_error(404, "Method not found.", "NOT_FOUND")

    def bad_json(self, error: str) -> Refusal:
        return gemini_error(400, f"Invalid JSON payload received. {error}", "INVALID_ARGUMENT")

    # -- routes -------------------------------------------------------------------------------

    def list_models(self, _body: Any) -> Json:
        models = [
            {
                "name": f"models/{name}",
                "version": "001",
                "displayName": name,
                "inputTokenLimit": self.settings.max_context,
                "outputTokenLimit": OUTPUT_TOKEN_LIMIT,
                "supportedGenerationMethods": ["generateContent", "countTokens"],
                "temperature": 1.0,
                "maxTemperature": 2.0,
                "topP": 0.95,
            }
            for name in self.models
        ]
        return {"models": models}

    def generate(self, model: str, body: Json) -> Json:
        ids, max_new, sampler, want_logprobs, k, count = self.request(model, body)
        processors, sample, generator = sampler
        candidates, generated = [], 0
        for index in range(count):
            generation = self.core.model.generate(
                ids, max_new, processors=processors, sample=sample, generator=generator
            )
            generated += len(generation.steps)
            top_k = k if want_logprobs else None
            candidates.append(self.candidate(index, generation, want_logprobs, top_k))
        return {
            "candidates": candidates,
            "usageMetadata": self.usage(len(ids), generated),
            "modelVersion": model,
            "responseId": "".join(random.choices(string.ascii_letters + string.digits, k=22)),
        }

    def stream_generate(self, model: str, body: Json) -> Any:
        ids, max_new, (processors, sample, generator), want_logprobs, k, _ = self.request(
            model, body
        )
        steps = decode_steps(
            self.core, ids, max_new, processors=processors, sample=sample, generator=generator
        )
        events = self.events(model, ids, steps, want_logprobs, k)
        return event_stream(events, done=None)

    def events(
        self, model: str, ids: list[int], steps: Iterator[Any], want_logprobs: bool, k: Any
    ) -> Iterator[Json]:
        """One GenerateContentResponse per token, then the finish (the end of the answer is no
        token, as in the whole answer)."""
        response_id = "".join(random.choices(string.ascii_letters + string.digits, k=22))
        piece, generated, finish = text_pieces(self.core), 0, "MAX_TOKENS"

        def event(candidate: Json) -> Json:
            return {
                "candidates": [candidate | {"index": 0}],
                "usageMetadata": self.usage(len(ids), generated),
                "modelVersion": model,
                "responseId": response_id,
            }

        for step in steps:
            generated += 1
            if step.token_id in self.core.model.stop_ids:
                finish = "STOP"
                break
            candidate: Json = {
                "content": {"parts": [{"text": piece(step.token_id)}], "role": "model"}
            }
            if want_logprobs:
                chosen = self.entry(step.token_id, float(step.raw[step.token_id]))
                result: Json = {"chosenCandidates": [chosen]}
                if k:
                    top = [self.entry(t, lp) for t, lp in self.top(step.raw, k)]
                    result["topCandidates"] = [{"candidates": top}]
                candidate["logprobsResult"] = result
            yield event(candidate)
        yield event({"content": {"parts": [{"text": ""}], "role": "model"}, "finishReason": finish})

    @staticmethod
    def usage(prompt_tokens: int, generated: int) -> Json:
        return {
            "promptTokenCount": prompt_tokens,
            "candidatesTokenCount": generated,
            "totalTokenCount": prompt_tokens + generated,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt_tokens}],
        }

    def request(
        self, model: str, body: Json
    ) -> tuple[list[int], int, tuple[LogitsProcessorList, bool, torch.Generator], bool, Any, int]:
        """A generation request checked as Gemini checks it: the prompt's ids, the tokens to
        generate at most, the sampler, whether logprobs are wanted, k, and the candidates."""
        config = self.check_fields(body)
        messages = self.messages(body.get("contents"))
        continuing = messages[-1]["role"] == "assistant"
        system = self.system_instruction(body.get("systemInstruction"))
        if continuing and self.models[model] == "no-prefill":
            raise gemini_error(400, MODEL_TURN_REFUSED, "INVALID_ARGUMENT")
        want_logprobs = bool(config.get("responseLogprobs"))
        if want_logprobs:
            if self.models[model] == "none":
                raise gemini_error(
                    400, f"Logprobs is not enabled for models/{model}", "INVALID_ARGUMENT"
                )
            if self.settings.refuse_logprobs:
                message = f"Permission denied: logprobs are not allowed for models/{model}."
                raise gemini_error(403, message, "PERMISSION_DENIED")
        k = config.get("logprobs")
        if k is not None and (not isinstance(k, int) or not 0 <= k <= self.settings.max_k):
            raise out_of_range("logprobs", k, 0, self.settings.max_k + 1, exclusive=True)
        ids = self.core.render_chat(
            system + messages,
            add_generation_prompt=not continuing,
            continue_final_message=continuing,
        )
        limit = self.settings.max_context
        if len(ids) > limit:
            message = (
                f"The input token count ({len(ids)}) exceeds the maximum number of tokens "
                f"allowed ({limit})."
            )
            raise gemini_error(400, message, "INVALID_ARGUMENT")
        max_new = self.bounded(config, "maxOutputTokens", OUTPUT_TOKEN_LIMIT, 1, OUTPUT_TOKEN_LIMIT)
        max_new = min(max_new, limit - len(ids))
        temperature = float(self.bounded(config, "temperature", 1.0, 0.0, 2.0, exclusive=False))
        top_p = float(self.bounded(config, "topP", 0.95, 0.0, 1.0, exclusive=False))
        count = self.bounded(config, "candidateCount", 1, 1, DEFAULT_CANDIDATES_MAX)
        if temperature == 0:
            processors, sample, generator = LogitsProcessorList(), False, _generator(0)
        else:
            warpers = _warpers(temperature=temperature, top_p=top_p if top_p > 0 else 1.0)
            processors, sample = LogitsProcessorList(warpers), True
            generator = _generator(config.get("seed"))
        return ids, max_new, (processors, sample, generator), want_logprobs, k, count

    # -- helpers ------------------------------------------------------------------------------

    def check_fields(self, body: Json) -> Json:
        for name in body:
            if name not in _REQUEST_FIELDS:
                message = (
                    f'Invalid JSON payload received. Unknown name "{name}": Cannot find field.'
                )
                raise gemini_error(400, message, "INVALID_ARGUMENT")
        config = body.get("generationConfig") or {}
        for name in config:
            if name not in _CONFIG_FIELDS:
                message = (
                    f'Invalid JSON payload received. Unknown name "{name}" at '
                    f"'generation_config': Cannot find field."
                )
                raise gemini_error(400, message, "INVALID_ARGUMENT")
        return config

    def messages(self, contents: Any) -> list[dict[str, str]]:
        """``contents`` as chat-template messages (model -> assistant)."""
        if not isinstance(contents, list) or not contents:
            message = "* GenerateContentRequest.contents: contents is not specified\n"
            raise gemini_error(400, message, "INVALID_ARGUMENT")
        messages = []
        for i, content in enumerate(contents):
            role = content.get("role", "user") if isinstance(content, dict) else None
            if role not in ("user", "model"):
                raise gemini_error(400, "Please use a valid role: user, model.", "INVALID_ARGUMENT")
            parts = content.get("parts")
            if not isinstance(parts, list) or not parts or not all("text" in p for p in parts):
                message = (
                    f"* GenerateContentRequest.contents[{i}].parts[0].data: required oneof field "
                    f"'data' must have one initialized field\n"
                )
                raise gemini_error(400, message, "INVALID_ARGUMENT")
            text = _text_content(parts)
            messages.append({"role": "assistant" if role == "model" else "user", "content": text})
        return messages

    @staticmethod
    def system_instruction(instruction: Any) -> list[dict[str, str]]:
        """``systemInstruction`` (a Content, its role ignored) as a first system message, which
        the chat template renders as the model's system prompt; [] without one."""
        if instruction is None:
            return []
        parts = instruction.get("parts") if isinstance(instruction, dict) else None
        if not isinstance(parts, list) or not parts or not all("text" in p for p in parts):
            message = (
                "* GenerateContentRequest.system_instruction.parts[0].data: required oneof field "
                "'data' must have one initialized field\n"
            )
            raise gemini_error(400, message, "INVALID_ARGUMENT")
        return [{"role": "system", "content": _text_content(parts)}]

    @staticmethod
    def bounded(
        config: Json,
        name: str,
        default: float,
        low: float,
        high: float,
        *,
        exclusive: bool = True,
    ) -> Any:
        """``config[name]`` (or ``default``) within [low, high], else Google's range error."""
        value = config.get(name)
        if value is None:
            return default
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not low <= value <= high
        ):
            raise out_of_range(
                name, value, low, high + 1 if exclusive else high, exclusive=exclusive
            )
        return value

    def candidate(
        self, index: int, generation: Generation, want_logprobs: bool, k: int | None
    ) -> Json:
        emitted = generation.emitted
        text = self.core.joined_bytes([s.token_id for s in emitted]).decode("utf-8", "replace")
        content: Json = {"role": "model"}
        if text:
            content["parts"] = [{"text": text}]
        answer: Json = {
            "content": content,
            "finishReason": "STOP" if generation.stopped else "MAX_TOKENS",
            "index": index,
        }
        chosen = [self.entry(s.token_id, float(s.raw[s.token_id])) for s in emitted]
        if chosen:
            answer["avgLogprobs"] = sum(c["logProbability"] for c in chosen) / len(chosen)
        if want_logprobs and chosen:
            result: Json = {
                "chosenCandidates": chosen,
                "logProbabilitySum": sum(c["logProbability"] for c in chosen),
            }
            if k:
                result["topCandidates"] = [
                    {"candidates": [self.entry(t, lp) for t, lp in self.top(s.raw, k)]}
                    for s in emitted
                ]
            answer["logprobsResult"] = result
        return answer

    def entry(self, token_id: int, logprob: float) -> Json:
        raw = self.core.token_bytes(token_id)
        token = "" if self.settings.partial_tokens == "empty" else raw.decode("utf-8", "replace")
        if self.settings.partial_tokens == "empty" and _valid_utf8(raw):
            token = raw.decode()
        return {"token": token, "tokenId": token_id, "logProbability": logprob}

    @staticmethod
    def top(logprobs: torch.Tensor, k: int) -> list[tuple[int, float]]:
        values, indices = torch.topk(logprobs, k)
        return list(zip(indices.tolist(), values.tolist(), strict=True))


def _valid_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


register_dialect("gemini", _Gemini, max_k=GEMINI_MAX_K, url_suffix="/v1beta")
