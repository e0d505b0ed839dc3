"""``/v1/chat/completions`` with ``logprobs: true, top_logprobs: k`` (OpenAI: k <= 20).

Each top-logprob entry carries the token's ``bytes``, exact on OpenAI; vLLM sends the bytes of
U+FFFD for a token that is not valid UTF-8 alone, so such entries count as unresolved.
A plain chat API cannot continue a partial assistant message: it scores only the first token of
the answer, so this adapter supports one step (``multi_step=False``), which is what
``ProxyTuner.choose`` needs. Servers that can continue (vLLM: ``continue_final_message``) get
token-by-token generation with ``continue_final_message=True``.
"""

from __future__ import annotations

from typing import Any

from proxyclient.adapters.base import Capabilities, Prompt, TopLogprobs
from proxyclient.adapters.dialect import DialectAdapter
from proxyclient.adapters.http import HTTPTransport
from proxyclient.errors import ResponseFormatError
from proxyclient.tokenizer import BaseTokenizer, tiktoken_spec_for_model
from proxyclient.vocab import bytes_of_token_string

OPENAI_MAX_TOP_LOGPROBS = 20
REPLACEMENT = "\ufffd".encode()


class OpenAIChat(DialectAdapter):
    dialect = "openai-chat"
    needs_tokenizer = True
    # vLLM serves chat; so does any OpenAI-style host, which sniff_dialect calls "openai".
    also_served_by = frozenset({"vllm", "openai"})
    tokenizer: BaseTokenizer

    def __init__(
        self,
        transport: HTTPTransport,
        model: str,
        *,
        tokenizer: BaseTokenizer,
        max_k: int | None = OPENAI_MAX_TOP_LOGPROBS,
        continue_final_message: bool = False,
    ) -> None:
        super().__init__(transport, model, tokenizer=tokenizer)
        self.continue_final_message = continue_final_message
        self.capabilities = Capabilities(
            max_k=max_k,
            token_id_prompts=False,
            ids_in_response=False,
            prompt_scoring=False,
            logprobs="raw",
            multi_step=continue_final_message,
        )

    @classmethod
    def default_tokenizer(cls, model: str) -> str | None:
        """OpenAI's model names imply their tiktoken encoding."""
        return tiktoken_spec_for_model(model)

    def build_request(self, prompt: Prompt, k: int) -> tuple[str, dict[str, Any]]:
        decode = self.tokenizer.decode
        messages = [{"role": "user", "content": decode(prompt.ids[: prompt.prompt_len])}]
        payload: dict[str, Any] = {
            "model": self.name,
            "messages": messages,
            "max_tokens": 1,
            "temperature": 1.0,
            "logprobs": True,
            "top_logprobs": k,
        }
        if prompt.generated:
            messages.append({"role": "assistant", "content": decode(prompt.generated)})
            payload |= {"continue_final_message": True, "add_generation_prompt": False}
        return "/chat/completions", payload

    def parse_response(self, body: Any, prompt: Prompt, k: int) -> TopLogprobs:
        try:
            content = body["choices"][0]["logprobs"]["content"]
        except (KeyError, IndexError, TypeError):
            content = None
        if not content or not content[0].get("top_logprobs"):
            raise ResponseFormatError(
                "the chat answer has no logprobs.content[0].top_logprobs; does this model allow "
                "logprobs (OpenAI's reasoning models do not)?"
            )
        pairs = []
        for entry in content[0]["top_logprobs"]:
            raw = entry.get("bytes")
            data = bytes(raw) if raw is not None else bytes_of_token_string(entry.get("token", ""))
            if data is not None and REPLACEMENT in data:
                data = None  # vLLM sends U+FFFD's bytes for a partial UTF-8 token, not its own
            pairs.append((self.tokenizer.token_id(data), entry.get("logprob")))
        return TopLogprobs.from_pairs(pairs, k=k)
