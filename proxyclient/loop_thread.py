"""The private event loop behind the synchronous API: one asyncio loop in one daemon thread.

A :class:`LoopThread` owns an event loop that runs, started on first use, in a worker thread of its
own, and every synchronous call of one tuner (``generate``, ``stream``, ``choose``, ``close``)
runs its coroutine there and blocks until it is done. That one code path serves plain scripts and
callers that already run a loop (Jupyter, an async app) alike, because the caller's loop is never
touched; and it keeps every async object the tuner drives (the adapter's ``httpx.AsyncClient``,
whose connections are bound to the loop that opened them, and the futures of the torch executor)
on one loop for the tuner's lifetime. The standard library is enough: this is
``asyncio.run_coroutine_threadsafe``'s own recipe (``call_soon_threadsafe`` plus a Task) keeping
the Task, so that Ctrl-C can wait for it to unwind; anyio's ``BlockingPortal`` would do the same,
but its lifetime is a context manager, awkward for an object that lives as long as a tuner.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import threading
import weakref
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")

# After Ctrl-C, how long run() waits for the interrupted coroutine to unwind (its finally blocks)
# before re-raising; a second Ctrl-C stops the wait at once.
CANCEL_GRACE_S = 5.0


class LoopThread:
    """A private event loop in a daemon thread; ``run`` and ``iterate`` block the calling thread.

    Any thread may call ``run``/``iterate``/``close``, whether or not it runs a loop of its own,
    except the worker thread itself (that would wait on itself forever: it raises RuntimeError).
    """

    def __init__(self, name: str = "proxyclient-loop") -> None:
        self._name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._finalizer: weakref.finalize[..., None] | None = None

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running" if self._thread else "not started"
        return f"LoopThread({self._name!r}, {state})"

    @property
    def closed(self) -> bool:
        return self._closed

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the private loop and return its result, or raise its exception.

        The exception is the very object the coroutine raised (attributes such as ``partial``
        included). Ctrl-C while waiting cancels the coroutine, lets it unwind, and re-raises.
        """
        self._refuse_own_thread(coro)
        call = _Call(coro)
        try:
            with self._lock:
                if self._closed:
                    coro.close()
                    raise RuntimeError(f"{self._name}: the loop is closed; nothing can run on it")
                # Scheduled under the lock, so that close() cannot stop the loop in between.
                call.schedule(self._started())
            return call.result()
        except KeyboardInterrupt:
            call.abandon()
            raise

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the private loop and return its future at once, without waiting.

        For callers on another loop: ``await asyncio.wrap_future(future)``, and cancelling that
        await cancels the coroutine. Unlike ``run``, the loop's own thread may call this too.
        """
        with self._lock:
            if self._closed:
                coro.close()
                raise RuntimeError(f"{self._name}: the loop is closed; nothing can run on it")
            return asyncio.run_coroutine_threadsafe(coro, self._started())

    def in_loop_thread(self) -> bool:
        """Whether the calling thread is the loop's own (so the caller runs on the loop)."""
        thread = self._thread
        return thread is not None and threading.get_ident() == thread.ident

    def iterate(self, iterator: AsyncIterator[T]) -> SyncIterator[T]:
        """A blocking iterator over ``iterator``: each ``next`` runs one ``__anext__`` here."""
        return SyncIterator(self, iterator)

    def close(self, final: Coroutine[Any, Any, Any] | None = None) -> None:
        """Run ``final`` (e.g. the adapter's ``aclose()``), then stop the loop and its thread.

        Idempotent. If the loop never started, ``final`` is discarded unrun: nothing ran here, so
        there is nothing of ours to clean up (and async objects used elsewhere belong to another
        loop). Coroutines still running here are cancelled, async generators closed.
        """
        self._refuse_own_thread(final)
        with self._lock:
            if self._closed:
                if final is not None:
                    final.close()
                return
            self._closed = True
            loop, thread = self._loop, self._thread
            if loop is None or thread is None:
                if final is not None:
                    final.close()
                return
            done = _Call(_shut_down(final))
            done.schedule(loop)
        try:
            done.result()
        finally:
            if self._finalizer is not None:
                self._finalizer.detach()
            _stop(loop)
            thread.join()

    def _started(self) -> asyncio.AbstractEventLoop:
        """The loop, started in its thread on first use. Call with the lock held."""
        if self._loop is None:
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=_serve, args=(loop,), name=self._name, daemon=True)
            thread.start()
            self._loop, self._thread = loop, thread
            # A runner dropped without close() still stops its thread when it is collected.
            self._finalizer = weakref.finalize(self, _stop, loop)
        return self._loop

    def _refuse_own_thread(self, coro: Coroutine[Any, Any, Any] | None) -> None:
        thread = self._thread
        if thread is not None and threading.get_ident() == thread.ident:
            if coro is not None:
                coro.close()
            raise RuntimeError(
                f"{self._name}: a blocking call was made from the loop's own thread, where it "
                "would wait for itself forever; await the async API (agenerate, astream, "
                "achoose, aclose) there instead"
            )


