"""Text Generation Inference's ``/generate`` with ``details`` and ``top_n_tokens``.

TGI takes text, not ids: the ids the loop tracks are decoded and TGI tokenizes them again. Where
its split differs from ours (a chosen token that merges with its neighbours), the base is
conditioned on the canonical split of the same text; the step is marked ``retokenized``.
TGI computes logprobs after its warpers, so no temperature, top_p, top_k or penalty is sent.
Its cap on k is ``--max-top-n-tokens`` (default 5).
"""

from __future__ import annotations

from typing import Any

from proxyclient.adapters.base import Capabilities, Prompt, TopLogprobs
from proxyclient.adapters.dialect import DialectAdapter
from proxyclient.adapters.http import HTTPTransport
from proxyclient.errors import ResponseFormatError
from proxyclient.tokenizer import BaseTokenizer

TGI_DEFAULT_MAX_TOP_N = 5


class TGIGenerate(DialectAdapter):
    dialect = "tgi"
    needs_tokenizer = True
    raise_k_cap = "restart TGI with a larger --max-top-n-tokens"
    tokenizer: BaseTokenizer

    def __init__(
        self,
        transport: HTTPTransport,
        model: str,
        *,
        tokenizer: BaseTokenizer,
        max_k: int | None = TGI_DEFAULT_MAX_TOP_N,
    ) -> None:
        super().__init__(transport, model, tokenizer=tokenizer)
        self.capabilities = Capabilities(
            max_k=max_k,
            token_id_prompts=False,
            ids_in_response=True,
            prompt_scoring=False,  # decoder_input_details gives only the chosen tokens' logprobs
            logprobs="processed",  # after TGI's warpers; we send none, so they equal the raw ones
        )

    def build_request(self, prompt: Prompt, k: int) -> tuple[str, dict[str, Any]]:
        return "/generate", {
            "inputs": self.tokenizer.decode(prompt.ids),
            "parameters": {
                "max_new_tokens": 1,
                "details": True,
                "top_n_tokens": k,
                "decoder_input_details": False,
            },
        }

    def parse_response(self, body: Any, prompt: Prompt, k: int) -> TopLogprobs:
        try:
            top = body["details"]["top_tokens"][0]
        except (KeyError, IndexError, TypeError):
            raise ResponseFormatError(
                "the TGI answer has no details.top_tokens; is this a TGI server (--api tgi), and "
                "is top_n_tokens allowed (--max-top-n-tokens)?"
            ) from None
        pairs = [(entry.get("id"), entry.get("logprob")) for entry in top]
        text = self.tokenizer.decode(prompt.ids)
        canonical = self.tokenizer.encode(text) == list(prompt.ids)
        result = TopLogprobs.from_pairs(pairs, k=k)
        return TopLogprobs(
            result.token_ids,
            result.logprobs,
            unresolved=result.unresolved,
            retokenized=not canonical,
        )
