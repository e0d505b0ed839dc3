"""Google's Gemini API: ``POST {base}/models/{model}:generateContent`` with
``generationConfig.responseLogprobs: true`` and ``logprobs: k`` (k <= 20).

Sources, read 2026-11-30: the API reference https://ai.google.dev/api/generate-content
(``GenerationConfig.logprobs``: "The number must be in the range of [0, 20]";
``logprobsResult.topCandidates[]``, one per decoding step, each ``candidates[]`` of ``token``,
``tokenId``, ``logProbability``, and ``chosenCandidates[]``; ``usageMetadata``), the error table
https://ai.google.dev/gemini-api/docs/troubleshooting, and
https://ai.google.dev/gemini-api/docs/latest-model (from Gemini 3.6 Flash and 3.5 Flash-Lite on,
"Prefilling model turns is no longer supported": a request that ends with a ``model`` turn is
answered 400). Vertex AI's generateContent answers alike: give its
``https://{region}-aiplatform.googleapis.com/v1/projects/P/locations/L/publishers/google`` as the
base URL (with an express-mode API key; an OAuth access token needs ``Authorization: Bearer``).

A text prompt goes as the text of a ``user`` turn (Gemini takes no token ids); a chat prompt as its
turns, ``user`` and ``model`` (the assistant's), with its system messages' text as
``systemInstruction`` (the same reference: "Developer set system instruction(s). Currently, text
only."; Gemini has no system role inside ``contents``, so every system message goes there). A chat
prompt that ends with an assistant turn is refused: Gemini would continue that turn, not answer it.
The answer so far (a chat prompt's response prefix, then the generated tokens' text) goes as a
trailing ``model`` turn, which models that allow it continue. Whether the model does is asked
once, on the first request, with a two-turn exchange of a few tokens; a model that refuses
(400 "Requests ending with a model turn are not supported ...") scores only the first token after
the prompt (``multi_step=False``: ``ProxyTuner.choose`` or ``max_new_tokens=1``), and a warning
says so. ``continue_model_turn=True/False`` skips the question.

Tokens come back with their text and ``tokenId``, in the model's own vocabulary, which Google
does not publish and which the tokenizer at hand (Gemma's, or the proxies') need not share. So the
first answer is checked (``token_ids=None``): where every ``tokenId`` that has a whole text
decodes to that text in the base tokenizer given (``needs_tokenizer``), the ids are the base's and
are used (``ids_in_response``), so a token that is part of a character, whose text is U+FFFD, is
still known and can be chosen and followed. Otherwise (another vocabulary, ids left out) a warning
says why, once, and tokens are named by their text in whatever tokenizer is given; those that are
part of a character then count as unresolved. ``token_ids=True/False`` skips the check.

Which models give logprobs (issue 24's reading of Google's model pages, 2026-12-03): Gemini 2.0
models do; 2.5 models often only on Vertex AI; Gemini 3.x models do not. A refusal says which
applies to the model asked for.

Google does not say whether its logprobs come before or after its sampling settings; we send
temperature 1 and topP 1, so they match the model's own either way (``logprobs="processed"``, as
for TGI). One request can also generate several tokens with the top-k at each (``drafts``): greedy
is temperature 0; a sampled draft is temperature 1 with ``seed``. A model that thinks before it
answers (``usageMetadata.thoughtsTokenCount``) gives the logprobs of its answer after the thoughts,
not of the token after the prompt: that is an error (``thinking_budget=0`` turns thinking off on
models that allow it).

Streamed drafts: the same request to ``models/{model}:streamGenerateContent?alt=sse`` (the same
reference: "a stream of GenerateContentResponse instances"; ``alt=sse`` sends each as a
server-sent event, and the stream just ends, with no ``[DONE]``). Each event's
``candidates[0].logprobsResult`` holds the positions of the tokens it adds, read as an answer's;
``usageMetadata`` comes with every event, but a stream closed early has no last one, so the tokens
received are what is counted. A model that cannot continue a model turn takes one step only, so
it neither drafts nor streams.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from collections.abc import AsyncIterator
from typing import Any, Unpack

from proxyclient.adapters.base import (
    Capabilities,
    Continuation,
    Prompt,
    ServerUsage,
    StreamedPosition,
    TopLogprobs,
)
from proxyclient.adapters.dialect import DialectAdapter, DialectOptions
from proxyclient.adapters.http import HTTPTransport
from proxyclient.adapters.openai_wire import chat_conversation, stream_positions
from proxyclient.errors import (
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    BaseModelError,
    ConfigError,
    ContextLengthError,
    NotFoundError,
    ProxyClientError,
    ResponseFormatError,
    TopKTooLargeError,
)
from proxyclient.tokenizer import BaseTokenizer
from proxyclient.vocab import bytes_of_token_string

logger = logging.getLogger(__name__)

GEMINI_MAX_LOGPROBS = 20
# The one question whether a model continues a trailing model turn: a few tokens each way.
CONTINUATION_PROBE: list[dict[str, Any]] = [
    {"role": "user", "parts": [{"text": "Say hello."}]},
    {"role": "model", "parts": [{"text": "Hello"}]},
]

_MODEL_TURN = re.compile(r"ending with a model turn", re.IGNORECASE)
_LOGPROBS_REFUSED = re.compile(
    r"logprobs? (?:is |are )?not (?:enabled|supported|allowed)|"
    r"not (?:allowed|permitted) to (?:request|use) logprobs",
    re.IGNORECASE,
)
# Google's wording for a value out of range, recorded for maxOutputTokens ("Unable to submit
# request because it has a maxOutputTokens value of 70000 but the supported range is from 1
# (inclusive) to 65537 (exclusive)"); the cap on k is the exclusive end, less one.
_K_RANGE = re.compile(
    r"logprobs value of -?\d+ but the supported range is from -?\d+ \(inclusive\) to (\d+) "
    r"\(exclusive\)",
    re.IGNORECASE,
)
_CONTEXT = re.compile(r"input token count .* exceeds the maximum number of tokens", re.I)
_BAD_KEY = re.compile(r"API key not (?:valid|found)|API_KEY_INVALID|unregistered callers", re.I)


class GeminiGenerateContent(DialectAdapter):
    dialect = "gemini"
    needs_tokenizer = True
    default_base_url = "https://generativelanguage.googleapis.com/v1beta"
    api_key_env = "GEMINI_API_KEY"
    api_key_header = ("x-goog-api-key", "{key}")
    tokenizer: BaseTokenizer

    # multi_step, drafts and streams until the model is known not to continue a model turn
    # (_one_step).
    default_capabilities = Capabilities(
        max_k=GEMINI_MAX_LOGPROBS,
        token_id_prompts=False,
        ids_in_response=False,  # until tokenId is seen to be the base tokenizer's (token_ids)
        prompt_scoring=False,  # no echo: the prompt's own positions have no logprobs
        logprobs="processed",
        multi_step=True,
        drafts=True,
        streams=True,
    )

    def __init__(
        self,
        transport: HTTPTransport,
        model: str,
        *,
        continue_model_turn: bool | None = None,
        thinking_budget: int | None = None,
        token_ids: bool | None = None,
        **options: Unpack[DialectOptions],
    ) -> None:
        super().__init__(transport, model, **options)
        self.thinking_budget = thinking_budget
        # Whether the answers' tokenId are the base tokenizer's ids: None until the first answer
        # that can tell is checked (_check_token_ids).
        self.token_ids: bool | None = None
        if token_ids is not None:
            self._use_token_ids(token_ids)
        # Whether the model continues a trailing model turn: None until the first request asks.
        self.continues = continue_model_turn
        self.one_step_reason: str | None = None  # why only one step works, once known
        if continue_model_turn is False:
            self._one_step("continue_model_turn=False was given", warn=False)

    @property
    def path(self) -> str:
        return f"/models/{self.name.removeprefix('models/')}:generateContent"

    @property
    def stream_path(self) -> str:
        return f"/models/{self.name.removeprefix('models/')}:streamGenerateContent?alt=sse"

    # -- requests -----------------------------------------------------------------------------

    def build_request(self, prompt: Prompt, k: int) -> tuple[str, dict[str, Any]]:
        return self.path, self._body(prompt, self._config(k, 1, temperature=1.0))

    def build_generate(
        self, prompt: Prompt, k: int, n: int, *, greedy: bool, seed: int | None
    ) -> tuple[str, dict[str, Any]]:
        """Up to ``n`` tokens of the answer, greedy (temperature 0) or sampled at temperature 1
        with ``seed``."""
        config = self._config(k, n, temperature=0.0 if greedy else 1.0)
        if seed is not None and not greedy:
            config["seed"] = seed
        return self.path, self._body(prompt, config)

    def _body(self, prompt: Prompt, config: dict[str, Any]) -> dict[str, Any]:
        """The request: ``systemInstruction`` (a chat prompt's system text, if any), the turns
        (the answer so far as a trailing model turn) and ``config``."""
        messages, answer = chat_conversation(prompt, self.tokenizer.decode)
        if messages[-1]["role"] == "assistant":
            raise ConfigError(
                "the messages end with an assistant turn, which Gemini would continue rather "
                "than answer: end them with a user turn"
            )
        system = [m["content"] for m in messages if m["role"] == "system"]
        contents = [
            {
                "role": "model" if m["role"] == "assistant" else "user",
                "parts": [{"text": m["content"]}],
            }
            for m in messages
            if m["role"] != "system"
        ]
        if answer is not None:
            contents.append({"role": "model", "parts": [{"text": answer}]})
        body: dict[str, Any] = {"contents": contents, "generationConfig": config}
        if system:
            body["systemInstruction"] = {"parts": [{"text": text} for text in system]}
        return body

    def _config(self, k: int, n: int, *, temperature: float) -> dict[str, Any]:
        config: dict[str, Any] = {
            "responseLogprobs": True,
            "logprobs": k,
            "maxOutputTokens": n,
            "temperature": temperature,
            "topP": 1.0,
            "candidateCount": 1,
        }
        if self.thinking_budget is not None:
            config["thinkingConfig"] = {"thinkingBudget": self.thinking_budget}
        return config

    async def top_logprobs(self, prompt: Prompt, k: int) -> TopLogprobs:
        await self._ready_for(prompt)
        return await super().top_logprobs(prompt, k)

    async def generate(
        self, prompt: Prompt, k: int, n: int, *, greedy: bool, seed: int | None = None
    ) -> Continuation:
        await self._ready_for(prompt)
        return await super().generate(prompt, k, n, greedy=greedy, seed=seed)

    async def stream_draft(
        self, prompt: Prompt, k: int, n: int, *, greedy: bool, seed: int | None = None
    ) -> AsyncIterator[StreamedPosition]:
        """``generate``'s positions from one streamed request, each as its event arrives."""
        await self._ready_for(prompt)
        _, payload = self.build_generate(prompt, k, n, greedy=greedy, seed=seed)
        parse = lambda event: self.parse_generate(event, prompt, k)  # noqa: E731
        # Every event is read: one without positions still says whether the model thinks.
        positions = stream_positions(
            self, self.stream_path, payload, prompt, k, n, parse, lambda _: True
        )
        async with contextlib.aclosing(positions):
            async for position in positions:
                yield position

    async def _ready_for(self, prompt: Prompt) -> None:
        if await self.check_continuation(prompt) or (
            chat_conversation(prompt, self.tokenizer.decode)[1] is None
        ):
            return
        reason = self.one_step_reason or f"model {self.name!r} takes one step only"
        if not prompt.generated:  # the response prefix alone is the partial answer
            reason += "; a response_prefix is a partial answer too: leave it out"
        raise ConfigError(reason)

    async def check_continuation(self, prompt: Prompt | None = None) -> bool:
        """Whether this model continues a partial answer given as a trailing model turn: asked
        of the server once (a two-turn exchange of a few tokens), then kept."""
        if self.continues is None:
            payload = {
                "contents": CONTINUATION_PROBE,
                "generationConfig": {"maxOutputTokens": 1, "candidateCount": 1},
            }
            what = f"model {self.name!r}, asking whether it continues a model turn"
            try:
                await self.transport.request_json("POST", self.path, payload, what=what, tokens=8)
            except BadRequestError as exc:
                if not _MODEL_TURN.search(str(exc)):
                    raise await self.explain(exc, prompt or Prompt((), 0), 0) from None
                self._one_step(f"a trailing model turn is refused: {_status_line(exc)}")
            except APIStatusError as exc:
                raise await self.explain(exc, prompt or Prompt((), 0), 0) from None
            else:
                self.continues = True
        return bool(self.continues)

    def _one_step(self, why: str, *, warn: bool = True) -> None:
        self.continues = False
        self.capabilities = dataclasses.replace(
            self.capabilities, multi_step=False, drafts=False, streams=False
        )
        self.one_step_reason = (
            f"Gemini model {self.name!r} cannot continue a partial answer ({why}), so it scores "
            f"only the first token after the prompt: use ProxyTuner.choose() (proxyclient choose) "
            f"or max_new_tokens=1, or a Gemini model that continues a trailing model turn"
        )
        if warn:
            logger.warning("%s", self.one_step_reason)

    # -- answers ------------------------------------------------------------------------------

    def parse_response(self, body: Any, prompt: Prompt, k: int) -> TopLogprobs:
        tops, _ = self._logprobs(body)
        return self._top(tops[0], k)

    def parse_generate(self, body: Any, prompt: Prompt, k: int) -> Continuation:
        """Every generated position: the chosen token, its logprob, the top-k before it. The end
        of the answer is no position, so a stop leaves fewer, maybe none."""
        tops, chosen = self._logprobs(body, empty_ok=True)
        if len(tops) != len(chosen):
            raise ResponseFormatError(
                f"the Gemini answer has {len(chosen)} chosen candidates but {len(tops)} lists of "
                f"top candidates"
            )
        return Continuation(
            tuple(self._token_id(c) for c in chosen),
            tuple(self._top(top, k) for top in tops),
            tuple(c.get("logProbability") for c in chosen),
            gemini_usage(body),
        )

    def _logprobs(
        self, body: Any, *, empty_ok: bool = False
    ) -> tuple[list[list[dict[str, Any]]], list[dict[str, Any]]]:
        """The top candidates at each position, and the chosen ones, of ``candidates[0]``."""
        candidates = body.get("candidates") if isinstance(body, dict) else None
        if not candidates:
            blocked = (body.get("promptFeedback") or {}).get("blockReason") if body else None
            why = f"the prompt was blocked ({blocked})" if blocked else repr(str(body)[:200])
            raise ResponseFormatError(f"the Gemini answer has no candidates: {why}")
        thoughts = (body.get("usageMetadata") or {}).get("thoughtsTokenCount") or 0
        if thoughts:
            raise BaseModelError(
                f"Gemini model {self.name!r} thought ({thoughts} tokens) before it answered, so "
                f"its logprobs are not those of the token after the prompt: turn thinking off "
                f"(connect(..., thinking_budget=0), where the model allows it) or use a model "
                f"that does not think"
            )
        result = candidates[0].get("logprobsResult") or {}
        tops = [entry.get("candidates") or [] for entry in result.get("topCandidates") or []]
        chosen = result.get("chosenCandidates") or []
        # A draft may hold no position (the answer ended at once); a step must hold one.
        if (chosen or not empty_ok) and not (tops and tops[0]):
            raise self._no_logprobs(body)
        if self.token_ids is None:
            self._check_token_ids([*chosen, *(e for top in tops for e in top)])
        return tops, chosen

    def _check_token_ids(self, entries: list[dict[str, Any]]) -> None:
        """Whether ``tokenId`` is the base tokenizer's id: every entry's id decodes to its text
        (entries whose text is U+FFFD, part of a character, say nothing). Decided on the first
        answer with an entry that can tell; a disagreement is said once, as a warning."""
        agreed = 0
        for entry in entries:
            token_id, text = entry.get("tokenId"), entry.get("token")
            if not isinstance(text, str) or not text or "\ufffd" in text:
                continue
            if not self._id_in_vocab(token_id):
                why = (
                    f"an entry ({text!r}) has no tokenId"
                    if token_id is None
                    else (
                        f"tokenId {token_id} is no id of the base tokenizer "
                        f"({len(self.tokenizer.vocab)} tokens)"
                    )
                )
                return self._use_token_ids(False, why)
            spelled = self._spelled(token_id)
            if spelled != text:
                return self._use_token_ids(
                    False,
                    f"tokenId {token_id} is {spelled!r} in the base tokenizer, but Gemini's text "
                    f"for it is {text!r}",
                )
            agreed += 1
        if agreed:
            self._use_token_ids(True)

    def _spelled(self, token_id: int) -> str | None:
        """The text of ``token_id`` in the base tokenizer (a special token's name)."""
        data = self.tokenizer.vocab.token_bytes[token_id]
        if data is not None:
            return data.decode("utf-8", "replace")
        names = {i: name for name, i in self.tokenizer.special_tokens.items()}
        return names[token_id].decode("utf-8", "replace") if token_id in names else None

    def _id_in_vocab(self, token_id: Any) -> bool:
        return (
            isinstance(token_id, int)
            and not isinstance(token_id, bool)
            and 0 <= token_id < len(self.tokenizer.vocab)
        )

    def _use_token_ids(self, use: bool, why: str = "") -> None:
        self.token_ids = use
        self.capabilities = dataclasses.replace(self.capabilities, ids_in_response=use)
        if why:
            logger.warning(
                "Gemini model %r: its tokenId are not the ids of the base tokenizer %s (%s), so "
                "tokens are named by their text, and one that is part of a character (text "
                "U+FFFD) can be neither chosen nor followed; give the tokenizer whose ids the "
                "model returns (--base-tokenizer) to use them",
                self.name,
                self.tokenizer,
                why,
            )

    def _no_logprobs(self, body: Any) -> ResponseFormatError:
        finish = body["candidates"][0].get("finishReason")
        if finish == "STOP":  # it drew the end of its answer first: no token, no position
            return ResponseFormatError(
                "the Gemini answer ended before its first token (finishReason STOP), so it holds "
                "no logprobs"
            )
        return ResponseFormatError(
            f"the Gemini answer has no logprobsResult.topCandidates (finishReason {finish}); "
            f"does model {self.name!r} allow logprobs (responseLogprobs)?"
        )

    def _token_id(self, entry: dict[str, Any]) -> int | None:
        """The entry's id: its ``tokenId`` where those are the base tokenizer's, else the id its
        text names (None for U+FFFD, part of a character)."""
        if self.token_ids and self._id_in_vocab(token_id := entry.get("tokenId")):
            return token_id
        return self.tokenizer.token_id(bytes_of_token_string(entry.get("token") or ""))

    def _top(self, entries: list[dict[str, Any]], k: int) -> TopLogprobs:
        pairs = ((self._token_id(e), e.get("logProbability")) for e in entries)
        return TopLogprobs.from_pairs(pairs, k=k)

    # -- errors -------------------------------------------------------------------------------

    async def explain(self, exc: APIStatusError, prompt: Prompt, k: int) -> ProxyClientError:
        """Gemini's errors (``{"error": {"code", "message", "status"}}``) with what to do."""
        text = str(exc)
        fields = {"status_code": exc.status_code, "body": exc.body}
        if isinstance(exc, BadRequestError) and (match := _K_RANGE.search(text)):
            cap = int(match.group(1)) - 1
            return TopKTooLargeError(
                f"{text} — Gemini gives at most {cap} top logprobs and {k} were asked for: "
                f"pass base_k={cap} or less.",
                server_max=cap,
                **fields,
            )
        if exc.status_code in (400, 403) and _LOGPROBS_REFUSED.search(text):
            return type(exc)(
                f"{text} — Gemini model {self.name!r} gives no logprobs, and proxy-tuning needs "
                f"them: {logprobs_advice(self.name, self.transport.base_url)}.",
                **fields,
            )
        if isinstance(exc, BadRequestError) and _MODEL_TURN.search(text):
            self._one_step(f"a trailing model turn is refused: {_status_line(exc)}")
            return BadRequestError(f"{text} — {self.one_step_reason}.", **fields)
        if isinstance(exc, BadRequestError) and _CONTEXT.search(text):
            return ContextLengthError(
                f"{text} — the prompt plus the tokens generated so far ({len(prompt.ids)} "
                f"tokens) no longer fit the model's context: shorten the prompt or lower "
                f"max_new_tokens.",
                **fields,
            )
        if _BAD_KEY.search(text) or exc.status_code in (401, 403):
            return AuthenticationError(
                f"{text} — check the API key: pass api_key=..., or set GEMINI_API_KEY to a key "
                f"from https://aistudio.google.com/apikey that may use model {self.name!r}.",
                **fields,
            )
        if isinstance(exc, NotFoundError):
            return NotFoundError(f"{text} — {await self._models_hint()}", **fields)
        return await super().explain(exc, prompt, k)

    async def _models_hint(self) -> str:
        """Which models the key may call generateContent on (ListModels: ``GET /models``)."""
        unknown = f"Gemini has no model {self.name!r} here (unknown, or retired)"
        try:
            body = await self.transport.request_json("GET", "/models", what="list models")
            names = [
                m["name"].removeprefix("models/")
                for m in body.get("models", [])
                if "generateContent" in m.get("supportedGenerationMethods", ["generateContent"])
            ]
        except (ProxyClientError, KeyError, TypeError, AttributeError):
            return (
                f"{unknown}: check --base-model (GET {self.transport.base_url}/models lists them)."
            )
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        return f"{unknown}: pass one of {shown} as --base-model."


def logprobs_advice(model: str, base_url: str) -> str:
    """What to use instead of a Gemini model that refused logprobs: which families give them
    (issue 24, 2026-12-03: 2.0 models do, 2.5 often only on Vertex AI, 3.x do not)."""
    name = model.removeprefix("models/")
    vertex = "aiplatform.googleapis.com" in base_url
    if _GEMINI_3.match(name):
        return (
            "Gemini 3.x models give no logprobs; use a Gemini 2.0 model (e.g. gemini-2.0-flash), "
            "or a 2.5 model on Vertex AI"
        )
    if _GEMINI_2_5.match(name) and not vertex:
        return (
            "Gemini 2.5 models often give logprobs only on Vertex AI: give Vertex AI's "
            "generateContent as the base URL (https://{region}-aiplatform.googleapis.com/v1/"
            "projects/P/locations/L/publishers/google), or use a Gemini 2.0 model"
        )
    return "use a Gemini model that does (Gemini 2.0 models; 2.5 models on Vertex AI)"


_GEMINI_3 = re.compile(r"gemini-3(?:[.-]|$)", re.IGNORECASE)
_GEMINI_2_5 = re.compile(r"gemini-2\.5(?:-|$)", re.IGNORECASE)


def gemini_usage(body: Any) -> ServerUsage:
    """``usageMetadata``: prompt, generated (candidates) and cached prompt tokens."""
    usage = body.get("usageMetadata") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return ServerUsage()
    return ServerUsage(
        usage.get("promptTokenCount"),
        usage.get("candidatesTokenCount"),
        usage.get("cachedContentTokenCount"),
    )


def _status_line(exc: APIStatusError) -> str:
    """``HTTP 400: the server's message``, without the request that got it."""
    text = str(exc)
    return text[text.find("HTTP ") :] if "HTTP " in text else text