class SyncIterator(Iterator[T], Generic[T]):
    """A blocking iterator over an async iterator that lives on a :class:`LoopThread`.

    ``close()`` closes the async iterator (``aclose``) on the loop; once it is closed or exhausted,
    ``next`` raises StopIteration.
    """

    def __init__(self, runner: LoopThread, iterator: AsyncIterator[T]) -> None:
        self._runner = runner
        self._iterator = iterator
        self._done = False

    def __iter__(self) -> SyncIterator[T]:
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        item = self._runner.run(_next_or_end(self._iterator))
        if item is _END:
            self._done = True
            raise StopIteration
        return item  # type: ignore[return-value]

    def close(self) -> None:
        """Close the async iterator on the loop; idempotent, and a no-op once the loop closed."""
        if self._done:
            return
        self._done = True
        aclose = getattr(self._iterator, "aclose", None)
        if aclose is None or self._runner.closed:
            # A closed LoopThread has already closed its async generators.
            return
        self._runner.run(aclose())


class _Call(Generic[T]):
    """One coroutine run as a task on the loop, seen from the thread that waits for it."""

    def __init__(self, coro: Coroutine[Any, Any, T]) -> None:
        self._coro = coro
        # The caller's context variables go with the coroutine, as with asyncio.to_thread.
        self._context = contextvars.copy_context()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[T] | None = None
        self._result: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._finished = threading.Event()

    def schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.call_soon_threadsafe(self._start)

    def result(self) -> T:
        return self._result.result()

    def abandon(self) -> None:
        """After Ctrl-C in the waiting thread: cancel the task and give it time to unwind."""
        if self._loop is None:
            self._coro.close()
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing left to cancel
            self._loop.call_soon_threadsafe(self._cancel)
        with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl-C: stop waiting
            self._finished.wait(CANCEL_GRACE_S)

    # On the loop; callbacks run in the order they were queued, so _start before _cancel.

    def _start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._coro, context=self._context)
        self._task.add_done_callback(self._settle)

    def _cancel(self) -> None:
        if self._task is None:  # the interrupt came before _start was queued
            self._coro.close()
            self._finished.set()
        else:
            self._task.cancel()

    def _settle(self, task: asyncio.Task[T]) -> None:
        if task.cancelled():
            self._result.cancel()
        elif (exc := task.exception()) is not None:
            self._result.set_exception(exc)
        else:
            self._result.set_result(task.result())
        self._finished.set()


class _End:
    def __repr__(self) -> str:
        return "<end of iteration>"


_END = _End()


async def _next_or_end(iterator: AsyncIterator[T]) -> T | _End:
    # StopAsyncIteration is returned as a marker rather than raised out of a Task.
    try:
        return await iterator.__anext__()
    except StopAsyncIteration:
        return _END


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        while True:
            try:
                loop.run_forever()  # until close() stops it
                return
            except (KeyboardInterrupt, SystemExit):
                # A task raised one of these: asyncio stored it as the task's exception, then
                # let it out of run_forever. Keep serving, so its waiter gets it and re-raises.
                continue
    finally:
        loop.close()


def _stop(loop: asyncio.AbstractEventLoop) -> None:
    with contextlib.suppress(RuntimeError):  # already closed
        loop.call_soon_threadsafe(loop.stop)


async def _shut_down(final: Coroutine[Any, Any, Any] | None) -> None:
    """``final``, then what asyncio.run does before closing a loop."""
    try:
        if final is not None:
            await final
    finally:
        this = asyncio.current_task()
        others = [task for task in asyncio.all_tasks() if task is not this]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        loop = asyncio.get_running_loop()
        await loop.shutdown_asyncgens()
        await loop.shutdown_default_executor()
