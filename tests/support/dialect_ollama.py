"""A fixture server that speaks Ollama's native ``POST /api/generate``, backed by the tiny model.

Shapes from the documentation: https://docs.ollama.com/api/generate (``GenerateRequest``:
``model``, ``prompt``, ``raw``, ``stream``, ``logprobs``, ``top_logprobs``, ``options``
{``num_predict``, ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``seed``, ...};
``GenerateResponse``: ``response``, ``done``, ``done_reason``, the durations and counts,
``logprobs[]`` of {``token``, ``logprob``, ``bytes``, ``top_logprobs[]`` of {``token``, ``logprob``,
``bytes``}}), https://docs.ollama.com/api/errors (``{"error": "..."}``; 404 for a model that does
not exist), https://docs.ollama.com/api/usage, and Ollama's server/routes.go ("top_logprobs must be
between 0 and 20", "model '%s' not found", "missing request body") and server/logprob.go (``bytes``
are those of the token's text, so U+FFFD's for part of a character). The logprobs are the model's
own distribution: Ollama asks llama-server for ``n_probs`` without ``post_sampling_probs``, a
softmax of the logits before any sampler. Defaults from api/types.go: temperature 0.8, top-k 40,
top-p 0.9, min-p 0, repeat penalty 1.1 over the last 64 tokens, ``num_predict`` -1 (to the end of
the context); the sampler chain in llama.cpp's order (penalty, top-k, top-p, min-p, temperature).

Streaming (https://docs.ollama.com/api/streaming; ``stream`` defaults to true): one
``GenerateResponse`` a line (``application/x-ndjson``), each with its token's text and
``logprobs`` entry, then a last line with ``done: true`` and the counts; a
``tests.support.hosted.StreamingServer`` sends them line by line.

Assumed where nothing is documented: the raw prompt is tokenized with the tokenizer's special
tokens (BOS); a final end-of-text token gets no logprobs entry (Ollama prints no text for it).

Importing this module registers the dialect ``"ollama"`` with ``DialectServer``.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tests.support import hosted
from tests.support.dialect_servers import (
    Json,
    Refusal,
    Step,
    _Core,
    _finite,
    _generator,
    decode_ids,
    encode_text,
    register_dialect,
    render_token,
)
from tests.support.hosted import EventStream, decode_steps, text_pieces

OLLAMA_MAX_TOP_LOGPROBS = 20
DEFAULTS: Json = {
    "temperature": 0.8,
    "top_k": 40,
    "top_p": 0.9,
    "min_p": 0.0,
    "repeat_penalty": 1.1,
    "repeat_last_n": 64,
    "num_predict": -1,
    "seed": -1,
}
OLLAMA_VERSION = "0.13.0"


def ollama_error(status: int, message: str) -> Refusal:
    return Refusal(status, {"error": message})


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


class _RecentRepeatPenalty(LogitsProcessor):
    """llama.cpp's repeat penalty: only the last ``last_n`` tokens (-1: all, 0: none)."""

    def __init__(self, penalty: float, last_n: int) -> None:
        self.inner = RepetitionPenaltyLogitsProcessor(penalty)
        self.last_n = last_n

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.last_n == 0:
            return scores
        recent = input_ids if self.last_n < 0 else input_ids[:, -self.last_n :]
        return self.inner(recent, scores)


class _Lines(EventStream):
    """Newline-delimited JSON: each event one line, no end marker."""

    def lines(self) -> Iterator[tuple[bytes, bool]]:
        for event in self.events:
            yield f"{json.dumps(event, allow_nan=False)}\n".encode(), True


def ndjson_stream(events: Iterator[Json]) -> Any:
    """``hosted.event_stream`` for newline-delimited JSON: a StreamingServer sends the lines one
    by one, a DialectServer all at once."""
    stream = _Lines(events, None)
    # hosted.event_stream writes server-sent events only; this is its hand-over, for lines.
    if getattr(hosted._handling, "incremental", False):
        hosted._handling.stream = stream
        return {}
    try:
        return "".join(line.decode() for line, _ in stream.lines())
    finally:
        stream.close()


