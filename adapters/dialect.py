"""What every HTTP adapter shares: one request per step, and errors explained once.

An adapter subclass is a payload builder and a response parser (both pure, tested with literal
JSON) plus what is true of its dialect, as class attributes that ``connect``, discovery and the CLI
read; the flow around them — send, map errors to what the user should do — lives here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, ClassVar, TypedDict, Unpack

from proxyclient.adapters.base import (
    Capabilities,
    Continuation,
    Prompt,
    StreamedPosition,
    TopLogprobs,
)
from proxyclient.adapters.discovery import HUGE_K, dialect_hint
from proxyclient.adapters.http import HTTPTransport, error_message, status_error
from proxyclient.errors import (
    APIStatusError,
    BadRequestError,
    ContextLengthError,
    NotFoundError,
    ProxyClientError,
    ResponseFormatError,
    TopKTooLargeError,
)
from proxyclient.tokenizer import BaseTokenizer

logger = logging.getLogger(__name__)
# How servers word "k is over my cap", each with the cap as group 1.
_K_CAP = (
    re.compile(r"max(?:imum)? allowed:?\s*(-?\d+)", re.IGNORECASE),  # vLLM
    re.compile(r"(?:<=|less than or equal to|at most|maximum of|no more than)\s*(\d+)", re.I),
    re.compile(r"(?:between|range)\s*\[?\s*0\s*(?:,|and)\s*(\d+)", re.IGNORECASE),
)
_REFUSED = re.compile(r"logprobs.*(?:not allowed|not supported)|not allowed.*logprobs", re.I)
_K_WORDS = re.compile(r"logprob|top_n_tokens|n_probs", re.IGNORECASE)
# The last alternative is what vLLM 0.32 says when the prompt fills the context exactly: it
# shrinks max_tokens to the room left, which is 0.
_CONTEXT = re.compile(
    r"context length|context window|max_model_len|maximum model length|max_input_tokens|"
    r"max_total_tokens|max_tokens must be at least 1, got 0|exceeds the available context",
    re.IGNORECASE,
)


# How often ``DialectAdapter.resampled`` asks again for an answer that came back without logprobs.
RESAMPLE_ATTEMPTS = 8


def k_cap_in(message: str) -> int | None:
    """The cap on k that an error message states, or None."""
    if not _K_WORDS.search(message):
        return None
    for pattern in _K_CAP:
        if match := pattern.search(message):
            return int(match.group(1))
    return None


# What a parser raises when an answer has another shape than its dialect's (a key missing, a list
# where a dict should be, text where a number should be).
_SHAPE_ERRORS = (KeyError, IndexError, TypeError, AttributeError, ValueError, OverflowError)


# What a stream's parser gives for a chunk without positions (a role, finish or usage chunk).
NO_POSITIONS = Continuation((), (), ())


def checked_answer(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``parse``, with any answer it cannot read, or reads into something the engine cannot use
    (no candidates, ids that are no ids, logprobs that are no numbers), a ResponseFormatError:
    a broken 200, which the transport retries."""

    def run(body: Any) -> Any:
        try:
            answer = parse(body)
        except ProxyClientError:
            raise
        except _SHAPE_ERRORS as exc:
            raise ResponseFormatError(
                f"the answer does not have the expected shape ({type(exc).__name__}: {exc}): "
                f"{str(body)[:200]!r}"
            ) from None
        tops = answer.tops if isinstance(answer, Continuation) else (answer,)
        for top in tops:
            if isinstance(top, TopLogprobs):
                _check_top(top)
        if isinstance(answer, Continuation):
            sizes = {len(answer.tokens), len(answer.tops), len(answer.token_logprobs)}
            if len(sizes) > 1:
                raise ResponseFormatError(
                    f"the answer has {len(answer.tokens)} tokens, {len(answer.tops)} top-logprob "
                    f"entries and {len(answer.token_logprobs)} token logprobs"
                )
            if not all(t is None or _is_id(t) for t in answer.tokens):
                raise ResponseFormatError(f"the answer's tokens are not all ids: {answer.tokens}")
            if not all(lp is None or _is_number(lp) for lp in answer.token_logprobs):
                raise ResponseFormatError("the answer's token logprobs are not all numbers")
        return answer

    return run


def _check_top(top: TopLogprobs) -> None:
    if len(top.token_ids) != len(top.logprobs) or not len(top) + top.unresolved:
        raise ResponseFormatError("the answer holds no top logprobs at a position")
    ids, logprobs = top.token_ids, top.logprobs
    # What TopLogprobs.from_pairs makes, checked in one pass each (this runs per position).
    plain_ids = all([type(i) is int for i in ids]) and min(ids, default=0) >= 0
    if plain_ids and all([type(lp) is float and lp < math.inf for lp in logprobs]):
        return
    if not all(_is_id(i) for i in top.token_ids):
        raise ResponseFormatError(f"the answer's top logprobs name no token ids: {top.token_ids}")
    if not all(_is_number(lp) and lp < math.inf for lp in top.logprobs):
        raise ResponseFormatError(f"the answer's top logprobs are not all numbers: {top.logprobs}")


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


