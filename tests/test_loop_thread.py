"""LoopThread, the private loop behind the sync API: from plain code and inside a running loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import gc
import signal
import threading
import time
import warnings

import pytest

from proxyclient.loop_thread import LoopThread
from proxyclient.stream import AsyncGenerationStream, GenerationStream


async def running_loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


async def add(a: int, b: int) -> int:
    await asyncio.sleep(0)
    return a + b


async def count(n: int, log: list[str]):
    try:
        for i in range(n):
            await asyncio.sleep(0)
            yield i
    finally:
        log.append(f"finally on {threading.current_thread().name}")


class Failure(Exception):
    def __init__(self, partial: object) -> None:
        super().__init__("failed")
        self.partial = partial


@pytest.fixture
def runner():
    runner = LoopThread("test-loop")
    yield runner
    runner.close()


def test_run_returns_the_result_on_one_private_loop_for_every_call(runner):
    assert runner.run(add(2, 3)) == 5
    loops = {runner.run(running_loop()) for _ in range(3)}
    assert len(loops) == 1
    (loop,) = loops
    assert loop.is_running()
    assert runner.run(_thread_name()) == "test-loop" != threading.current_thread().name


async def _thread_name() -> str:
    return threading.current_thread().name


def test_run_works_inside_a_running_loop_and_never_uses_the_callers_loop(runner):
    plain = runner.run(running_loop())

    async def app():
        mine = asyncio.get_running_loop()
        theirs = runner.run(running_loop())
        pieces = list(runner.iterate(count(3, [])))
        return mine, theirs, runner.run(add(1, 1)), pieces

    mine, theirs, total, pieces = asyncio.run(app())
    assert theirs is plain
    assert theirs is not mine
    assert total == 2
    assert pieces == [0, 1, 2]
    assert runner.run(running_loop()) is plain  # still the same loop after asyncio.run ended


def test_exceptions_come_out_as_the_very_object_raised(runner):
    raised: list[BaseException] = []
    partial = object()

    async def fail():
        error = Failure(partial)
        raised.append(error)
        raise error

    with pytest.raises(Failure) as caught:
        runner.run(fail())
    assert caught.value is raised[0]
    assert caught.value.partial is partial

    async def app():
        with pytest.raises(Failure) as inside:
            runner.run(fail())
        return inside.value

    assert asyncio.run(app()) is raised[1]


def test_a_task_raising_system_exit_reaches_the_caller_and_the_loop_survives():
    # asyncio lets SystemExit/KeyboardInterrupt out of run_forever: the loop must carry on.
    runner = LoopThread("test-loop")  # not the fixture: a dead loop could not be closed
    loop = runner.run(running_loop())

    async def leave():
        raise SystemExit(3)

    outcome: list[BaseException] = []

    def call():
        try:
            runner.run(leave())
        except BaseException as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=call, daemon=True)
    waiter.start()
    waiter.join(timeout=10)
    assert not waiter.is_alive(), "the caller waits forever"
    assert [type(e) for e in outcome] == [SystemExit]
    assert outcome[0].code == 3
    assert runner.run(running_loop()) is loop
    assert runner.run(add(1, 2)) == 3
    runner.close()


def test_calling_run_from_the_loop_thread_fails_instead_of_deadlocking():
    runner = LoopThread("test-loop")  # not the fixture: a deadlocked loop could not be closed

    async def reenter():
        runner.run(add(1, 1))

    async def close_from_inside():
        runner.close()

    outcome: list[BaseException] = []

    def call(coro_fn):
        try:
            runner.run(coro_fn())
        except BaseException as exc:
            outcome.append(exc)

    for coro_fn in (reenter, close_from_inside):
        waiter = threading.Thread(target=call, args=(coro_fn,), daemon=True)
        waiter.start()
        waiter.join(timeout=10)
        assert not waiter.is_alive(), "deadlocked"  # (leaving the stuck daemon thread behind)
    assert [type(e) for e in outcome] == [RuntimeError, RuntimeError]
    assert all("own thread" in str(e) for e in outcome)
    assert not runner.closed
    assert runner.run(add(2, 2)) == 4
    runner.close()


def test_calls_from_several_threads_share_the_loop_and_overlap(runner):
    # Each call waits until all four are in the loop: that completes only if they overlap (one
    # after another, the first would time out waiting for the others).
    everyone = asyncio.Barrier(4)

    async def meet():
        await asyncio.wait_for(everyone.wait(), timeout=10)
        return asyncio.get_running_loop()

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        loops = list(pool.map(lambda _: runner.run(meet()), range(4)))
    assert len(set(loops)) == 1


def test_the_callers_context_variables_go_along(runner):
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")

    async def read():
        return var.get()

    var.set("caller")
    assert runner.run(read()) == "caller"


def test_iterate_yields_every_item_then_stops(runner):
    log: list[str] = []
    items = runner.iterate(count(4, log))
    assert list(items) == [0, 1, 2, 3]
    assert log == ["finally on test-loop"]
    with pytest.raises(StopIteration):
        next(items)


def test_closing_the_iterator_closes_the_async_one_on_the_loop(runner):
    log: list[str] = []
    items = runner.iterate(count(10, log))
    assert next(items) == 0
    assert next(items) == 1
    assert log == []
    items.close()
    assert log == ["finally on test-loop"]
    with pytest.raises(StopIteration):
        next(items)
    items.close()
    assert log == ["finally on test-loop"]


def test_iteration_errors_propagate_as_raised(runner):
    raised = Failure("half")

    async def broken():
        yield "a"
        raise raised

    items = runner.iterate(broken())
    assert next(items) == "a"
    with pytest.raises(Failure) as caught:
        next(items)
    assert caught.value is raised
    with pytest.raises(StopIteration):
        next(items)


def test_close_runs_the_final_coroutine_then_stops_the_thread():
    runner = LoopThread("closing")
    loop = runner.run(running_loop())
    thread = runner.run(_current_thread())
    ran_on: list[asyncio.AbstractEventLoop] = []

    async def final():
        ran_on.append(asyncio.get_running_loop())

    runner.close(final())
    assert ran_on == [loop]
    assert runner.closed
    assert not thread.is_alive()
    assert loop.is_closed()
    runner.close(final())  # idempotent; the second final is discarded, not run
    assert ran_on == [loop]
    with pytest.raises(RuntimeError, match="closed; nothing can run"):
        runner.run(add(1, 1))


async def _current_thread() -> threading.Thread:
    return threading.current_thread()


def test_close_closes_async_generators_left_open():
    runner = LoopThread("closing")
    log: list[str] = []
    items = runner.iterate(count(10, log))
    assert next(items) == 0
    runner.close()
    assert log == ["finally on closing"]
    items.close()  # after the loop is gone: a no-op, not an error
    assert log == ["finally on closing"]


def test_close_propagates_a_failing_final_but_still_stops():
    runner = LoopThread("closing")
    thread = runner.run(_current_thread())

    async def final():
        raise Failure(None)

    with pytest.raises(Failure):
        runner.close(final())
    assert runner.closed
    assert not thread.is_alive()


def test_close_without_ever_starting_starts_nothing_and_discards_final():
    before = {t.name for t in threading.enumerate()}
    runner = LoopThread("never-started")
    ran: list[bool] = []

    async def final():
        ran.append(True)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runner.close(final())
        runner.close()
        gc.collect()
    assert ran == []
    assert [str(w.message) for w in caught if "never awaited" in str(w.message)] == []
    assert "never-started" not in {t.name for t in threading.enumerate()} - before
    assert runner.closed


def test_a_runner_dropped_without_close_stops_its_thread():
    runner = LoopThread("dropped")
    thread = runner.run(_current_thread())
    assert thread.is_alive()
    del runner
    gc.collect()
    thread.join(timeout=10)
    assert not thread.is_alive()


@pytest.mark.skipif(
    signal.getsignal(signal.SIGINT) is not signal.default_int_handler,
    reason="needs Python's own SIGINT handler",
)
def test_ctrl_c_while_waiting_cancels_the_coroutine_and_re_raises(runner):
    started = threading.Event()
    cancelled = threading.Event()

    async def slow():
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            await asyncio.sleep(0.1)  # unwinding takes a moment; run() waits for it
            cancelled.set()
            raise

    main = threading.main_thread().ident
    assert threading.get_ident() == main

    def interrupt():
        if started.wait(10):
            time.sleep(0.2)  # let run() get to its wait (an earlier Ctrl-C is handled too)
            signal.pthread_kill(main, signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        runner.run(slow())
    assert time.perf_counter() - start < 10
    assert cancelled.is_set()
    assert runner.run(add(1, 2)) == 3


def test_generation_stream_iterates_on_the_runner_and_closes_there(runner):
    log: list[str] = []

    async def pieces():
        try:
            for piece in ["a", "b", "c"]:
                yield piece
        finally:
            log.append(threading.current_thread().name)

    seen: list[str] = []
    result = object()
    stream = GenerationStream(AsyncGenerationStream(pieces(), lambda: result), runner)
    assert iter(stream) is stream
    seen.append(next(stream))
    stream.close()
    assert seen == ["a"]
    assert log == ["test-loop"]
    assert list(stream) == []
    assert stream.generation is result

    full = GenerationStream(AsyncGenerationStream(pieces(), lambda: result), runner)
    assert "".join(full) == "abc"
