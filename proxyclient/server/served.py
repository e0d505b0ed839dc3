"""What the server needs of a tuner: a small typed interface (ProxyTuner has it), so the HTTP
layer never reaches into the engine's internals."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from proxyclient.adapters.base import BaseModel
    from proxyclient.config import GenerationConfig
    from proxyclient.scoring import Score
    from proxyclient.stream import AsyncGenerationStream
    from proxyclient.tokens import TokenSpace


class ServedTuner(Protocol):
    base: BaseModel
    tokens: TokenSpace

    @property
    def tokenizer(self) -> Any: ...  # the proxies' (HF) tokenizer

    @property
    def context_length(self) -> int | None: ...

    def astream(
        self, prompt: Any, config: GenerationConfig | None = None, **options: Any
    ) -> AsyncGenerationStream: ...

    async def ascore(
        self, prompt: str, continuation: str, config: GenerationConfig | None = None, **options: Any
    ) -> Score: ...

    async def aclose(self) -> None: ...
