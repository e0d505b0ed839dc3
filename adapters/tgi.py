"""Text Generation Inference's ``/generate`` with ``details`` and ``top_n_tokens``.

TGI takes text, not ids: the ids the loop tracks are decoded and TGI tokenizes them again. Where
its split differs from ours (a chosen token that merges with its neighbours), the base is
conditioned on the canonical split of the same text; the step is marked ``retokenized``.
TGI computes logprobs after its warpers, so no temperature, top_p, top_k or penalty is sent
(a sampled draft sends ``do_sample`` alone: temperature 1, no warper).
Its cap on k is ``--max-top-n-tokens`` (default 5).

Streamed drafts: ``POST /generate_stream`` with the same parameters, answered with server-sent
events, one per token: ``{"index", "token": {"id", "text", "logprob", "special"}, "top_tokens":
[...], "generated_text", "details"}``, the last one (EOS included) with ``generated_text`` set.
Documentation: https://huggingface.github.io/text-generation-inference/ (``/generate_stream``,
``StreamResponse``) and https://huggingface.co/docs/text-generation-inference/conceptual/streaming;
router/src/lib.rs (``StreamResponse``) and router/src/server.rs (``generate_stream_internal``):
a failure after the stream opened, validation included, comes as an event ``{"error",
"error_type"}`` in a 200 answer, read here as the status ``/generate`` answers it with. Closing
the stream drops TGI's response channel, and its batcher drops a request whose client is gone.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from proxyclient.adapters.base import (
    Capabilities,
    Continuation,
    Prompt,
    ServerUsage,
    StreamedPosition,
    TopLogprobs,
)
from proxyclient.adapters.dialect import TextPromptAdapter
from proxyclient.errors import ResponseFormatError

TGI_DEFAULT_MAX_TOP_N = 5
STREAM_PATH = "/generate_stream"
# The HTTP status /generate answers for each InferError (router/src/server.rs).
_ERROR_STATUS = {
    "generation": 424,
    "overloaded": 429,
    "validation": 422,
    "template_error": 422,
    "missing_template_variable": 422,
    "tool_error": 422,
}


class TGIGenerate(TextPromptAdapter):
    dialect = "tgi"
    raise_k_cap = "restart TGI with a larger --max-top-n-tokens"

    default_capabilities = Capabilities(
        max_k=TGI_DEFAULT_MAX_TOP_N,
        token_id_prompts=False,
        ids_in_response=True,
        prompt_scoring=False,  # decoder_input_details gives only the chosen tokens' logprobs
        logprobs="processed",  # after TGI's warpers; we send none, so they equal the raw ones
        drafts=True,
        streams=True,
    )

    def build_request(self, prompt: Prompt, k: int) -> tuple[str, dict[str, Any]]:
        return "/generate", {
            "inputs": self.prompt_text(prompt),
            "parameters": {
                "max_new_tokens": 1,
                "details": True,
                "top_n_tokens": k,
                "decoder_input_details": False,
            },
        }

    def build_generate(
        self, prompt: Prompt, k: int, n: int, *, greedy: bool, seed: int | None
    ) -> tuple[str, dict[str, Any]]:
        """Up to ``n`` tokens, greedy (TGI's default: ``do_sample`` false) or sampled
        (``do_sample`` alone: temperature 1 and no warpers, so the logprobs, which TGI computes
        after its warpers, are the raw model's)."""
        path, payload = self.build_request(prompt, k)
        parameters = payload["parameters"] | {"max_new_tokens": n}
        if not greedy:
            parameters["do_sample"] = True
            if seed is not None:
                parameters["seed"] = seed
        return path, payload | {"parameters": parameters}

    @staticmethod
    def _top(entries: list[dict[str, Any]], k: int, retokenized: bool) -> TopLogprobs:
        """One position's ``top_tokens`` list."""
        pairs = ((e.get("id"), e.get("logprob")) for e in entries)
        return TopLogprobs.from_pairs(pairs, k=k, retokenized=retokenized)

    @staticmethod
    def _no_top_tokens() -> ResponseFormatError:
        return ResponseFormatError(
            "the TGI answer has no details.top_tokens; is this a TGI server (--api tgi), and "
            "is top_n_tokens allowed (--max-top-n-tokens)?"
        )

    def parse_response(self, body: Any, prompt: Prompt, k: int) -> TopLogprobs:
        try:
            top = body["details"]["top_tokens"][0]
        except (KeyError, IndexError, TypeError):
            raise self._no_top_tokens() from None
        return self._top(top, k, self.retokenized(prompt))

    def parse_generate(self, body: Any, prompt: Prompt, k: int) -> Continuation:
        """Every generated position (a final EOS included, as TGI sends it): the token, its
        logprob and the top-k before it. Every position is conditioned on TGI's split of the
        prompt, then on the generated ids themselves, so all share the prompt's ``retokenized``."""
        try:
            details = body["details"]
            tokens = details["tokens"]
        except (KeyError, TypeError):
            raise self._no_top_tokens() from None
        top_tokens = details.get("top_tokens") or []
        if len(top_tokens) != len(tokens) or (tokens and not top_tokens[0]):
            raise self._no_top_tokens()
        retokenized = self.retokenized(prompt)
        return Continuation(
            tuple(token.get("id") for token in tokens),
            tuple(self._top(top or [], k, retokenized) for top in top_tokens),
            tuple(token.get("logprob") for token in tokens),
            ServerUsage(completion_tokens=details.get("generated_tokens")),
        )

    def parse_streamed(self, event: Any, k: int, retokenized: bool) -> Continuation:
        """One streamed event's position: the token, its logprob and the top-k before it
        (``retokenized``: the prompt's, as ``parse_generate`` marks every position)."""
        token = event["token"]
        top = event.get("top_tokens")
        if not top:
            raise self._no_top_tokens()
        return Continuation(
            (token.get("id"),),
            (self._top(top, k, retokenized),),
            (token.get("logprob"),),
        )

    def stream_draft(
        self, prompt: Prompt, k: int, n: int, *, greedy: bool, seed: int | None = None
    ) -> AsyncIterator[StreamedPosition]:
        """``generate``'s positions from one ``/generate_stream`` request, each as it arrives."""
        _, payload = self.build_generate(prompt, k, n, greedy=greedy, seed=seed)
        retokenized = self.retokenized(prompt)
        return self.stream_positions(
            STREAM_PATH,
            payload,
            prompt,
            k,
            n,
            lambda event, _seen: self.parse_streamed(event, k, retokenized),
            error_status=lambda event: _ERROR_STATUS.get(str(event.get("error_type")), 500),
        )