class DialectOptions(TypedDict, total=False):
    """The options every DialectAdapter takes (for subclasses that add their own)."""

    tokenizer: BaseTokenizer | None
    max_k: int | None


class DialectAdapter:
    """Base of the HTTP adapters. Subclasses set ``dialect`` and ``default_capabilities``,
    implement ``build_request`` and ``parse_response``, and override the dialect facts below where
    the defaults do not hold; one with options of its own extends ``__init__``."""

    dialect: ClassVar[str] = ""  # its name in the registry and in --api
    # The server names tokens by text, so the adapter needs the base's tokenizer to map them to ids.
    needs_tokenizer: ClassVar[bool] = False
    # The ks ``discovery.probe`` asks for after k = 1, in order; the first one answered sets max_k.
    probe_ks: ClassVar[tuple[int, ...]] = (HUGE_K,)
    # How the server's operator raises its cap on k, ending a k-too-large error ("" = no advice).
    raise_k_cap: ClassVar[str] = ""
    # Other servers (named as ``sniff_dialect`` names them) that also answer this dialect.
    also_served_by: ClassVar[frozenset[str]] = frozenset()
    # Hosted providers: where the API lives when no base URL is given, the environment variable
    # their users keep the key in, and the header it travels in ("{key}" is replaced).
    default_base_url: ClassVar[str | None] = None
    api_key_env: ClassVar[str | None] = None
    api_key_header: ClassVar[tuple[str, str]] = ("Authorization", "Bearer {key}")
    # What the dialect can do, with its default max_k (None: not known until probed). Each
    # instance gets its own copy, with the max_k it is given; None here: the subclass sets
    # ``capabilities`` itself.
    default_capabilities: ClassVar[Capabilities | None] = None
    capabilities: Capabilities
    tokenizer: BaseTokenizer | None  # the base's; None when none was given and none is needed

    def __init__(
        self, transport: HTTPTransport, model: str, **options: Unpack[DialectOptions]
    ) -> None:
        """``max_k``, where given (None included: not known until probed), replaces the default
        capabilities' own."""
        unknown = options.keys() - DialectOptions.__optional_keys__
        if unknown:
            raise TypeError(f"{type(self).__name__} takes no option {', '.join(sorted(unknown))}")
        self.transport = transport
        self.name = model
        self.tokenizer = options.get("tokenizer")
        # The cap on k the server showed by answering fewer top logprobs than asked, without
        # saying so (``note_top_size``); None until seen.
        self.k_cap_seen: int | None = None
        caps = self.default_capabilities
        if caps is not None:
            self.capabilities = dataclasses.replace(caps, max_k=options.get("max_k", caps.max_k))
        elif "max_k" in options:
            raise TypeError(f"{type(self).__name__} has no default_capabilities to set max_k in")

    @classmethod
    def default_tokenizer(cls, model: str) -> str | None:
        """The tokenizer (as ``load_base_tokenizer`` takes it) that the model's name implies, or
        None when the name says nothing."""
        return None

    def note_top_size(self, returned: int, k: int) -> None:
        """Take an answer's size at one position: ``returned`` top-logprob entries (as sent,
        sentinels and duplicates included) where ``k`` were asked for. Fewer than asked, where
        the vocabulary has more tokens than that (no natural shortfall), is a cap the server
        applies without saying so (Azure OpenAI deployments answer 5 where 20 are asked): it
        becomes ``capabilities.max_k`` (which ``inspect`` and later generations' default k
        read), with one warning, so that the loss is never silent."""
        if k <= 0 or returned >= k or returned <= 0:
            return
        if self.k_cap_seen is not None and returned >= self.k_cap_seen:
            return
        vocab = len(self.tokenizer.vocab) if self.tokenizer is not None else None
        if vocab is None or vocab <= returned:
            return
        self.k_cap_seen = returned
        max_k = self.capabilities.max_k
        if max_k is None or max_k < 0 or max_k > returned:
            self.capabilities = dataclasses.replace(self.capabilities, max_k=returned)
        logger.warning(
            "%s: model %r answered %d top logprobs where %d were asked for (its vocabulary has "
            "%d tokens), so the server caps k at %d without saying so (Azure OpenAI does): "
            "max_k is now %d; pass base_k=%d or less to ask for what it gives",
            self.transport.base_url,
            self.name,
            returned,
            k,
            vocab,
            returned,
            returned,
            returned,
        )

    @classmethod
    def served_by(cls, server: str) -> bool:
        """Whether a server that ``sniff_dialect`` calls ``server`` answers this dialect."""
        return server == cls.dialect or server in cls.also_served_by

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.name!r}, transport={self.transport!r})"

    def build_request(self, prompt: Prompt, k: int) -> tuple[str, dict[str, Any]]:
        raise NotImplementedError

    def parse_response(self, body: Any, prompt: Prompt, k: int) -> TopLogprobs:
        raise NotImplementedError

    # Speculation (see Capabilities.drafts / prompt_scoring): dialects that can, override these.
    def build_generate(
        self, prompt: Prompt, k: int, n: int, *, greedy: bool, seed: int | None
    ) -> tuple[str, dict[str, Any]]:
        raise NotImplementedError(f"the {self.dialect} adapter cannot draft")

    def parse_generate(self, body: Any, prompt: Prompt, k: int) -> Continuation:
        raise NotImplementedError(f"the {self.dialect} adapter cannot draft")

    def build_score(
        self, prompt: Prompt, continuation: Sequence[int], k: int
    ) -> tuple[str, dict[str, Any]]:
        raise NotImplementedError(f"the {self.dialect} adapter cannot score a continuation")

    def parse_score(
        self, body: Any, prompt: Prompt, continuation: Sequence[int], k: int
    ) -> Continuation:
        raise NotImplementedError(f"the {self.dialect} adapter cannot score a continuation")

    async def top_logprobs(self, prompt: Prompt, k: int) -> TopLogprobs:
        path, payload = self.build_request(prompt, k)
        return await self.send(path, payload, prompt, k)

    async def resampled(
        self,
        prompt: Prompt,
        k: int,
        seeded: Callable[[dict[str, Any], int], dict[str, Any]],
        empty: type[Exception],
        failure: str,
    ) -> TopLogprobs:
        """``top_logprobs`` for a server that may sample a token it gives no logprobs for (the
        parser raises ``empty``): asked again with the seeds 0, 1, ... (``seeded(payload,
        seed)`` is the request with one), ``RESAMPLE_ATTEMPTS`` times; then a
        ResponseFormatError that says ``failure``."""
        path, payload = self.build_request(prompt, k)
        for seed in range(RESAMPLE_ATTEMPTS):
            try:
                return await self.send(path, seeded(payload, seed), prompt, k)
            except empty:
                continue
        raise ResponseFormatError(failure)

    async def generate(
        self, prompt: Prompt, k: int, n: int, *, greedy: bool, seed: int | None = None
    ) -> Continuation:
        """Up to ``n`` tokens after ``prompt`` (greedy, or sampled at temperature 1 with
        ``seed``) and the top-k before each, from one request."""
        path, payload = self.build_generate(prompt, k, n, greedy=greedy, seed=seed)
        return await self.send(
            path,
            payload,
            prompt,
            k,
            parse=lambda body: self.parse_generate(body, prompt, k),
            tokens=len(prompt.ids) + n,
        )

    async def score(self, prompt: Prompt, continuation: Sequence[int], k: int) -> Continuation:
        """The top-k before each token of ``continuation`` and before the one after it."""
        path, payload = self.build_score(prompt, continuation, k)
        scored = Prompt((*prompt.ids, *continuation), prompt.prompt_len)
        return await self.send(
            path,
            payload,
            scored,
            k,
            parse=lambda body: self.parse_score(body, prompt, continuation, k),
        )

    async def send(
        self,
        path: str,
        payload: dict[str, Any],
        prompt: Prompt,
        k: int,
        parse: Callable[[Any], Any] | None = None,
        tokens: int | None = None,
    ) -> Any:
        """POST one request and parse it (``parse_response`` unless ``parse`` is given), with
        errors explained. ``tokens``: its cost against a tokens-per-minute limit (default: the
        prompt and one generated token)."""
        what = f"model {self.name!r}, {len(prompt.ids)} prompt tokens, k={k}"
        cost = len(prompt.ids) + 1 if tokens is None else tokens
        if parse is None:
            parse = lambda body: self.parse_response(body, prompt, k)  # noqa: E731
        try:
            # Parsed inside the transport's retries: a 200 the parser refuses is retried.
            return await self.transport.request_json(
                "POST", path, payload, what=what, tokens=cost, parse=checked_answer(parse)
            )
        except APIStatusError as exc:
            raise await self.explain(exc, prompt, k) from None
        except ResponseFormatError as exc:
            hint = await dialect_hint(self.transport, type(self))
            if not hint:
                raise
            raise ResponseFormatError(f"{exc}{hint}") from None

    async def stream_positions(
        self,
        path: str,
        payload: dict[str, Any],
        prompt: Prompt,
        k: int,
        n: int,
        parse: Callable[[Any, int], Continuation | None],
        *,
        error_status: Callable[[Any], int] | None = None,
        ndjson: bool = False,
    ) -> AsyncIterator[StreamedPosition]:
        """POST ``payload`` (a streamed request of up to ``n`` tokens) and yield each position as
        its chunk arrives: ``parse(chunk, positions so far)`` reads a chunk with the dialect's
        parser (``NO_POSITIONS`` for a chunk that holds none; None: the stream ends before it).
        ``error_status``: the HTTP status an error the server sends inside the stream
        (``{"error": ...}``) stands for. A refusal is explained as
        any request's; closing the iterator closes the HTTP stream, so the server stops."""
        what = f"model {self.name!r}, {len(prompt.ids)} prompt tokens, k={k}, stream of {n}"
        seen = 0
        read = checked_answer(lambda chunk: parse(chunk, seen))
        chunks = self.transport.stream_json(
            "POST", path, payload, what=what, tokens=len(prompt.ids) + n, ndjson=ndjson
        )
        try:
            async for chunk in chunks:
                if error_status is not None and isinstance(chunk, dict) and "error" in chunk:
                    event = json.loads(self.transport.redact(json.dumps(chunk)))
                    status = error_status(event)
                    sent = f"POST {self.transport.base_url}{path} ({what})"
                    message = f"{sent}: HTTP {status}: {error_message(event)}"
                    raise status_error(status, message, event)
                part = read(chunk)
                if part is None:
                    return
                for token, top, logprob in zip(
                    part.tokens, part.tops, part.token_logprobs, strict=True
                ):
                    seen += 1
                    yield StreamedPosition(token, logprob, top)
        except APIStatusError as exc:
            raise await self.explain(exc, prompt, k) from None
        finally:
            await chunks.aclose()

    async def explain(self, exc: APIStatusError, prompt: Prompt, k: int) -> ProxyClientError:
        """The error with what to do about it."""
        text = str(exc)
        if isinstance(exc, BadRequestError):
            server_max = k_cap_in(text)
            if server_max is not None:
                fix = f"pass base_k={server_max} or less" if server_max > 0 else ""
                return TopKTooLargeError(
                    f"{text}\nThe server allows at most {server_max} top logprobs and {k} were "
                    f"asked for: {fix or 'ask for fewer'}"
                    + (f", or {self.raise_k_cap}." if self.raise_k_cap else "."),
                    status_code=exc.status_code,
                    body=exc.body,
                    server_max=server_max,
                )
            if _CONTEXT.search(text):
                return ContextLengthError(
                    f"{text}\nThe prompt plus the tokens generated so far ({len(prompt.ids)} "
                    f"tokens) no longer fit the server's context window: shorten the prompt or "
                    f"lower max_new_tokens.",
                    status_code=exc.status_code,
                    body=exc.body,
                )
        if exc.status_code in (400, 403) and _REFUSED.search(text):
            return type(exc)(
                f"{text}\nThis model does not give logprobs (OpenAI's reasoning models refuse "
                f"them), and proxy-tuning needs them: use another base model.",
                status_code=exc.status_code,
                body=exc.body,
            )
        hint = ""
        if exc.status_code in (404, 405):
            hint = await dialect_hint(self.transport, type(self))
        if isinstance(exc, NotFoundError):
            return NotFoundError(
                f"{text} — {hint.strip() or await self._served_models_hint()}",
                status_code=exc.status_code,
                body=exc.body,
            )
        if hint:
            return type(exc)(f"{text}{hint}", status_code=exc.status_code, body=exc.body)
        return exc

    async def _served_models_hint(self) -> str:
        try:
            body = await self.transport.request_json("GET", "/models", what="list models")
            names = [m["id"] for m in body.get("data", [])]
        except (ProxyClientError, KeyError, TypeError, AttributeError):
            base_url = self.transport.base_url
            found = await self.transport.peek(f"{base_url}/v1/models")
            if not base_url.endswith("/v1") and isinstance(found, dict) and "data" in found:
                return f"the API is under /v1 there: pass base_url={base_url}/v1."
            return "check --base-model and --api (GET /v1/models lists an OpenAI-style server's)."
        return f"the server serves {names}; pass one of them as --base-model."

    async def aclose(self) -> None:
        await self.transport.aclose()


class TextPromptAdapter(DialectAdapter):
    """Base of the dialects whose servers take the prompt as text (tgi, together, ollama): the
    ids the loop tracks are decoded, the server tokenizes them again, and where its split
    differs from ours every answer for that prompt is marked ``retokenized``."""

    needs_tokenizer = True
    tokenizer: BaseTokenizer

    def prompt_text(self, prompt: Prompt) -> str:
        return self.tokenizer.decode(prompt.ids)

    def retokenized(self, prompt: Prompt) -> bool:
        """Whether the server, tokenizing the prompt's text, splits it differently from our
        ids."""
        return self.tokenizer.encode(self.prompt_text(prompt)) != list(prompt.ids)
