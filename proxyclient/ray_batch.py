"""`proxyclient batch --ray`: the same batch job, its generations spread over Ray actors.

The driver (this process) does what needs the whole file in one place: it validates the input
(line numbers in the messages), applies the resume rules to the output, and is the only writer
of the output file, so the format and the resume rules are exactly those of ``batch.py``. The
generations run in Ray Data's ``map_batches`` over an actor pool: each actor holds one
``ProxyTuner`` (the local models load once per actor, on the GPUs Ray gives it) and runs each
batch of prompts concurrently with ``batch.run_batch`` on its own event loop, so the batch's
local forwards share batched forwards as in one process. Result lines stream back to the driver
as batches finish and are appended and flushed one by one; a killed job loses only the batches
in flight, which the rerun redoes.

Ray is an optional dependency (``pip install 'proxyclient[ray]'``); everything here imports it
lazily.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from proxyclient.batch import BatchItem, BatchStats, Progress, ResultSink, run_batch
from proxyclient.config import GenerationConfig
from proxyclient.errors import ConfigError

if TYPE_CHECKING:
    from proxyclient.tuner import ProxyTuner

TunerFactory = Callable[[], "ProxyTuner"]


def import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError:
        raise ConfigError("--ray needs Ray with Ray Data: pip install 'proxyclient[ray]'") from None
    return ray


class _Lines:
    """A ResultSink that keeps the lines, for an actor to return them."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []

    def write(self, line: dict[str, Any]) -> None:
        self.lines.append(line)


class TunerActor:
    """One Ray actor: a ProxyTuner built once, then a batch of items at a time."""

    def __init__(
        self, make_tuner: TunerFactory, config: GenerationConfig, concurrency: int, threads: int
    ) -> None:
        import torch

        # An actor shares its node's cores with the others (and often with a server): without
        # a bound, every actor's torch takes them all and they spin against each other.
        torch.set_num_threads(threads)
        self._loop = asyncio.new_event_loop()
        self._tuner = make_tuner()
        self._config = config
        self._concurrency = concurrency

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        items = [_decode_item(text) for text in batch["item"]]
        sink = _Lines()
        self._loop.run_until_complete(
            run_batch(self._tuner, items, self._config, concurrency=self._concurrency, output=sink)
        )
        return {"line": [json.dumps(line, ensure_ascii=False) for line in sink.lines]}


def _encode_item(item: BatchItem) -> str:
    # JSON text, not columns: custom_ids may mix strings and integers, which Arrow cannot.
    return json.dumps([item.line, item.custom_id, item.prompt, item.overrides])


def _decode_item(text: str) -> BatchItem:
    line, custom_id, prompt, overrides = json.loads(text)
    # parse_line keeps JSON arrays as tuples (GenerationConfig's sequences are tuples)
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return BatchItem(line, custom_id, prompt, overrides)


def run_on_ray(
    make_tuner: TunerFactory,
    items: Sequence[BatchItem],
    config: GenerationConfig,
    *,
    output: ResultSink,
    workers: int,
    concurrency: int,
    gpus_per_worker: float = 0.0,
    address: str | None = None,
    progress: Progress | None = None,
    verbose: bool = False,
) -> BatchStats:
    """Generate ``items`` on ``workers`` Ray actors (``concurrency`` generations in flight in
    each), writing each result line to ``output`` on this process as it comes back. ``address``
    is a running cluster's (``ray://host:10001`` or ``auto``); None starts a local Ray. Ray's
    own logs and progress go to stderr only when ``verbose``: the job's progress is ``progress``."""
    import logging
    import time

    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    ray = import_ray()
    if not verbose:
        logging.getLogger("ray").setLevel(logging.WARNING)
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
    if not ray.is_initialized():
        quiet = {} if verbose else {"logging_level": logging.ERROR, "log_to_driver": False}
        if address is None:
            # A local instance sized to the job: one CPU per actor, on this machine's cores.
            cpus = max(workers, os.cpu_count() or 1)
            ray.init(num_cpus=cpus, include_dashboard=False, **quiet)
        else:
            ray.init(address=address, **quiet)
    stats = BatchStats()
    started = time.perf_counter()
    rows = [{"item": _encode_item(item)} for item in items]
    dataset = ray.data.from_items(rows, override_num_blocks=max(1, len(rows) // concurrency))
    results = dataset.map_batches(
        TunerActor,
        fn_constructor_args=(make_tuner, config, concurrency, 1),
        batch_size=concurrency,
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=1,
        num_gpus=gpus_per_worker or None,
        batch_format="numpy",
    )
    try:
        for row in results.iter_rows():
            line = json.loads(row["line"])
            output.write(line)
            stats.add(line)
            if progress is not None:
                progress.update(stats)
    finally:
        stats.seconds = time.perf_counter() - started
    return stats
