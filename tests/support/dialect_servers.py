"""Local HTTP servers that speak three remote-model dialects, backed by a tiny transformers model.

Real OpenAI and TGI servers cannot run here, so tests talk to these instead. Each one answers the
way the real server does, as read from its documentation and source:

* ``"openai"`` — legacy ``POST /v1/completions`` (+ ``GET /v1/models``). Shapes: openai-python's
  ``types/completion.py``; a recorded gpt-3.5-turbo-instruct answer for ``"bytes:\\xe6\\x97"``
  tokens and character ``text_offset``.
* ``"openai-chat"`` — ``POST /v1/chat/completions`` (+ ``GET /v1/models``). Shapes: openai-python's
  ``types/chat/chat_completion.py`` and ``chat_completion_token_logprob.py``. With
  ``continue_final_message=True`` it also takes vLLM's two chat-template extensions
  (``add_generation_prompt``, ``continue_final_message``: vLLM's ``ChatCompletionRequest``), as a
  vLLM server does.
* ``"tgi"`` — ``POST /generate``, ``POST /generate_stream`` and ``GET /info`` of
  text-generation-inference. Shapes and wording: ``router/src/lib.rs`` (Info, Details, Token,
  StreamResponse, ErrorResponse), ``router/src/validation.rs``, ``router/src/infer/mod.rs``
  (InferError), ``router/src/server.rs`` (``generate_stream_internal``: one event per token, a
  refusal as an event in the 200 answer), ``server/.../utils/tokens.py`` (warpers, top tokens).
  Streamed answers go out event by event from ``tests.support.hosted.StreamingServer``.

Every request is recorded in ``DialectServer.requests``, and every conversation a chat route
renders, with the roles it received, in ``DialectServer.conversations``; ``fail_next`` injects
error answers.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import functools
import inspect
import json
import logging
import math
import random
import re
import string
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.utils import logging as hf_logging

logger = logging.getLogger(__name__)

Dialect = str  # "openai", "openai-chat", "tgi", or one registered by a fixture module
PartialTokens = Literal["openai", "replacement", "empty"]
Json = dict[str, Any]

DEFAULT_MAX_K: dict[str, int] = {"openai": 5, "openai-chat": 20, "tgi": 5}
# The path the dialect's base URL ends in ("" = the server root).
URL_SUFFIX: dict[str, str] = {"openai": "/v1", "openai-chat": "/v1", "tgi": ""}
# Handler classes by dialect; filled at the end of this module, and by register_dialect.
HANDLERS: dict[str, Callable[[Any], Any]] = {}


def register_dialect(
    name: str, handler: Callable[[Any], Any], *, max_k: int, url_suffix: str = ""
) -> None:
    """Serve ``name`` with ``handler(core)`` (a ``_DialectBase``), so that fixture modules for
    further dialects live in files of their own: importing the module registers its dialect."""
    HANDLERS[name] = handler
    DEFAULT_MAX_K[name] = max_k
    URL_SUFFIX[name] = url_suffix


OPENAI_DEFAULT_MAX_TOKENS = 16  # legacy completions' documented default
TGI_DEFAULT_MAX_NEW_TOKENS = 100  # GenerateParameters::default_max_new_tokens
TGI_DEFAULT_GENERATION_LENGTH = 1024  # validation.rs, for "max_new_tokens": null
TGI_VERSION = "3.3.6"

# --------------------------------------------------------------------------------------------
# Tokenizer access: everything but chat templating goes through these three functions, so that
# any object with encode/decode and per-token bytes (a tiktoken Encoding, say) can stand in.
# --------------------------------------------------------------------------------------------

_BYTE_FALLBACK_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, inverted: printable character -> the byte it stands for."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + shifted)
            shifted += 1
    return {c: b for b, c in chars.items()}


_BYTE_LEVEL_CHARS = _byte_level_alphabet()


def encode_text(tokenizer: Any, text: str, *, add_special_tokens: bool) -> list[int]:
    """Text -> ids. HF tokenizers honour ``add_special_tokens``; others (tiktoken) add none."""
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))
    return list(tokenizer.encode(text))


def decode_ids(tokenizer: Any, ids: Sequence[int]) -> str:
    """Ids -> text as the tokenizer decodes them (an incomplete UTF-8 tail becomes U+FFFD)."""
    return tokenizer.decode(list(ids))


def token_bytes(tokenizer: Any, token_id: int) -> bytes:
    """The exact bytes of one token (b"" for an id the tokenizer does not know)."""
    if hasattr(tokenizer, "decode_single_token_bytes"):  # tiktoken
        return tokenizer.decode_single_token_bytes(token_id)
    if hasattr(tokenizer, "token_bytes"):
        return tokenizer.token_bytes(token_id)
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if piece is None:
        return b""
    if token_id in getattr(tokenizer, "added_tokens_decoder", {}):
        return piece.encode()
    if match := _BYTE_FALLBACK_PIECE.fullmatch(piece):  # SentencePiece byte fallback
        return bytes([int(match[1], 16)])
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if "ByteLevel" in repr(decoder):
        return bytes(_BYTE_LEVEL_CHARS[c] for c in piece)
    return piece.replace("\u2581", " ").encode()


def render_token(raw: bytes, mode: PartialTokens, *, bytes_prefix: str) -> str:
    """A token's string; bytes that are not valid UTF-8 on their own are rendered per ``mode``.

    "openai" escapes every non-printable or non-ASCII byte as ``\\xNN`` after ``bytes_prefix``
    (legacy completions use "bytes:", chat uses none), "replacement" gives U+FFFD, "empty" "".
    """
    with contextlib.suppress(UnicodeDecodeError):
        return raw.decode("utf-8")
    if mode == "replacement":
        return raw.decode("utf-8", errors="replace")
    if mode == "empty":
        return ""
    escaped = "".join(chr(b) if 0x20 <= b < 0x7F and b != 0x5C else f"\\x{b:02x}" for b in raw)
    return bytes_prefix + escaped


def char_offsets(prefix: bytes, pieces: Sequence[bytes]) -> list[int]:
    """Character offset where each piece starts, after ``prefix``; an incomplete character counts
    once it completes (OpenAI gives both halves of a split character the same offset)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    count = len(decoder.decode(prefix))
    offsets = []
    for piece in pieces:
        offsets.append(count)
        count += len(decoder.decode(piece))
    return offsets


