"""What the server needs of a tuner: a small typed interface (``ServedTuner``), so the HTTP
layer never reaches into the engine's internals. ProxyTuner has it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from proxyclient.chat import Chat
from proxyclient.tokenizer import BaseTokenizer

if TYPE_CHECKING:
    from proxyclient.config import GenerationConfig
    from proxyclient.scoring import Score
    from proxyclient.stream import AsyncGenerationStream

Prompt = str | Chat  # a text prompt, or a conversation


class ServedTuner(Protocol):
    @property
    def base_name(self) -> str | None: ...  # the base model's name at its API, if it has one

    @property
    def base_text_tokenizer(self) -> BaseTokenizer: ...  # what the base reads prompts in

    @property
    def base_vocab_size(self) -> int: ...  # ids 0 .. base_vocab_size - 1 are the base's tokens

    @property
    def context_length(self) -> int | None: ...

    def count_base_tokens(self, prompt: Prompt, config: GenerationConfig) -> int: ...

    def redact(self, text: str) -> str: ...  # ``text`` without the base's secrets (its API key)

    def astream(
        self, prompt: Any, config: GenerationConfig | None = None, **options: Any
    ) -> AsyncGenerationStream: ...

    async def ascore(
        self, prompt: str, continuation: str, config: GenerationConfig | None = None, **options: Any
    ) -> Score: ...

    async def aclose(self) -> None: ...
