"""SGLang's native ``POST /generate`` (the server root, no ``/v1``): token ids in, ids out.

Documentation: https://docs.sglang.io/basic_usage/native_api.html and
https://docs.sglang.io/basic_usage/sampling_params.html (``GenerateReqInput``: ``input_ids``,
``sampling_params``, ``return_logprob``, ``top_logprobs_num``, ``logprob_start_len``,
``return_text_in_logprobs``); shapes as sglang 0.5.23's ``tokenizer_manager.py`` and
``scheduler_components/logprob_result_processor.py`` build them. NVIDIA NIM can run SGLang as its
backend, but NIM documents only its OpenAI-compatible API: such a container answers this dialect
only where it exposes SGLang's own ``/generate``. NIM's choice of backends is described at
https://developer.nvidia.com/blog/simplify-llm-deployment-and-ai-inference-with-unified-nvidia-nim-workflow

Every logprob comes back as a ``[logprob, token_id, text]`` triple (text null unless
``return_text_in_logprobs``) under ``meta_info``: ``output_token_logprobs`` (each generated token,
a final EOS included) and ``output_top_logprobs`` (the top-k before each), and with
``logprob_start_len`` s the prompt's from token s on: ``input_token_logprobs`` /
``input_top_logprobs``, aligned with the prompt's ids from s, the first entry null (nothing
before it was scored). So one request scores a continuation and generates the token after it.

SGLang returns ``log(softmax(logits / temperature))`` before top-p/top-k/min-p: at temperature 1
(or greedy, which SGLang runs at temperature 1 with top-k 1) they are the raw model's. Sampling
defaults may come from the model's ``generation_config.json``, so every sampling knob is sent.
There is no cap on ``top_logprobs_num`` below the vocabulary, and more than the vocabulary
crashes SGLang's scheduler (sglang 0.5.23: ``topk`` out of range, no validation; PRs #28794,
#40099 open), so discovery does not probe for a cap, and with a tokenizer k is checked here.

Streamed drafts: the same request with ``"stream": true`` (``GenerateReqInput.stream``, on the
native API page above), answered with server-sent events ``data: {"text", "output_ids",
"meta_info"}`` and a last ``data: [DONE]`` (``entrypoints/http_server.py``:
``generate_request``). ``meta_info``'s ``output_token_logprobs`` / ``output_top_logprobs`` hold
every position so far, or only the new ones where the server runs with
``--incremental-streaming-output`` (``tokenizer_manager.py``: ``_handle_batch_output``,
``_slice_streaming_output_meta_info``); ``completion_tokens`` counts them all either way, so
the new positions are the last ``completion_tokens - seen`` entries. An error after the stream
opened (a ValueError: context length, sampling parameters) comes as ``data: {"error":
{"message"}}`` in a 200 answer, read here as the 400 the unstreamed request gets. SGLang aborts
a request whose client disconnects (``create_abort_task``), so closing the stream stops it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from proxyclient.adapters.base import (
    Capabilities,
    Continuation,
    Prompt,
    ServerUsage,
    StreamedPosition,
    TopLogprobs,
)
from proxyclient.adapters.dialect import DialectAdapter
from proxyclient.errors import (
    ConfigError,
    ResponseFormatError,
    TopKTooLargeError,
)

GENERATE_PATH = "/generate"
# Sent with every request: SGLang may take unset ones from the model's generation_config.json.
_NO_WARPERS = {
    "top_p": 1.0,
    "top_k": -1,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
}


def _meta(body: Any) -> dict[str, Any]:
    meta = body.get("meta_info") if isinstance(body, dict) else None
    if not isinstance(meta, dict) or "output_top_logprobs" not in meta:
        raise ResponseFormatError(
            "the answer has no meta_info.output_top_logprobs; is this SGLang's native /generate "
            "(--api sglang, the server root without /v1), and was top_logprobs_num > 0?"
        )
    return meta


def _top(entries: Any, k: int) -> TopLogprobs:
    """One position's ``[[logprob, token_id, text], ...]``."""
    pairs = ((e[1], e[0]) for e in entries or [] if isinstance(e, (list, tuple)) and len(e) >= 2)
    return TopLogprobs.from_pairs(pairs, k=k)


def _usage(meta: dict[str, Any]) -> ServerUsage:
    return ServerUsage(
        meta.get("prompt_tokens"), meta.get("completion_tokens"), meta.get("cached_tokens")
    )