def _finite(x: float) -> float | None:
    # JSON has no NaN/inf; Rust's serde_json (TGI) writes them as null.
    return x if math.isfinite(x) else None


def _random_id(prefix: str) -> str:
    return prefix + "".join(random.choices(string.ascii_letters + string.digits, k=29))


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One generated token and the distributions it came from."""

    token_id: int
    raw: torch.Tensor  # [vocab] float64 log_softmax of the model's logits
    processed: torch.Tensor  # [vocab] float64 log_softmax after the request's processors


@dataclass(frozen=True)
class Generation:
    """A prompt's own logprobs and the tokens generated after it."""

    prompt_logprobs: torch.Tensor  # [n_prompt - 1, vocab] raw logprobs predicting tokens 1..n-1
    steps: list[Step]
    stopped: bool  # the last step is a stop (EOS) token

    @property
    def emitted(self) -> list[Step]:
        """Steps that OpenAI shows: all but a final stop token."""
        return self.steps[:-1] if self.stopped else self.steps


@functools.cache
def _load_model(model_dir: Path) -> _Model:
    # Tests start many servers on the same checkpoint; load it once per process.
    return _Model(model_dir)


@functools.cache
def _load_tokenizer(model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(model_dir)


class _Model:
    """A causal LM on CPU in fp32; one request at a time (servers sharing it share the lock)."""

    def __init__(self, model_dir: Path) -> None:
        was_enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        finally:
            if was_enabled:
                hf_logging.enable_progress_bar()
        self.model.eval()
        eos = self.model.generation_config.eos_token_id
        self.stop_ids = frozenset([] if eos is None else eos if isinstance(eos, list) else [eos])
        # Recent transformers renamed the KV-cache argument (and output field) to `cache`.
        forward_params = inspect.signature(self.model.forward).parameters
        self._cache_name = "cache" if "cache" in forward_params else "past_key_values"
        self._lock = threading.Lock()

    @torch.inference_mode()
    def generate(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        *,
        processors: LogitsProcessorList,
        sample: bool,
        generator: torch.Generator,
    ) -> Generation:
        """Greedy or sampled decoding with a KV cache (the path transformers' generate takes)."""
        ids = list(prompt_ids)
        steps: list[Step] = []
        with self._lock:
            out = self.model(input_ids=torch.tensor([ids]), use_cache=True)
            prompt_logprobs = torch.log_softmax(out.logits[0, :-1].double(), dim=-1)
            while len(steps) < max_new_tokens:
                logits = out.logits[0, -1:].float()  # [1, vocab]
                scores = processors(torch.tensor([ids]), logits.clone())
                if sample:
                    probs = torch.softmax(scores[0].double(), dim=-1)
                    token = int(torch.multinomial(probs, 1, generator=generator))
                else:
                    token = int(torch.argmax(scores[0]))
                raw = torch.log_softmax(logits[0].double(), dim=-1)
                steps.append(Step(token, raw, torch.log_softmax(scores[0].double(), dim=-1)))
                ids.append(token)
                if token in self.stop_ids:
                    break
                cache = {self._cache_name: getattr(out, self._cache_name)}
                out = self.model(input_ids=torch.tensor([[token]]), use_cache=True, **cache)
        stopped = bool(steps) and steps[-1].token_id in self.stop_ids
        return Generation(prompt_logprobs, steps, stopped)


def _generator(seed: int | None) -> torch.Generator:
    return torch.Generator().manual_seed(random.getrandbits(63) if seed is None else int(seed))


def _warpers(
    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> list[TemperatureLogitsWarper | TopKLogitsWarper | TopPLogitsWarper]:
    """Temperature, top-k, top-p in TGI's order (tokens.py), as transformers implements them."""
    warpers: list[TemperatureLogitsWarper | TopKLogitsWarper | TopPLogitsWarper] = []
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers


# --------------------------------------------------------------------------------------------
# Shared plumbing
# --------------------------------------------------------------------------------------------


class Refusal(Exception):
    """An error answer: status, body (JSON-able; a str is sent as text, None as nothing) and
    extra headers."""

    def __init__(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body
        self.headers = headers or {}


@dataclass
class _Settings:
    served_name: str
    api_key: str | None
    max_k: int
    refuse_logprobs: bool
    max_context: int
    partial_tokens: PartialTokens
    sampled_in_top: bool
    continue_final_message: bool = False


class _Core:
    """What every dialect shares: the model, the tokenizer (with a bytes cache) and settings."""

    def __init__(self, model: _Model, tokenizer: Any, settings: _Settings) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.special_ids = frozenset(getattr(tokenizer, "all_special_ids", ()))
        self._bytes: dict[int, bytes] = {}
        # Every conversation a chat route rendered, as it rendered it ({"role", "content"}).
        self.conversations: list[list[dict[str, str]]] = []

    def token_bytes(self, token_id: int) -> bytes:
        if token_id not in self._bytes:
            self._bytes[token_id] = token_bytes(self.tokenizer, token_id)
        return self._bytes[token_id]

    def joined_bytes(self, ids: Sequence[int]) -> bytes:
        return b"".join(self.token_bytes(i) for i in ids)

    def render_chat(self, messages: list[dict[str, str]], **template_options: bool) -> list[int]:
        """The ids of ``messages`` in the tokenizer's chat template, with the roles received (as
        a chat server renders a conversation); recorded in ``conversations``."""
        self.conversations.append([dict(m) for m in messages])
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, **template_options)
        return encode_text(self.tokenizer, text, add_special_tokens=False)

    def token_string(self, token_id: int, *, bytes_prefix: str) -> str:
        mode = self.settings.partial_tokens
        return render_token(self.token_bytes(token_id), mode, bytes_prefix=bytes_prefix)


class _DialectBase(Protocol):
    routes: dict[tuple[str, str], Callable[[Any], Any]]
    generation_paths: frozenset[str]

    def authorize(self, method: str, path: str, headers: dict[str, str]) -> None: ...
    def injected(self, status: int, retry_after_ms: int) -> Refusal: ...
    def unknown_route(self, method: str, path: str) -> Refusal: ...
    def bad_json(self, error: str) -> Refusal: ...


# --------------------------------------------------------------------------------------------
# OpenAI (legacy completions and chat completions)
# --------------------------------------------------------------------------------------------

OPENAI_KEY_HELP = "You can find your API key at https://platform.openai.com/account/api-keys."
OPENAI_MISSING_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header "
    "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password field (with "
    "blank username) if you're accessing the API from your browser and are prompted for a "
    "username and password. You can obtain an API key from "
    "https://platform.openai.com/account/api-keys."
)
# Every other argument is refused, as OpenAI does (so vLLM-only extras are caught).
_COMPLETIONS_PARAM_NAMES = (
    "model prompt best_of echo frequency_penalty logit_bias logprobs max_tokens n "
    "presence_penalty seed stop stream stream_options suffix temperature top_p user"
)
_CHAT_PARAM_NAMES = (
    "model messages audio frequency_penalty function_call functions logit_bias logprobs "
    "max_completion_tokens max_tokens metadata modalities n parallel_tool_calls prediction "
    "presence_penalty prompt_cache_key reasoning_effort response_format safety_identifier seed "
    "service_tier stop store stream stream_options temperature tool_choice tools top_logprobs "
    "top_p user verbosity web_search_options"
)
COMPLETIONS_PARAMS = frozenset(_COMPLETIONS_PARAM_NAMES.split())
CHAT_PARAMS = frozenset(_CHAT_PARAM_NAMES.split())
# vLLM's chat-template extensions (its ChatCompletionRequest); with continue_final_message=True.
VLLM_CHAT_TEMPLATE_PARAMS = frozenset({"add_generation_prompt", "continue_final_message"})


_JSON_KINDS = {
    bool: "a boolean",
    float: "a decimal number",
    str: "a string",
    list: "an array",
    dict: "an object",
}


def mask_api_key(key: str) -> str:
    """OpenAI's echo of a wrong key: first 8 and last 4 characters around asterisks; short keys
    come back whole (seen: "sk-WRQsP****...xQBt", "sk-xxxxxx")."""
    if len(key) <= 12:
        return key
    return key[:8] + "*" * (len(key) - 12) + key[-4:]


def openai_error(
    status: int,
    message: str,
    *,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> Refusal:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return Refusal(status, body, headers)


class _OpenAIBase:
    generation_paths: frozenset[str] = frozenset()

    def __init__(self, core: _Core) -> None:
        self.core = core
        self.settings = core.settings
        self.routes: dict[tuple[str, str], Callable[[Any], Any]] = {
            ("GET", "/v1/models"): self.models
        }

    def authorize(self, method: str, path: str, headers: dict[str, str]) -> None:
        expected = self.settings.api_key
        if expected is None:
            return
        scheme, _, key = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise openai_error(401, OPENAI_MISSING_KEY)
        if key.strip() != expected:
            message = f"Incorrect API key provided: {mask_api_key(key.strip())}. {OPENAI_KEY_HELP}"
            raise openai_error(401, message, code="invalid_api_key")

    def injected(self, status: int, retry_after_ms: int) -> Refusal:
        if status == 429:
            message = (
                f"Rate limit reached for {self.settings.served_name} in organization "
                "org-dialectserver on requests per min (RPM): Limit 3, Used 3, Requested 1. "
                f"Please try again in {retry_after_ms}ms. Visit "
                "https://platform.openai.com/account/rate-limits to learn more."
            )
            headers = {
                "retry-after-ms": str(retry_after_ms),
                "retry-after": str(math.ceil(retry_after_ms / 1000)),
            }
            return openai_error(
                429, message, type_="requests", code="rate_limit_exceeded", headers=headers
            )
        if status == 500:
            message = "The server had an error while processing your request. Sorry about that!"
            return openai_error(500, message, type_="server_error")
        if status == 503:
            return openai_error(
                503, "The server is overloaded or not ready yet.", type_="server_error"
            )
        type_ = "server_error" if status >= 500 else "invalid_request_error"
        return openai_error(status, f"Injected failure (HTTP {status}).", type_=type_)

    def unknown_route(self, method: str, path: str) -> Refusal:
        return openai_error(404, f"Invalid URL ({method} {path})")

    def bad_json(self, error: str) -> Refusal:
        return openai_error(400, f"We could not parse the JSON body of your request. ({error})")

    def models(self, _body: Any) -> Json:
        model = {
            "id": self.settings.served_name,
            "object": "model",
            "created": 1_700_000_000,
            "owned_by": "system",
        }
        return {"object": "list", "data": [model]}

    def check_request(self, body: Json, allowed: frozenset[str]) -> None:
        """A missing model, unknown arguments, an unknown model, in OpenAI's order."""
        if not body.get("model"):
            raise openai_error(400, "you must provide a model parameter")
        for name in body:
            if name not in allowed:
                raise openai_error(400, f"Unrecognized request argument supplied: {name}")
        if body["model"] != self.settings.served_name:
            message = f"The model `{body['model']}` does not exist or you do not have access to it."
            raise openai_error(404, message, code="model_not_found")

    def check_logprobs_allowed(self) -> None:
        # OpenAI's answer to logprobs on o4-mini (deepeval PR #2184); other reasoning-model
        # surfaces answer 400 "logprobs are not supported with reasoning models."
        if self.settings.refuse_logprobs:
            message = "You are not allowed to request logprobs from this model"
            raise openai_error(403, message)

    def check_range(self, name: str, value: Any, maximum: int) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            kind = _JSON_KINDS.get(type(value), "null")
            raise openai_error(
                400,
                f"Invalid type for '{name}': expected an integer, but got {kind} instead.",
                param=name,
                code="invalid_type",
            )
        if value < 0:
            message = (
                f"Invalid '{name}': integer below minimum value. Expected a value >= 0, "
                f"but got {value} instead."
            )
            raise openai_error(400, message, param=name, code="integer_below_min_value")
        if value > maximum:
            message = (
                f"Invalid '{name}': integer above maximum value. Expected a value "
                f"<= {maximum}, but got {value} instead."
            )
            raise openai_error(400, message, param=name, code="integer_above_max_value")
        return value

    def sampling(self, body: Json) -> tuple[LogitsProcessorList, bool, torch.Generator]:
        """Temperature 0 is greedy; otherwise sample after temperature/top_p. OpenAI reports raw
        logprobs either way."""
        temperature = 1.0 if body.get("temperature") is None else float(body["temperature"])
        top_p = 1.0 if body.get("top_p") is None else float(body["top_p"])
        if temperature == 0:
            return LogitsProcessorList(), False, _generator(0)
        warpers = LogitsProcessorList(_warpers(temperature=temperature, top_p=top_p))
        return warpers, True, _generator(body.get("seed"))

    def top(self, logprobs: torch.Tensor, k: int) -> list[tuple[int, float]]:
        values, indices = torch.topk(logprobs, k)
        return list(zip(indices.tolist(), values.tolist(), strict=True))


class _OpenAICompletions(_OpenAIBase):
    generation_paths = frozenset({"/v1/completions"})

    def __init__(self, core: _Core) -> None:
        super().__init__(core)
        self.routes[("POST", "/v1/completions")] = self.completions

    def prompt_ids(self, prompt: Any) -> list[int]:
        # A batch (list of strings / list of id lists) is answered for its first prompt only.
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = encode_text(self.core.tokenizer, prompt, add_special_tokens=False)
        elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
        else:
            raise openai_error(
                400, "Invalid prompt: expected a string or an array of integers.", param="prompt"
            )
        if not ids:
            raise openai_error(400, "Invalid prompt: the prompt must not be empty.", param="prompt")
        return ids

    def completions(self, body: Json) -> Json:
        self.check_request(body, COMPLETIONS_PARAMS)
        ids = self.prompt_ids(body.get("prompt"))
        k = body.get("logprobs")
        if k is not None:
            self.check_logprobs_allowed()
            k = self.check_range("logprobs", k, self.settings.max_k)
        max_tokens = body.get("max_tokens")
        max_tokens = OPENAI_DEFAULT_MAX_TOKENS if max_tokens is None else int(max_tokens)
        limit = self.settings.max_context
        if len(ids) + max_tokens > limit:
            message = (
                f"This model's maximum context length is {limit} tokens, however you requested "
                f"{len(ids) + max_tokens} tokens ({len(ids)} in your prompt; {max_tokens} for the "
                "completion). Please reduce your prompt; or completion length."
            )
            raise openai_error(400, message)
        processors, sample, generator = self.sampling(body)
        echo = bool(body.get("echo"))
        choices, generated = [], 0
        for index in range(int(body.get("n") or 1)):
            generation = self.core.model.generate(
                ids, max_tokens, processors=processors, sample=sample, generator=generator
            )
            generated += len(generation.steps)
            choices.append(self.choice(index, ids, generation, k, echo))
        return {
            "id": _random_id("cmpl-"),
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.settings.served_name,
            "choices": choices,
            "usage": {
                "prompt_tokens": len(ids),
                "completion_tokens": generated,
                "total_tokens": len(ids) + generated,
            },
        }

    def choice(
        self, index: int, ids: list[int], generation: Generation, k: int | None, echo: bool
    ) -> Json:
        emitted = [s.token_id for s in generation.emitted]
        text = self.core.joined_bytes((ids if echo else []) + emitted)
        return {
            "text": text.decode("utf-8", errors="replace"),
            "index": index,
            "logprobs": None if k is None else self.logprobs(ids, generation, k, echo),
            "finish_reason": "stop" if generation.stopped else "length",
        }

    def logprobs(self, ids: list[int], generation: Generation, k: int, echo: bool) -> Json:
        # (token id, its logprob, the distribution it was drawn from); the first prompt token
        # of an echo has no distribution.
        rows: list[tuple[int, torch.Tensor | None]] = []
        if echo:
            rows.append((ids[0], None))
            rows += [(t, generation.prompt_logprobs[i]) for i, t in enumerate(ids[1:])]
        rows += [(s.token_id, s.raw) for s in generation.emitted]
        pieces = [self.core.token_bytes(t) for t, _ in rows]
        return {
            "tokens": [self.core.token_string(t, bytes_prefix="bytes:") for t, _ in rows],
            "token_logprobs": [None if lp is None else float(lp[t]) for t, lp in rows],
            "top_logprobs": [None if lp is None else self.top_dict(lp, k, t) for t, lp in rows],
            "text_offset": char_offsets(b"" if echo else self.core.joined_bytes(ids), pieces),
        }

    def top_dict(self, logprobs: torch.Tensor, k: int, chosen: int) -> dict[str, float]:
        """The k best as {token string: logprob}, plus the chosen token (so k+1 can come back).
        Tokens that render alike collapse onto one key, keeping the higher logprob."""
        pairs = self.top(logprobs, k)
        if self.settings.sampled_in_top and chosen not in {t for t, _ in pairs}:
            pairs.append((chosen, float(logprobs[chosen])))
        out: dict[str, float] = {}
        for token_id, logprob in pairs:
            out.setdefault(self.core.token_string(token_id, bytes_prefix="bytes:"), logprob)
        return out


class _OpenAIChat(_OpenAIBase):
    generation_paths = frozenset({"/v1/chat/completions"})

    def __init__(self, core: _Core) -> None:
        super().__init__(core)
        self.routes[("POST", "/v1/chat/completions")] = self.chat

    def prompt_ids(
        self, messages: Any, template_options: dict[str, bool] | None = None
    ) -> list[int]:
        if not isinstance(messages, list) or not messages:
            raise openai_error(
                400,
                "Missing required parameter: 'messages'.",
                param="messages",
                code="missing_required_parameter",
            )
        plain = [
            {"role": m.get("role", "user"), "content": _text_content(m.get("content"))}
            for m in messages
        ]
        # OpenAI does not continue a trailing assistant message: a new assistant turn always
        # starts. vLLM's continue_final_message renders the conversation open-ended instead.
        options = {"add_generation_prompt": True} | (template_options or {})
        return self.core.render_chat(plain, **options)

    def template_options(self, body: Json) -> dict[str, bool]:
        """vLLM's checks and defaults for its chat-template extensions."""
        if not self.settings.continue_final_message:
            return {}
        if body.get("continue_final_message") and body.get("add_generation_prompt"):
            message = (
                "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
            )
            raise openai_error(400, message)
        return {
            "add_generation_prompt": bool(body.get("add_generation_prompt", True)),
            "continue_final_message": bool(body.get("continue_final_message", False)),
        }

    def chat(self, body: Json) -> Any:
        if body.get("stream"):
            from tests.support.hosted import stream_chat  # hosted.py builds on this module

            return stream_chat(self, body)
        extensions = VLLM_CHAT_TEMPLATE_PARAMS if self.settings.continue_final_message else set()
        self.check_request(body, CHAT_PARAMS | extensions)
        ids = self.prompt_ids(body.get("messages"), self.template_options(body))
        want_logprobs = bool(body.get("logprobs"))
        k = body.get("top_logprobs")
        if k is not None and not want_logprobs:
            message = "The 'top_logprobs' parameter is only allowed when 'logprobs' is enabled."
            raise openai_error(400, message, param="top_logprobs")
        if want_logprobs:
            self.check_logprobs_allowed()
        k = 0 if k is None else self.check_range("top_logprobs", k, self.settings.max_k)
        limit = self.settings.max_context
        if len(ids) > limit:
            message = (
                f"This model's maximum context length is {limit} tokens. However, your messages "
                f"resulted in {len(ids)} tokens. Please reduce the length of the messages."
            )
            raise openai_error(400, message, param="messages", code="context_length_exceeded")
        requested = body.get("max_completion_tokens", body.get("max_tokens"))
        max_tokens = limit - len(ids) if requested is None else int(requested)
        if len(ids) + max_tokens > limit:
            message = (
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(ids) + max_tokens} tokens ({len(ids)} in the messages, {max_tokens} in the "
                "completion). Please reduce the length of the messages or completion."
            )
            raise openai_error(400, message, param="messages", code="context_length_exceeded")
        processors, sample, generator = self.sampling(body)
        choices, generated = [], 0
        for index in range(int(body.get("n") or 1)):
            generation = self.core.model.generate(
                ids, max_tokens, processors=processors, sample=sample, generator=generator
            )
            generated += len(generation.steps)
            choices.append(self.choice(index, generation, k if want_logprobs else None))
        return {
            "id": _random_id("chatcmpl-"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.settings.served_name,
            "choices": choices,
            "usage": {
                "prompt_tokens": len(ids),
                "completion_tokens": generated,
                "total_tokens": len(ids) + generated,
                "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                "completion_tokens_details": {
                    "reasoning_tokens": 0,
                    "audio_tokens": 0,
                    "accepted_prediction_tokens": 0,
                    "rejected_prediction_tokens": 0,
                },
            },
            "service_tier": "default",
            "system_fingerprint": "fp_dialectsrv",
        }

    def choice(self, index: int, generation: Generation, k: int | None) -> Json:
        emitted = generation.emitted
        text = self.core.joined_bytes([s.token_id for s in emitted]).decode("utf-8", "replace")
        logprobs = None
        if k is not None:
            content = [
                {
                    **self.entry(s.token_id, float(s.raw[s.token_id])),
                    "top_logprobs": [self.entry(t, lp) for t, lp in self.top(s.raw, k)],
                }
                for s in emitted
            ]
            logprobs = {"content": content, "refusal": None}
        return {
            "index": index,
            "message": {"role": "assistant", "content": text, "refusal": None, "annotations": []},
            "logprobs": logprobs,
            "finish_reason": "stop" if generation.stopped else "length",
        }

    def entry(self, token_id: int, logprob: float) -> Json:
        return {
            "token": self.core.token_string(token_id, bytes_prefix=""),
            "logprob": logprob,
            "bytes": list(self.core.token_bytes(token_id)),
        }


def _text_content(content: Any) -> str:
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return "" if content is None else str(content)


# --------------------------------------------------------------------------------------------
# TGI
# --------------------------------------------------------------------------------------------


def tgi_error(status: int, message: str, error_type: str) -> Refusal:
    return Refusal(status, {"error": message, "error_type": error_type})


def tgi_validation(message: str) -> Refusal:
    return tgi_error(422, f"Input validation error: {message}", "validation")


class _TGITokenText:
    """TGI's decode_token, one generated token at a time: "" while a character is incomplete,
    then the whole character on the token that completes it."""

    def __init__(self, tokenizer: Any, prompt: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.all_ids = list(prompt)
        self.prefix_offset, self.read_offset = max(len(prompt) - 5, 0), len(prompt)

    def __call__(self, token_id: int) -> str:
        self.all_ids.append(token_id)
        prefix_text = decode_ids(
            self.tokenizer, self.all_ids[self.prefix_offset : self.read_offset]
        )
        new_text = decode_ids(self.tokenizer, self.all_ids[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.all_ids)
            return new_text[len(prefix_text) :]
        return ""


def tgi_token_texts(tokenizer: Any, prompt: Sequence[int], generated: Sequence[int]) -> list[str]:
    """Each generated token's text as TGI's decode_token streams it (``_TGITokenText``)."""
    text_of = _TGITokenText(tokenizer, prompt)
    return [text_of(token_id) for token_id in generated]


class _TGI:
    generation_paths = frozenset({"/generate", "/generate_stream"})

    def __init__(self, core: _Core) -> None:
        self.core = core
        self.settings = core.settings
        self.routes: dict[tuple[str, str], Callable[[Any], Any]] = {
            ("POST", "/generate"): self.generate,
            ("POST", "/generate_stream"): self.generate_stream,
            ("GET", "/info"): self.info,
            ("GET", "/health"): lambda _body: None,
        }

    @property
    def max_input_tokens(self) -> int:
        return self.settings.max_context - 1

    def authorize(self, method: str, path: str, headers: dict[str, str]) -> None:
        # TGI's --api-key guards the generation routes only, compares the whole header
        # case-insensitively and answers a bare 401 with no body.
        expected = self.settings.api_key
        if expected is None or method == "GET":
            return
        if headers.get("authorization", "").lower() != f"bearer {expected}".lower():
            raise Refusal(401, None)

    def injected(self, status: int, retry_after_ms: int) -> Refusal:
        known = {
            429: ("Model is overloaded", "overloaded"),  # no retry header: TGI sends none
            424: ("Request failed during generation: injected failure", "generation"),
            500: ("Incomplete generation", "incomplete_generation"),
            503: ("unhealthy", "healthcheck"),
        }
        message, error_type = known.get(status, (f"Injected failure (HTTP {status})", "injected"))
        return tgi_error(status, message, error_type)

    def unknown_route(self, method: str, path: str) -> Refusal:
        return Refusal(404, None)

    def bad_json(self, error: str) -> Refusal:
        # axum's own rejection: plain text, not an ErrorResponse.
        return Refusal(400, f"Failed to parse the request body as JSON: {error}")

    def info(self, _body: Any) -> Json:
        """GET /info as router/src/lib.rs serialises Info: there is no max_top_n_tokens field, so
        a client cannot learn the top_n_tokens cap except from a 422."""
        return {
            "model_id": self.settings.served_name,
            "model_sha": None,
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": 128,
            "max_best_of": 2,
            "max_stop_sequences": 4,
            "max_input_tokens": self.max_input_tokens,
            "max_total_tokens": self.settings.max_context,
            "validation_workers": 2,
            "max_client_batch_size": 4,
            "router": "text-generation-router",
            "version": TGI_VERSION,
            "sha": None,
            "docker_label": None,
        }

    def validate(self, inputs: Any, params: Json) -> tuple[list[int], int]:
        """validation.rs checks, in its order; returns (input ids, max_new_tokens)."""
        if params.get("temperature") is not None and params["temperature"] <= 0:
            raise tgi_validation("`temperature` must be strictly positive")
        if params.get("repetition_penalty") is not None and params["repetition_penalty"] <= 0:
            raise tgi_validation("`repetition_penalty` must be strictly positive")
        if params.get("top_p") is not None and not 0 < params["top_p"] < 1:
            raise tgi_validation("`top_p` must be > 0.0 and < 1.0")
        if params.get("top_k") is not None and params["top_k"] <= 0:
            raise tgi_validation("`top_k` must be strictly positive")
        max_new = params.get("max_new_tokens", TGI_DEFAULT_MAX_NEW_TOKENS)
        if max_new == 0:
            raise tgi_validation("`max_new_tokens` must be strictly positive")
        top_n = params.get("top_n_tokens") or 0
        if top_n > self.settings.max_k:
            raise tgi_validation(
                f"`top_n_tokens` must be >= 0 and <= {self.settings.max_k}. Given: {top_n}"
            )
        if not isinstance(inputs, str) or not inputs:
            raise tgi_validation("`inputs` cannot be empty")
        ids = encode_text(self.core.tokenizer, inputs, add_special_tokens=True)
        total = self.settings.max_context
        if max_new is None:  # an explicit null: up to the context, capped
            max_new = max(0, min(total - len(ids), TGI_DEFAULT_GENERATION_LENGTH))
        if len(ids) + max_new > total:
            raise tgi_validation(
                f"`inputs` tokens + `max_new_tokens` must be <= {total}. "
                f"Given: {len(ids)} `inputs` tokens and {max_new} `max_new_tokens`"
            )
        if len(ids) > self.max_input_tokens:
            raise tgi_validation(
                f"`inputs` must have less than {self.max_input_tokens} tokens. Given: {len(ids)}"
            )
        return ids, max_new

    def prepare(self, body: Json) -> tuple[list[int], int, LogitsProcessorList, bool, int]:
        """The request validated: (prompt ids, max_new_tokens, processors, sample, seed)."""
        params = body.get("parameters") or {}
        ids, max_new = self.validate(body.get("inputs"), params)
        temperature = params.get("temperature") or 1.0
        warpers = _warpers(temperature, params.get("top_k") or 0, params.get("top_p") or 1.0)
        processors = LogitsProcessorList()
        penalty = params.get("repetition_penalty") or 1.0
        if penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(penalty))
        processors.extend(warpers)
        # Any warper turns sampling on (tokens.py: sampling = do_sample or has_warpers).
        sample = bool(params.get("do_sample")) or bool(warpers)
        seed = params.get("seed")
        seed = random.getrandbits(63) if seed is None else int(seed)
        return ids, max_new, processors, sample, seed

    def generate(self, body: Json) -> Json:
        params = body.get("parameters") or {}
        ids, max_new, processors, sample, seed = self.prepare(body)
        generation = self.core.model.generate(
            ids, max_new, processors=processors, sample=sample, generator=_generator(seed)
        )
        generated = [s.token_id for s in generation.steps]
        text_ids = [t for t in generated if t not in self.core.special_ids]
        text = decode_ids(self.core.tokenizer, text_ids)
        if params.get("return_full_text"):
            text = body["inputs"] + text
        response: Json = {"generated_text": text}
        if params.get("details") or params.get("decoder_input_details"):
            response["details"] = self.details(ids, generation, params, seed if sample else None)
        return response

    def generate_stream(self, body: Json) -> Any:
        """One event per token, the last with ``generated_text`` (and, with ``details``, the
        stream's details); a refusal, validation included, is an event in the 200 answer."""
        # hosted.py builds on this module: imported here, where both are loaded.
        from tests.support.hosted import decode_steps, event_stream

        params = body.get("parameters") or {}
        try:
            if (params.get("best_of") or 1) != 1:
                raise tgi_validation("`best_of` != 1 is not supported when streaming tokens")
            if params.get("decoder_input_details"):
                raise tgi_validation(
                    "`decoder_input_details` == true is not supported when streaming tokens"
                )
            ids, max_new, processors, sample, seed = self.prepare(body)
        except Refusal as refusal:
            return event_stream(iter([refusal.body]), done=None)
        steps = decode_steps(
            self.core, ids, max_new, processors=processors, sample=sample,
            generator=_generator(seed),
        )  # fmt: skip
        events = self.events(body, ids, max_new, steps, seed if sample else None)
        return event_stream(events, done=None)  # TGI's stream just ends

    def events(
        self, body: Json, ids: list[int], max_new: int, steps: Iterator[Step], seed: int | None
    ) -> Iterator[Json]:
        """``StreamResponse`` per step: index, token, top_tokens (left out when none were
        asked for), and on the last ``generated_text`` and ``details``."""
        params = body.get("parameters") or {}
        top_n = params.get("top_n_tokens") or 0
        text_of = _TGITokenText(self.core.tokenizer, ids)
        generated: list[int] = []
        for index, step in enumerate(steps, start=1):
            generated.append(step.token_id)
            logprob = float(step.processed[step.token_id])
            token = self.token(step.token_id, logprob, text_of(step.token_id))
            event: Json = {"index": index, "token": token}
            if top_n:
                event["top_tokens"] = self.top_tokens(step.processed, top_n)
            event |= {"generated_text": None, "details": None}
            stopped = step.token_id in self.core.model.stop_ids
            if stopped or index == max_new:
                text_ids = [t for t in generated if t not in self.core.special_ids]
                text = decode_ids(self.core.tokenizer, text_ids)
                event["generated_text"] = (
                    body["inputs"] + text if params.get("return_full_text") else text
                )
                if params.get("details"):
                    event["details"] = {
                        "finish_reason": "eos_token" if stopped else "length",
                        "generated_tokens": index,
                        "seed": seed,
                        "input_length": len(ids),
                    }
            yield event

    def details(
        self, ids: list[int], generation: Generation, params: Json, seed: int | None
    ) -> Json:
        top_n = params.get("top_n_tokens") or 0
        texts = tgi_token_texts(self.core.tokenizer, ids, [s.token_id for s in generation.steps])
        tokens = [
            self.token(s.token_id, float(s.processed[s.token_id]), text)
            for s, text in zip(generation.steps, texts, strict=True)
        ]
        details: Json = {
            "finish_reason": "eos_token" if generation.stopped else "length",
            "generated_tokens": len(generation.steps),
            "seed": seed,
            "prefill": self.prefill(ids, generation) if params.get("decoder_input_details") else [],
            "tokens": tokens,
        }
        # The router pushes one (maybe empty) list per token, and skips the field only when the
        # outer list is empty.
        if generation.steps:
            details["top_tokens"] = [self.top_tokens(s.processed, top_n) for s in generation.steps]
        return details

    def token(self, token_id: int, logprob: float, text: str | None = None) -> Json:
        if text is None:
            text = decode_ids(self.core.tokenizer, [token_id])
        special = token_id in self.core.special_ids
        return {"id": token_id, "text": text, "logprob": _finite(logprob), "special": special}

    def top_tokens(self, logprobs: torch.Tensor, n: int) -> list[Json]:
        """batch_top_tokens: the n best, plus any tied with the n-th; masked (-inf) never."""
        if n == 0:
            return []
        nth = float(torch.topk(logprobs, n).values[-1])
        threshold = nth if math.isfinite(nth) else torch.finfo(logprobs.dtype).min
        count = int((logprobs >= threshold).sum())
        values, indices = torch.topk(logprobs, count)
        return [self.token(t, v) for t, v in zip(indices.tolist(), values.tolist(), strict=True)]

    def prefill(self, ids: list[int], generation: Generation) -> list[Json]:
        """decoder_input_details: every prompt token with its raw logprob; the first has none."""
        logprobs = [math.nan] + [
            float(generation.prompt_logprobs[i, t]) for i, t in enumerate(ids[1:])
        ]
        return [
            {"id": t, "text": decode_ids(self.core.tokenizer, [t]), "logprob": _finite(lp)}
            for t, lp in zip(ids, logprobs, strict=True)
        ]


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; without TCP_NODELAY, Nagle plus delayed ACKs
    # add ~40 ms to every answer.
    disable_nagle_algorithm = True
    server: _HTTPServer

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def _serve(self, method: str) -> None:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        path = self.path.split("?", 1)[0]
        status, extra_headers, payload = self.server.owner._dispatch(method, path, headers, raw)
        self.send_response(status)
        for name, value in extra_headers.items():
            self.send_header(name, value)
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    owner: DialectServer


class DialectServer:
    """One model served on 127.0.0.1 in one dialect, in a daemon thread.

    ``base_url`` is OpenAI-style for the OpenAI dialects (``http://127.0.0.1:PORT/v1``) and the
    server root for TGI (``http://127.0.0.1:PORT``). Use as a context manager or start()/stop().

    Beyond the real servers' knobs: ``partial_tokens`` picks how tokens that are not valid UTF-8
    on their own are spelled ("openai": ``bytes:\\xe6`` in completions, ``\\xe6`` in chat;
    "replacement": U+FFFD; "empty": ""), and ``sampled_in_top=False`` stops completions from
    adding the sampled token to ``top_logprobs`` (a 2024 gpt-3.5-turbo-instruct answer did not).
    ``continue_final_message=True`` (openai-chat) accepts vLLM's ``add_generation_prompt`` and
    ``continue_final_message``, so a partial assistant answer can be continued.
    """

    def __init__(
        self,
        dialect: Dialect,
        model_dir: str | Path,
        *,
        served_name: str = "tiny-base",
        api_key: str | None = None,
        max_k: int | None = None,
        tokenizer: Any = None,
        refuse_logprobs: bool = False,
        max_context: int = 2048,
        partial_tokens: PartialTokens = "openai",
        sampled_in_top: bool = True,
        continue_final_message: bool = False,
    ) -> None:
        if dialect not in DEFAULT_MAX_K:
            raise ValueError(f"dialect must be one of {sorted(DEFAULT_MAX_K)}, got {dialect!r}")
        if partial_tokens not in ("openai", "replacement", "empty"):
            raise ValueError(
                f"partial_tokens must be openai|replacement|empty, got {partial_tokens!r}"
            )
        chat_ready = tokenizer is None or hasattr(tokenizer, "apply_chat_template")
        if dialect == "openai-chat" and not chat_ready:
            raise ValueError("openai-chat needs a tokenizer with apply_chat_template")
        self.dialect = dialect
        self.model_dir = Path(model_dir)
        self.settings = _Settings(
            served_name=served_name,
            api_key=api_key,
            max_k=DEFAULT_MAX_K[dialect] if max_k is None else max_k,
            refuse_logprobs=refuse_logprobs,
            max_context=max_context,
            partial_tokens=partial_tokens,
            sampled_in_top=sampled_in_top,
            continue_final_message=continue_final_message,
        )
        self._tokenizer = tokenizer
        self.requests: list[tuple[str, dict[str, str], Any]] = []
        self._core: _Core | None = None
        self._failures: collections.deque[tuple[int, int]] = collections.deque()
        self._lock = threading.Lock()
        self._handler: _DialectBase | None = None
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("the server is not running; call start()")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        root = f"http://127.0.0.1:{self.port}"
        return root + URL_SUFFIX[self.dialect]

    @property
    def max_k(self) -> int:
        return self.settings.max_k

    @property
    def conversations(self) -> list[list[dict[str, str]]]:
        """Each conversation a chat route rendered, in order: the messages with the roles it
        received (``{"role", "content"}``; Gemini's ``model`` as ``assistant``, its
        ``systemInstruction`` as a first ``system`` message). Tests may clear it."""
        return self._core.conversations if self._core is not None else []

    def start(self) -> DialectServer:
        """Load the model (once) and start serving; returns self."""
        if self._httpd is not None:
            return self
        torch.set_num_threads(1)
        if self._handler is None:
            tokenizer = self._tokenizer
            if tokenizer is None:
                tokenizer = _load_tokenizer(self.model_dir.resolve())
            core = _Core(_load_model(self.model_dir.resolve()), tokenizer, self.settings)
            self._core = core
            self._handler = HANDLERS[self.dialect](core)
        self._httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},  # shutdown() waits up to one poll interval
            name=f"dialect-{self.dialect}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; a later start() serves again, on a new port."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join()
        self._httpd = self._thread = None

    def __enter__(self) -> DialectServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def fail_next(self, *statuses: int, retry_after_ms: int = 20) -> None:
        """Answer the next generation requests (one per status, in order) with these statuses, in
        the dialect's error shape. OpenAI 429s carry ``retry-after-ms`` and ``retry-after``
        (whole seconds, rounded up); TGI's carry no retry header."""
        with self._lock:
            self._failures.extend((status, retry_after_ms) for status in statuses)

    def _next_failure(self) -> tuple[int, int] | None:
        with self._lock:
            return self._failures.popleft() if self._failures else None

    def _dispatch(
        self, method: str, path: str, headers: dict[str, str], raw: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        assert self._handler is not None
        dialect = self._handler
        body, json_error = None, None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError as exc:
                json_error = str(exc)
        self.requests.append((path, headers, body))
        try:
            is_generation = method == "POST" and path in dialect.generation_paths
            if is_generation and (failure := self._next_failure()) is not None:
                raise dialect.injected(*failure)
            dialect.authorize(method, path, headers)
            route = dialect.routes.get((method, path))
            if route is None:
                raise dialect.unknown_route(method, path)
            if method == "POST" and (json_error is not None or not isinstance(body, dict)):
                raise dialect.bad_json(json_error or "expected a JSON object")
            result = route(body)
        except Refusal as refusal:
            return _answer(refusal.status, refusal.body, refusal.headers)
        except Exception:
            logger.exception("%s %s failed", method, path)
            refusal = dialect.injected(500, 0)
            return _answer(refusal.status, refusal.body, refusal.headers)
        return _answer(200, result)

    def __repr__(self) -> str:
        state = f"port {self.port}" if self._httpd is not None else "stopped"
        return f"DialectServer({self.dialect!r}, {self.settings.served_name!r}, {state})"


HANDLERS.update({"openai": _OpenAICompletions, "openai-chat": _OpenAIChat, "tgi": _TGI})


def _answer(
    status: int, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, payload): JSON, plain text for a str, nothing for None."""
    headers = dict(headers or {})
    if body is None:
        return status, headers, b""
    if isinstance(body, str):
        headers["content-type"] = "text/plain; charset=utf-8"
        return status, headers, body.encode()
    headers["content-type"] = "application/json"
    return status, headers, json.dumps(body, allow_nan=False).encode()
