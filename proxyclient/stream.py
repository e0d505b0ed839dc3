"""Streams of text pieces, sync and async, that hold the Generation once they are exhausted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator

from proxyclient.result import Generation


class AsyncGenerationStream:
    """Async iterator of text pieces; ``generation`` is the result once it is exhausted."""

    def __init__(self, pieces: AsyncIterator[str], result: Callable[[], Generation]) -> None:
        self._pieces = pieces
        self._result = result

    def __aiter__(self) -> AsyncGenerationStream:
        return self

    async def __anext__(self) -> str:
        return await self._pieces.__anext__()

    async def aclose(self) -> None:
        await self._pieces.aclose()  # type: ignore[attr-defined]

    @property
    def generation(self) -> Generation:
        """The result so far (final once iteration ended)."""
        return self._result()


class GenerationStream:
    """Iterator of text pieces; ``generation`` is the result once it is exhausted."""

    def __init__(self, inner: AsyncGenerationStream, loop: asyncio.AbstractEventLoop) -> None:
        self._inner = inner
        self._loop = loop

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        try:
            return self._loop.run_until_complete(self._inner.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        self._loop.run_until_complete(self._inner.aclose())

    @property
    def generation(self) -> Generation:
        return self._inner.generation