class _Ollama:
    generation_paths = frozenset({"/api/generate"})

    def __init__(self, core: _Core) -> None:
        self.core = core
        self.settings = core.settings
        self.routes: dict[tuple[str, str], Callable[[Any], Any]] = {
            ("POST", "/api/generate"): self.generate,
            ("GET", "/api/tags"): self.tags,
            ("GET", "/api/version"): lambda _body: {"version": OLLAMA_VERSION},
            ("GET", "/"): lambda _body: "Ollama is running",
        }

    def authorize(self, method: str, path: str, headers: dict[str, str]) -> None:
        return  # a local Ollama asks for no key

    def injected(self, status: int, retry_after_ms: int) -> Refusal:
        return ollama_error(status, f"injected failure (HTTP {status})")

    def unknown_route(self, method: str, path: str) -> Refusal:
        return Refusal(404, "404 page not found")  # gin's own, as plain text

    def bad_json(self, error: str) -> Refusal:
        no_body = error == "expected a JSON object"  # what DialectServer says of an empty body
        return ollama_error(400, "missing request body" if no_body else error)

    def tags(self, _body: Any) -> Json:
        name = self.settings.served_name
        model = {"name": name, "model": name, "size": 1, "details": {"format": "gguf"}}
        return {"models": [model]}

    def options(self, body: Json) -> Json:
        options = DEFAULTS | {k: v for k, v in (body.get("options") or {}).items() if v is not None}
        return options

    def processors(self, options: Json) -> tuple[LogitsProcessorList, bool]:
        chain = LogitsProcessorList()
        if float(options["repeat_penalty"]) != 1.0:
            chain.append(
                _RecentRepeatPenalty(
                    float(options["repeat_penalty"]), int(options["repeat_last_n"])
                )
            )
        temperature = float(options["temperature"])
        if temperature <= 0:
            return chain, False  # greedy after the penalty
        if int(options["top_k"]) > 0:
            chain.append(TopKLogitsWarper(int(options["top_k"])))
        if float(options["top_p"]) < 1.0:
            chain.append(TopPLogitsWarper(float(options["top_p"])))
        if float(options["min_p"]) > 0.0:
            chain.append(MinPLogitsWarper(float(options["min_p"])))
        if temperature != 1.0:
            chain.append(TemperatureLogitsWarper(temperature))
        return chain, True

    def prompt_ids(self, body: Json) -> list[int]:
        prompt = body.get("prompt") or ""
        if not body.get("raw") and hasattr(self.core.tokenizer, "apply_chat_template"):
            prompt = self.core.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
            return encode_text(self.core.tokenizer, prompt, add_special_tokens=False)
        return encode_text(self.core.tokenizer, prompt, add_special_tokens=True)

    def generate(self, body: Json) -> Json:
        k = body.get("top_logprobs") or 0
        if not isinstance(k, int) or k < 0 or k > self.settings.max_k:
            raise ollama_error(400, f"top_logprobs must be between 0 and {self.settings.max_k}")
        name = body.get("model") or ""
        if name != self.settings.served_name:
            raise ollama_error(404, f"model '{name}' not found")
        now = _now()
        if not body.get("prompt"):  # an empty prompt only loads the model
            return {"model": name, "created_at": now, "response": "", "done": True,
                    "done_reason": "load"}  # fmt: skip
        options = self.options(body)
        ids = self.prompt_ids(body)
        limit = self.settings.max_context
        predict = int(options["num_predict"])
        room = max(0, limit - len(ids))
        max_new = room if predict < 0 else min(predict, room)
        chain, sample = self.processors(options)
        seed = int(options["seed"])
        generator = _generator(None if seed < 0 else seed)
        if body.get("stream", True):
            steps = decode_steps(
                self.core, ids, max_new, processors=chain, sample=sample, generator=generator
            )
            return ndjson_stream(self.lines(body, ids, steps, k))
        generation = self.core.model.generate(
            ids, max_new, processors=chain, sample=sample, generator=generator
        )
        emitted = generation.emitted
        text_ids = [s.token_id for s in emitted if s.token_id not in self.core.special_ids]
        response: Json = {
            "model": name,
            "created_at": now,
            "response": decode_ids(self.core.tokenizer, text_ids),
            **self.done(generation.stopped, len(ids), len(generation.steps)),
        }
        if body.get("logprobs"):
            response["logprobs"] = [
                {
                    **self.entry(s.token_id, float(s.raw[s.token_id])),
                    "top_logprobs": self.top(s.raw, k),
                }
                for s in emitted
            ]
        return response

    def done(self, stopped: bool, prompt_tokens: int, generated: int) -> Json:
        """The last answer's fields after ``response``."""
        return {
            "done": True,
            "done_reason": "stop" if stopped else "length",
            "total_duration": 1_000_000,
            "load_duration": 100_000,
            "prompt_eval_count": prompt_tokens,
            "prompt_eval_duration": 200_000,
            "eval_count": generated,
            "eval_duration": 700_000,
        }

    def lines(self, body: Json, ids: list[int], steps: Iterator[Step], k: int) -> Iterator[Json]:
        """The streamed answer: a line per token (its text, and its ``logprobs`` entry where
        asked for), the end-of-text token none, then the ``done`` line."""
        piece = text_pieces(self.core)
        generated, stopped = 0, False
        for step in steps:
            generated += 1
            if step.token_id in self.core.model.stop_ids:
                stopped = True
                break
            line: Json = {"model": body["model"], "created_at": _now(),
                          "response": piece(step.token_id), "done": False}  # fmt: skip
            if body.get("logprobs"):
                own = self.entry(step.token_id, float(step.raw[step.token_id]))
                line["logprobs"] = [{**own, "top_logprobs": self.top(step.raw, k)}]
            yield line
        yield {"model": body["model"], "created_at": _now(), "response": "",
               **self.done(stopped, len(ids), generated)}  # fmt: skip

    def entry(self, token_id: int, logprob: float) -> Json:
        text = render_token(self.core.token_bytes(token_id), "replacement", bytes_prefix="")
        return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode())}

    def top(self, logprobs: torch.Tensor, k: int) -> list[Json]:
        if k == 0:
            return []
        values, indices = torch.topk(logprobs, k)
        return [self.entry(t, v) for t, v in zip(indices.tolist(), values.tolist(), strict=True)]


register_dialect("ollama", _Ollama, max_k=OLLAMA_MAX_TOP_LOGPROBS)
