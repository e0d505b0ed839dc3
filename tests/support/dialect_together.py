"""A fixture server that speaks Together's ``POST /v1/completions``, backed by the tiny model.

Shapes from the documentation: https://docs.together.ai/reference/completions-1 and
https://docs.together.ai/docs/logprobs, whose schema is github.com/togethercomputer/openapi
(``CompletionRequest``: ``prompt`` a string, ``logprobs`` an integer 0..20, ``echo``;
``CompletionResponse``: ``choices[].logprobs`` = ``LogprobsPart`` {``token_ids``, ``tokens``,
``token_logprobs``}, ``prompt[]`` = ``PromptPart`` {``text``, ``logprobs``}; ``ErrorData``
{``error``: {``message``, ``type``, ``param``, ``code``}}; ``FinishReason`` includes ``eos``). The
per-position ``top_logprobs`` ({token text: logprob}, the k best plus the sampled token, as
OpenAI's) are not in the schema but in Together's answers (a recorded one is quoted in
tsaichris/NLP-final, logP/Together.py). Recorded wording: the logprobs cap "5 is greater than the
maximum of 1 - 'logprobs'" (stanford-crfm/helm#2325, when the cap was 1), an unknown model "Unable
to access model X. Please visit https://api.together.ai/models to view the list of supported
models." (code ``model_not_available``, maruel/genai's recorded tests), ``GET /v1/models``
answering a bare list (lmg-anon/mikupad#55).

Assumed where nothing is documented: the prompt is tokenized with the tokenizer's special tokens
(BOS); token strings of part of a character are U+FFFD; a final EOS is listed among the tokens
(``finish_reason`` "eos"); the logprobs are the raw model's.

Importing this module registers the dialect ``"together"`` with ``DialectServer``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

from tests.support.dialect_servers import (
    Generation,
    Json,
    Refusal,
    _Core,
    _finite,
    _generator,
    _random_id,
    _warpers,
    decode_ids,
    encode_text,
    register_dialect,
    render_token,
)

TOGETHER_MAX_LOGPROBS = 20
DEFAULT_MAX_TOKENS = 512  # together-python's CompletionRequest default
KEY_HELP = "You can find your API key at https://api.together.xyz/settings/api-keys."
MODELS_URL = "https://api.together.ai/models"


def together_error(
    status: int, message: str, *, type_: str = "invalid_request_error", **extra: Any
) -> Refusal:
    body = {"message": message, "type": type_, "param": None, "code": None} | extra
    return Refusal(status, {"error": body})


class _Together:
    generation_paths = frozenset({"/v1/completions"})

    def __init__(self, core: _Core) -> None:
        self.core = core
        self.settings = core.settings
        self.routes: dict[tuple[str, str], Callable[[Any], Any]] = {
            ("POST", "/v1/completions"): self.completions,
            ("GET", "/v1/models"): self.models,
        }

    def authorize(self, method: str, path: str, headers: dict[str, str]) -> None:
        expected = self.settings.api_key
        if expected is None:
            return
        if headers.get("authorization", "") != f"Bearer {expected}":
            message = f"Invalid API key provided. {KEY_HELP}"
            raise together_error(401, message, code="invalid_api_key")

    def injected(self, status: int, retry_after_ms: int) -> Refusal:
        if status == 429:
            return together_error(
                429, "You have exceeded your rate limit.", type_="rate_limit", code="rate_limit"
            )
        return together_error(status, f"Injected failure (HTTP {status})", type_="server_error")

    def unknown_route(self, method: str, path: str) -> Refusal:
        return together_error(404, f"Not Found: {method} {path}")

    def bad_json(self, error: str) -> Refusal:
        return together_error(400, f"Invalid JSON body: {error}")

    def models(self, _body: Any) -> list[Json]:
        return [
            {
                "id": self.settings.served_name,
                "object": "model",
                "created": 1_700_000_000,
                "type": "language",
                "display_name": self.settings.served_name,
                "organization": "tests",
                "context_length": self.settings.max_context,
            }
        ]

    def check(self, body: Json) -> tuple[list[int], int | None, int]:
        """(prompt ids, k or None, max_tokens), refusing what Together refuses."""
        if not body.get("model"):
            raise together_error(400, "model is required", param="model")
        if body["model"] != self.settings.served_name:
            message = (
                f"Unable to access model {body['model']}. Please visit {MODELS_URL} to view the "
                f"list of supported models."
            )
            raise together_error(404, message, code="model_not_available")
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise together_error(400, "prompt must be a string", param="prompt")
        k = body.get("logprobs")
        if k is not None:
            if k > self.settings.max_k:
                message = f"{k} is greater than the maximum of {self.settings.max_k} - 'logprobs'"
                raise together_error(400, message, param="logprobs")
            if k < 0:
                message = f"{k} is less than the minimum of 0 - 'logprobs'"
                raise together_error(400, message, param="logprobs")
        ids = encode_text(self.core.tokenizer, prompt, add_special_tokens=True)
        max_tokens = body.get("max_tokens")
        max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else int(max_tokens)
        limit = self.settings.max_context
        if len(ids) + max_tokens > limit:
            message = (
                f"Input validation error: `inputs` tokens + `max_new_tokens` must be <= {limit}. "
                f"Given: {len(ids)} `inputs` tokens and {max_tokens} `max_new_tokens`"
            )
            raise together_error(400, message)
        return ids, k, max_tokens

    def sampling(self, body: Json) -> tuple[LogitsProcessorList, bool, torch.Generator]:
        temperature = 1.0 if body.get("temperature") is None else float(body["temperature"])
        if temperature == 0:
            return LogitsProcessorList(), False, _generator(0)
        processors = LogitsProcessorList()
        penalty = body.get("repetition_penalty")
        if penalty is not None and penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(float(penalty)))
        top_p = 1.0 if body.get("top_p") is None else float(body["top_p"])
        processors.extend(_warpers(temperature, int(body.get("top_k") or 0), top_p))
        return processors, True, _generator(body.get("seed"))

    def completions(self, body: Json) -> Json:
        ids, k, max_tokens = self.check(body)
        processors, sample, generator = self.sampling(body)
        generation = self.core.model.generate(
            ids, max_tokens, processors=processors, sample=sample, generator=generator
        )
        generated = [s.token_id for s in generation.steps]
        text = decode_ids(
            self.core.tokenizer, [t for t in generated if t not in self.core.special_ids]
        )
        echo = bool(body.get("echo"))
        choice: Json = {
            "index": 0,
            "text": (body["prompt"] if echo else "") + text,
            "seed": body.get("seed")
            if body.get("seed") is not None
            else int(generator.initial_seed()),
            "finish_reason": "eos" if generation.stopped else "length",
            "logprobs": None if k is None else self.logprobs(generation, k),
        }
        return {
            "id": _random_id("o"),
            "object": "text.completion",
            "created": int(time.time()),
            "model": self.settings.served_name,
            "prompt": [self.prompt_part(body["prompt"], ids, generation)] if echo else [],
            "choices": [choice],
            "usage": {
                "prompt_tokens": len(ids),
                "completion_tokens": len(generated),
                "total_tokens": len(ids) + len(generated),
            },
        }

    def token_string(self, token_id: int) -> str:
        return render_token(self.core.token_bytes(token_id), "replacement", bytes_prefix="")

    def logprobs(self, generation: Generation, k: int) -> Json:
        steps = generation.steps
        part: Json = {
            "token_ids": [s.token_id for s in steps],
            "tokens": [self.token_string(s.token_id) for s in steps],
            "token_logprobs": [_finite(float(s.raw[s.token_id])) for s in steps],
        }
        if k > 0:
            part["top_logprobs"] = [self.top_dict(s.raw, k, s.token_id) for s in steps]
        return part

    def top_dict(self, logprobs: torch.Tensor, k: int, chosen: int) -> dict[str, float]:
        """The k best as {token string: logprob}, plus the chosen token; tokens that render alike
        collapse onto one key (the first, best one kept)."""
        values, indices = torch.topk(logprobs, k)
        pairs = list(zip(indices.tolist(), values.tolist(), strict=True))
        if chosen not in {t for t, _ in pairs}:
            pairs.append((chosen, float(logprobs[chosen])))
        out: dict[str, float] = {}
        for token_id, logprob in pairs:
            out.setdefault(self.token_string(token_id), logprob)
        return out

    def prompt_part(self, text: str, ids: list[int], generation: Generation) -> Json:
        """echo: the prompt's tokens and their own logprobs (the first has none); no top-k."""
        own = [None] + [
            _finite(float(generation.prompt_logprobs[i, t])) for i, t in enumerate(ids[1:])
        ]
        return {
            "text": text,
            "logprobs": {
                "token_ids": list(ids),
                "tokens": [self.token_string(t) for t in ids],
                "token_logprobs": own,
            },
        }


register_dialect("together", _Together, max_k=TOGETHER_MAX_LOGPROBS, url_suffix="/v1")
