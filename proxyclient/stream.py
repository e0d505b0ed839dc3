"""Streams of text pieces, sync and async, that hold the Generation once they are exhausted."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING

from proxyclient.result import Generation

if TYPE_CHECKING:
    from proxyclient.loop_thread import LoopThread


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
    """Iterator of text pieces; ``generation`` is the result once it is exhausted.

    Each piece is computed on the tuner's private loop (a
    :class:`~proxyclient.loop_thread.LoopThread`), so this works whether or not the calling thread
    runs an event loop. ``close()`` stops the generation early (closing the async stream there).
    """

    def __init__(self, inner: AsyncGenerationStream, runner: LoopThread) -> None:
        self._inner = inner
        self._pieces = runner.iterate(inner)

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        self._pieces.close()

    @property
    def generation(self) -> Generation:
        return self._inner.generation
