"""Prompts as the base tokenizes them: token-id prompts mapped to text, token counts, and the
tokenizer endpoints (``/tokenize``, ``/detokenize``, ``/tokenizer_info``) lm-eval's remote
tokenizer reads."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from proxyclient.chat import Chat
from proxyclient.config import GenerationConfig
from proxyclient.server.protocol import APIError
from proxyclient.server.served import ServedTuner
from proxyclient.tokenizer import BaseTokenizer


class PromptTokens:
    """The base's tokenizer as the server uses it."""

    def __init__(self, tuner: ServedTuner) -> None:
        self.tuner = tuner
        self.tokenizer: BaseTokenizer = tuner.base_text_tokenizer
        self.vocab_size: int = tuner.base_vocab_size

    def encode(self, text: str, *, special: bool = False) -> list[int]:
        """Base ids of ``text``; with ``special`` the tokenizer's own additions (BOS) too."""
        return list(self.tokenizer.encode(text, add_special_tokens=special))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def text_of(self, ids: Sequence[int], param: str = "prompt") -> str:
        """The text a token-id prompt spells, if the base tokenizer splits that text into exactly
        these ids (with or without its BOS); a 400 otherwise."""
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise APIError(
                400,
                f"{param}: token id {bad[0]} is outside the base's vocabulary (0 to "
                f"{self.vocab_size - 1})",
                param=param,
            )
        text = self.decode(ids)
        if text and list(ids) in (self.encode(text), self.encode(text, special=True)):
            return text
        raise APIError(
            400,
            f"{param}: these token ids do not spell a text that the base tokenizer splits the "
            f"same way (proxy-tuning re-reads prompts as text for the local models); send the "
            f"prompt as text",
            param=param,
            code="token_ids_not_canonical",
        )

    @functools.cached_property
    def longest_token_bytes(self) -> int:
        return max((len(b) for b in self.tokenizer.vocab.token_bytes if b), default=1)

    def fewest_tokens(self, prompt: str | Chat) -> int:
        """A lower bound on the tokens of ``prompt``, without tokenizing it: no token spells more
        bytes than the vocabulary's longest (chat: its messages' text alone)."""
        texts = [prompt] if isinstance(prompt, str) else [m["content"] for m in prompt.messages]
        size = sum(len(text.encode("utf-8", "surrogatepass")) for text in texts)
        return -(-size // self.longest_token_bytes)

    def count(self, prompt: str | Chat, config: GenerationConfig) -> int:
        """Tokens the base reads for ``prompt`` (chat: rendered as the tuner renders it)."""
        return self.tuner.count_base_tokens(prompt, config)

    def info(self) -> dict[str, Any]:
        """What lm-eval's RemoteTokenizer reads from ``/tokenizer_info``."""
        inner = self.tokenizer.inner
        eos_id = self.tokenizer.eos_token_id
        eos = getattr(inner, "eos_token", None)
        if eos is None and eos_id is not None:
            named = {i: b for b, i in self.tokenizer.special_tokens.items()}
            eos = named[eos_id].decode("utf-8", "replace") if eos_id in named else None
        return {
            "tokenizer_class": type(inner).__name__,
            "eos_token": eos,
            "bos_token": getattr(inner, "bos_token", None),
            "pad_token": getattr(inner, "pad_token", None),
            "chat_template": getattr(inner, "chat_template", None),
            "model_max_length": getattr(inner, "model_max_length", None),
        }
