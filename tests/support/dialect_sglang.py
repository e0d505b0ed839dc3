"""A fixture server that speaks SGLang's native ``POST /generate``, backed by the tiny model.

SGLang cannot run here (its PyPI wheels are CUDA builds: sglang 0.5.23 pins torch 2.14.1 and
cuda-python, and its CPU backend needs a source build of sgl-kernel that PyPI does not carry), so
tests talk to this instead. Shapes
and wording from the documentation (https://docs.sglang.io/basic_usage/native_api.html,
https://docs.sglang.io/basic_usage/sampling_params.html) and sglang 0.5.23's source:
``entrypoints/http_server.py`` (``/generate``, ``_create_error_response``: ``{"error":
{"message"}}`` with 400), ``sampling/sampling_params.py`` (defaults, temperature 0 = top-k 1,
``verify`` wording, ``sampling_seed``), ``managers/tokenizer_manager.py`` (``meta_info``, the
``[logprob, token_id, text]`` triples, ``_validate_one_request`` wording),
``managers/scheduler.py`` (``logprob_start_len`` -1 = output only; above the input: abort),
``managers/scheduler_components/logprob_result_processor.py`` (input logprobs aligned with the
ids from ``logprob_start_len``, the first one null), ``layers/sampler.py`` (logprobs =
``log(softmax(logits / temperature))``, before top-p/top-k), ``schedule_batch.py``
(``finish_reason``), ``utils/auth.py`` (``--api-key``: 401 ``{"error": "Unauthorized"}``,
/health exempt). Like SGLang it has no cap on ``top_logprobs_num``: one above the vocabulary
fails inside the model (``topk`` out of range) and the answer is a 500. ``stream: true``
(``entrypoints/http_server.py``: ``generate_request``; ``tokenizer_manager.py``:
``_handle_batch_output``): ``data: {...}`` events of the answer so far, one per token, then
``data: [DONE]``; what SGLang refuses while running the request comes as an error event in the
200 answer. A ``tests.support.hosted.StreamingServer`` sends them event by event.

Importing this module registers the dialect ``"sglang"`` with ``DialectServer``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessorList, MinPLogitsWarper, RepetitionPenaltyLogitsProcessor

from tests.support.dialect_servers import (
    Generation,
    Json,
    Refusal,
    Step,
    _Core,
    _finite,
    _generator,
    _warpers,
    decode_ids,
    encode_text,
    register_dialect,
)
from tests.support.hosted import decode_steps, event_stream

SAMPLING_EPS = 1e-6  # sampling_params.py: _SAMPLING_EPS
DEFAULT_MAX_NEW_TOKENS = 128  # SamplingParams.max_new_tokens
SGLANG_VERSION = "0.5.23"


def sglang_error(message: str, status: int = 400) -> Refusal:
    return Refusal(status, {"error": {"message": message}})


@dataclass(frozen=True)
class _Request:
    """A /generate request as checked: what to decode and which logprobs to answer."""

    ids: list[int]
    processors: LogitsProcessorList
    sample: bool
    generator: torch.Generator
    temperature: float  # the one the logprobs are taken at
    max_new: int
    want_logprob: bool
    start: int  # logprob_start_len, -1 resolved
    k: int
    with_text: bool


class _SGLang:
    generation_paths = frozenset({"/generate"})

    def __init__(self, core: _Core) -> None:
        self.core = core
        self.settings = core.settings
        self.routes: dict[tuple[str, str], Callable[[Any], Any]] = {
            ("POST", "/generate"): self.generate,
            ("GET", "/get_model_info"): self.model_info,
            ("GET", "/model_info"): self.model_info,
            ("GET", "/health"): lambda _body: None,
            ("GET", "/v1/models"): self.models,
        }

    def authorize(self, method: str, path: str, headers: dict[str, str]) -> None:
        expected = self.settings.api_key
        if expected is None or path.startswith("/health"):
            return
        if headers.get("authorization") != f"Bearer {expected}":
            raise Refusal(401, {"error": "Unauthorized"})

    def injected(self, status: int, retry_after_ms: int) -> Refusal:
        return sglang_error(f"Injected failure (HTTP {status})", status)

    def unknown_route(self, method: str, path: str) -> Refusal:
        return Refusal(404, {"detail": "Not Found"})  # FastAPI's own

    def bad_json(self, error: str) -> Refusal:
        detail = {"type": "json_invalid", "loc": ["body"], "msg": f"JSON decode error: {error}"}
        return Refusal(422, {"detail": [detail]})  # FastAPI's own

    def model_info(self, _body: Any) -> Json:
        name = self.settings.served_name
        return {
            "model_path": name,
            "served_model_name": name,
            "tokenizer_path": name,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": "default",
        }

    def models(self, _body: Any) -> Json:
        model = {
            "id": self.settings.served_name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "sglang",
            "root": self.settings.served_name,
            "max_model_len": self.settings.max_context,
        }
        return {"object": "list", "data": [model]}

    def prompt_ids(self, body: Json) -> list[int]:
        text, ids = body.get("text"), body.get("input_ids")
        if (text is None) == (ids is None):
            raise sglang_error("Either text or input_ids should be provided.")
        if ids is not None:
            if isinstance(ids, list) and ids and isinstance(ids[0], list):
                ids = ids[0]  # a batch is answered for its first prompt only
            return [int(t) for t in ids]
        if isinstance(text, list):
            text = text[0]
        return encode_text(self.core.tokenizer, str(text), add_special_tokens=True)

    def sampling(
        self, params: Json, ids: list[int]
    ) -> tuple[LogitsProcessorList, bool, torch.Generator, float, int]:
        """sampling_params.py's defaults and checks; (processors, sample, generator, the
        temperature the logprobs are taken at, max_new_tokens)."""
        temperature = params.get("temperature")
        temperature = 1.0 if temperature is None else float(temperature)
        top_p = 1.0 if params.get("top_p") is None else float(params["top_p"])
        top_k = -1 if params.get("top_k") is None else int(params["top_k"])
        min_p = 0.0 if params.get("min_p") is None else float(params["min_p"])
        penalty = params.get("repetition_penalty")
        penalty = 1.0 if penalty is None else float(penalty)
        greedy = 0 <= temperature < SAMPLING_EPS
        if greedy:
            temperature, top_k = 1.0, 1
        if temperature < 0.0:
            raise sglang_error(
                f"temperature must be a non-negative finite number, got {temperature}."
            )
        if not 0.0 < top_p <= 1.0:
            raise sglang_error(f"top_p must be in (0, 1], got {top_p}.")
        if not 0.0 <= min_p <= 1.0:
            raise sglang_error(f"min_p must be in [0, 1], got {min_p}.")
        if top_k != -1 and top_k < 1:
            raise sglang_error(f"top_k must be -1 (disable) or at least 1, got {top_k}.")
        if not 0.0 < penalty <= 2.0:
            raise sglang_error(
                f"repetition_penalty must be in (0, 2] (1.0 = no penalty), got {penalty}."
            )
        max_new = params.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        max_new = DEFAULT_MAX_NEW_TOKENS if max_new is None else int(max_new)
        if max_new < 0:
            raise sglang_error(f"max_new_tokens must be at least 0, got {max_new}.")
        limit = self.settings.max_context
        if len(ids) >= limit:
            raise sglang_error(
                f"The input ({len(ids)} tokens) is longer than the model's context length "
                f"({limit} tokens)."
            )
        if len(ids) + max_new > limit:
            raise sglang_error(
                f"Requested token count exceeds the model's maximum context length of {limit} "
                f"tokens. You requested a total of {len(ids) + max_new} tokens: {len(ids)} "
                f"tokens from the input messages and {max_new} tokens for the completion. "
                f"Please reduce the number of tokens in the input messages or the completion "
                f"to fit within the limit."
            )
        processors = LogitsProcessorList()
        if penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(penalty))
        if greedy:
            return processors, False, _generator(0), 1.0, max_new
        processors.extend(_warpers(temperature, 0 if top_k == -1 else top_k, top_p))
        if min_p > 0.0:
            processors.append(MinPLogitsWarper(min_p))
        return processors, True, _generator(params.get("sampling_seed")), temperature, max_new

    def request(self, body: Json) -> _Request:
        """The request, checked as SGLang checks it (a Refusal where it refuses)."""
        ids = self.prompt_ids(body)
        params = body.get("sampling_params") or {}
        if isinstance(params, list):
            params = params[0]
        processors, sample, generator, temperature, max_new = self.sampling(params, ids)
        want_logprob = bool(body.get("return_logprob"))
        start = body.get("logprob_start_len")
        start = len(ids) if start is None or start == -1 else int(start)
        if want_logprob and start > len(ids):
            raise sglang_error(
                f"req.logprob_start_len={start} is higher than the number of input tokens "
                f"len(req.origin_input_ids)={len(ids)}. Please use a smaller logprob_start_len."
            )
        return _Request(
            ids, processors, sample, generator, temperature, max_new, want_logprob, start,
            k=int(body.get("top_logprobs_num") or 0),
            with_text=bool(body.get("return_text_in_logprobs")),
        )  # fmt: skip

    def generate(self, body: Json) -> Any:
        """The answer; with ``stream: true`` one event per token, each the answer so far (the
        text, ids and meta_info lists of every position until then: SGLang's default, without
        ``--incremental-streaming-output``), then ``[DONE]``; a refusal inside the stream (SGLang
        checks the request as it runs it) as an ``{"error": {"message"}}`` event in the 200."""
        try:
            req = self.request(body)
        except Refusal as refusal:
            if body.get("stream") and refusal.status == 400:
                return event_stream(iter([refusal.body]))
            raise
        if body.get("stream"):
            return event_stream(self.events(req))
        generation = self.core.model.generate(
            req.ids, req.max_new, processors=req.processors, sample=req.sample,
            generator=req.generator,
        )  # fmt: skip
        return self.answer(req, generation)

    def events(self, req: _Request) -> Iterator[Json]:
        prompt_logprobs = torch.empty(0)
        if req.want_logprob and req.start < len(req.ids):  # the prompt's own logprobs
            prompt_logprobs = self.core.model.generate(
                req.ids, 0, processors=req.processors, sample=False, generator=req.generator
            ).prompt_logprobs
        steps: list[Step] = []
        for step in decode_steps(
            self.core, req.ids, req.max_new, processors=req.processors, sample=req.sample,
            generator=req.generator,
        ):  # fmt: skip
            steps.append(step)
            stopped = step.token_id in self.core.model.stop_ids
            answer = self.answer(req, Generation(prompt_logprobs, steps, stopped))
            if not stopped and len(steps) < req.max_new:
                answer["meta_info"]["finish_reason"] = None
            yield answer

    def answer(self, req: _Request, generation: Generation) -> Json:
        ids, max_new = req.ids, req.max_new
        generated = [s.token_id for s in generation.steps]
        text_ids = [t for t in generated if t not in self.core.special_ids]
        finish: Json = (
            {"type": "stop", "matched": generated[-1]}
            if generation.stopped
            else {"type": "length", "length": max_new}
        )
        meta: Json = {
            "id": uuid.uuid4().hex,
            "finish_reason": finish,
            "prompt_tokens": len(ids),
            "weight_version": "default",
            "num_retractions": 0,
        }
        if req.want_logprob:
            meta |= self.logprobs(ids, generation, req.start, req.k, req.temperature, req.with_text)
        meta |= {
            "reasoning_tokens": 0,
            "completion_tokens": len(generated),
            "cached_tokens": 0,
            "e2e_latency": 0.01,
        }
        return {
            "text": decode_ids(self.core.tokenizer, text_ids),
            "output_ids": generated,
            "meta_info": meta,
        }

    def triple(self, logprob: float | None, token_id: int, with_text: bool) -> list[Any]:
        text = decode_ids(self.core.tokenizer, [token_id]) if with_text else None
        return [None if logprob is None else _finite(logprob), token_id, text]

    def top(self, logprobs: torch.Tensor, k: int, with_text: bool) -> list[list[Any]]:
        values, indices = torch.topk(logprobs, k)  # k above the vocabulary raises: a 500
        return [
            self.triple(v, t, with_text)
            for v, t in zip(values.tolist(), indices.tolist(), strict=True)
        ]

    def logprobs(
        self,
        ids: list[int],
        generation: Generation,
        start: int,
        k: int,
        temperature: float,
        with_text: bool,
    ) -> Json:
        """meta_info's logprob fields: the input's from ``start`` (the first null), then every
        generated token's, all at the request's temperature (sampler.py)."""

        def scaled(raw: torch.Tensor) -> torch.Tensor:
            return raw if temperature == 1.0 else torch.log_softmax(raw / temperature, dim=-1)

        input_own: list[list[Any]] = []
        input_top: list[list[list[Any]] | None] = []
        for j in range(start, len(ids)):
            row = None if j == 0 or j == start else scaled(generation.prompt_logprobs[j - 1])
            input_own.append(
                self.triple(None if row is None else float(row[ids[j]]), ids[j], with_text)
            )
            input_top.append(None if row is None or k == 0 else self.top(row, k, with_text))
        rows = [scaled(s.raw) for s in generation.steps]
        output_own = [
            self.triple(float(row[s.token_id]), s.token_id, with_text)
            for s, row in zip(generation.steps, rows, strict=True)
        ]
        meta: Json = {
            "input_token_logprobs": input_own,
            "output_token_logprobs": output_own,
            "output_token_logprobs_length": len(output_own),
        }
        if k > 0:
            meta["input_top_logprobs"] = input_top
            meta["output_top_logprobs"] = [self.top(row, k, with_text) for row in rows]
        return meta


register_dialect("sglang", _SGLang, max_k=-1)