class SGLangGenerate(DialectAdapter):
    """A base model served by SGLang's own server. ``tokenizer`` is optional: answers
    name tokens by id; given one, k is checked against its vocabulary before anything is sent."""

    dialect = "sglang"
    probe_ks: tuple[int, ...] = ()  # a k over the vocabulary crashes SGLang: never probe for a cap

    default_capabilities = Capabilities(
        max_k=None,
        token_id_prompts=True,
        ids_in_response=True,
        prompt_scoring=True,
        logprobs="raw",
        drafts=True,
        streams=True,
    )

    def build_request(self, prompt: Prompt, k: int) -> tuple[str, dict[str, Any]]:
        return GENERATE_PATH, self._body(prompt.ids, k)

    def build_generate(
        self, prompt: Prompt, k: int, n: int, *, greedy: bool, seed: int | None
    ) -> tuple[str, dict[str, Any]]:
        """Up to ``n`` tokens, greedy (temperature 0) or sampled at temperature 1 with no other
        warper; the logprobs are the raw model's either way."""
        temperature = 0.0 if greedy else 1.0
        body = self._body(
            prompt.ids, k, max_new_tokens=n, temperature=temperature, seed=None if greedy else seed
        )
        return GENERATE_PATH, body

    def build_score(
        self, prompt: Prompt, continuation: Sequence[int], k: int
    ) -> tuple[str, dict[str, Any]]:
        """The prompt and continuation as one input, its logprobs from the prompt's last token on
        (that first position comes back empty), and one generated token."""
        ids = [*prompt.ids, *continuation]
        return GENERATE_PATH, self._body(ids, k, logprob_start_len=max(0, len(prompt.ids) - 1))

    def _body(
        self,
        ids: Sequence[int],
        k: int,
        *,
        max_new_tokens: int = 1,
        temperature: float = 1.0,
        seed: int | None = None,
        logprob_start_len: int = -1,
    ) -> dict[str, Any]:
        """``max_new_tokens`` after ``ids`` with the top-k at each, and the prompt's own logprobs
        from ``logprob_start_len`` on (-1: none); k checked first."""
        if k < 0:
            raise ConfigError(
                "SGLang has no whole-vocabulary mode (top_logprobs_num -1): pass a top-logprobs "
                "k of at most the vocabulary size"
            )
        vocab = len(self.tokenizer.vocab) if self.tokenizer is not None else None
        if vocab is not None and k > vocab:
            raise TopKTooLargeError(
                f"k={k} is more than the base's {vocab} tokens; SGLang crashes on a "
                f"top_logprobs_num above its vocabulary: pass base_k={vocab} or less.",
                status_code=400,
                body=None,
                server_max=vocab,
            )
        sampling: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            **_NO_WARPERS,
        }
        if seed is not None:
            sampling["sampling_seed"] = seed
        return {
            "input_ids": list(ids),
            "sampling_params": sampling,
            "return_logprob": True,
            "top_logprobs_num": k,
            "logprob_start_len": logprob_start_len,
            "return_text_in_logprobs": False,
            "stream": False,
        }

    def parse_response(self, body: Any, prompt: Prompt, k: int) -> TopLogprobs:
        """The top-k before the first generated token."""
        tops = _meta(body)["output_top_logprobs"] or []
        if not tops or not tops[0]:
            raise ResponseFormatError(
                "SGLang sent no output_top_logprobs; was top_logprobs_num > 0 and "
                "max_new_tokens >= 1?"
            )
        return _top(tops[0], k)

    def parse_generate(self, body: Any, prompt: Prompt, k: int) -> Continuation:
        """Every generated position (a final EOS included): the token, its logprob, the top-k."""
        meta = _meta(body)
        chosen = meta.get("output_token_logprobs") or []
        tops = meta["output_top_logprobs"] or []
        if len(chosen) != len(tops):
            raise ResponseFormatError(
                f"the answer has {len(chosen)} output_token_logprobs but {len(tops)} "
                f"output_top_logprobs entries"
            )
        return Continuation(
            tuple(entry[1] for entry in chosen),
            tuple(_top(entries, k) for entries in tops),
            tuple(entry[0] for entry in chosen),
            _usage(meta),
        )

    def parse_score(
        self, body: Any, prompt: Prompt, continuation: Sequence[int], k: int
    ) -> Continuation:
        """The top-k before each continuation token (the last prompt positions of the answer) and
        before the token SGLang generated after them."""
        meta = _meta(body)
        after = self.parse_generate(body, prompt, k)
        n = len(continuation)
        scored = meta.get("input_top_logprobs") or []
        own = meta.get("input_token_logprobs") or []
        tail, tail_own = scored[len(scored) - n :], own[len(own) - n :]
        ids = [entry[1] if entry else None for entry in tail_own]
        if len(tail) < n or not after.tops or ids != list(continuation) or not all(tail):
            raise ResponseFormatError(
                f"asked for the top logprobs of a {n}-token continuation and got {len(scored)} "
                f"prompt positions that do not end in it; if SGLang's radix cache cut the "
                f"prompt's logprobs short, restart it with --disable-radix-cache"
            )
        return Continuation(
            (*continuation, after.tokens[0]),
            (*(_top(entries, k) for entries in tail), after.tops[0]),
            (*(entry[0] for entry in tail_own), after.token_logprobs[0]),
            after.usage,
        )

    def parse_streamed(self, event: Any, prompt: Prompt, k: int, seen: int) -> Continuation:
        """The positions a streamed event adds to the ``seen`` ones before it (its lists hold
        all positions so far, or, with ``--incremental-streaming-output``, the new ones)."""
        meta = _meta(event)
        chosen = meta.get("output_token_logprobs") or []
        tops = meta["output_top_logprobs"] or []
        total = meta.get("completion_tokens")
        new = total - seen if isinstance(total, int) else len(chosen) - seen
        if len(chosen) != len(tops) or not 0 <= new <= len(chosen):
            raise ResponseFormatError(
                f"the streamed event has {len(chosen)} output_token_logprobs and {len(tops)} "
                f"output_top_logprobs entries for {total} tokens, {seen} of them seen before"
            )
        fresh = slice(len(chosen) - new, None)
        return Continuation(
            tuple(entry[1] for entry in chosen[fresh]),
            tuple(_top(entries, k) for entries in tops[fresh]),
            tuple(entry[0] for entry in chosen[fresh]),
        )

    def stream_draft(
        self, prompt: Prompt, k: int, n: int, *, greedy: bool, seed: int | None = None
    ) -> AsyncIterator[StreamedPosition]:
        """``generate``'s positions from one streamed request, each as its event arrives."""
        path, payload = self.build_generate(prompt, k, n, greedy=greedy, seed=seed)
        return self.stream_positions(
            path,
            payload | {"stream": True},
            prompt,
            k,
            n,
            lambda event, seen: self.parse_streamed(event, prompt, k, seen),
            error_status=lambda _event: 400,
        )

    async def _served_models_hint(self) -> str:
        return "SGLang serves one model, whatever --base-model says; check --base-url."
