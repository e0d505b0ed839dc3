"""`proxyclient batch`: a JSONL file of prompts in, a JSONL file of results out, resumable.

This module owns the batch job apart from argument parsing (``cli.py``):

* the input: each line ``{"custom_id": ..., "prompt": ..., <GenerationConfig field>: ...}``,
  validated line by line (:func:`parse_input`); a malformed line becomes a :class:`Malformed`
  (its line number, what is wrong, the fix) and is skipped, never the end of the job;
* the output and its resume rules (:func:`plan_resume`, :func:`resume`), below;
* the writer (:class:`ResultWriter`): each finished result is one JSON line, appended and
  flushed as soon as it finishes, in completion order;
* the runner (:func:`run_batch`): at most ``concurrency`` generations in flight on one event loop
  (that many worker coroutines awaiting ``tuner.agenerate``; no thread per prompt), a failure
  becomes that line's ``error`` and never sinks the others;
* the progress bar (:class:`Progress`, tqdm on stderr when it is a terminal) and the one summary
  line (:meth:`BatchStats.summary`).

Output lines have exactly the fields ``custom_id, text, token_ids, finish_reason, usage, error``;
``error`` is null for a finished generation, else the message (``text``/``token_ids`` then hold
what was generated before the failure).

Resume rules. A rerun of the same command reads the output file first:

* an id whose (last) line has ``error: null`` is done and skipped;
* an id of the input whose last line carries an error is retried: its line is removed *before*
  the run starts, so the retry's line is its only one;
* a torn last line (no final newline: the process was killed mid-write) is cut away, so appends
  start on a line boundary; any other line that is not a result line stops the job (exit 2) rather
  than be deleted: we did not write it;
* where a line must be removed, the file is rewritten to a temporary file in the same folder,
  fsynced and moved over the output with ``os.replace`` (atomic: a kill leaves the old file or
  the new one); a torn tail alone is cut with ``os.truncate``.

So the output holds at most one line per id at every moment, not only at the end: a kill at any
point loses at most the generations in flight, which the next run redoes. Lines are flushed (to
the OS, which keeps them when the process dies) but not fsynced one by one: an fsync costs a disk
round trip per line and protects only against an OS crash or power loss, after which the rules
above still apply (a torn tail is cut; a lost line is regenerated). The writer fsyncs once when
it closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from proxyclient.config import OPTIONS, GenerationConfig, json_overrides, show_json
from proxyclient.errors import ConfigError, ProxyClientError
from proxyclient.result import Generation

if TYPE_CHECKING:
    from proxyclient.tuner import ProxyTuner

logger = logging.getLogger(__name__)

CustomId = str | int
OUTPUT_FIELDS = ("custom_id", "text", "token_ids", "finish_reason", "usage", "error")
DEFAULT_CONCURRENCY = 8

_FIELD_NAMES = tuple(option.name for option in OPTIONS)
_EXAMPLE = '{"custom_id": "q1", "prompt": "...", "max_new_tokens": 32}'


# -- input ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchItem:
    """One valid input line: its id, prompt and the GenerationConfig fields it overrides."""

    line: int  # 1-based line number in the input file
    custom_id: CustomId
    prompt: str
    overrides: dict[str, Any] = field(default_factory=dict)

    def config(self, defaults: GenerationConfig) -> GenerationConfig:
        """``defaults`` (the command line's) with this line's overrides applied."""
        return dataclasses.replace(defaults, **self.overrides) if self.overrides else defaults


@dataclass(frozen=True)
class Malformed:
    """An input line that cannot run: where, what is wrong and how to fix it."""

    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


def parse_input(
    lines: Iterable[bytes | str], defaults: GenerationConfig
) -> tuple[list[BatchItem], list[Malformed]]:
    """Validate input lines (without their line ends); blank lines are skipped silently.

    A line is malformed when it is not UTF-8 or not JSON, not an object, lacks a string
    ``prompt`` or a ``custom_id`` (a non-empty string or an integer), repeats an earlier line's
    ``custom_id``, or has another field that is not a GenerationConfig field or whose value
    fails that field's validation (checked against ``defaults`` with the override applied).
    """
    items: list[BatchItem] = []
    malformed: list[Malformed] = []
    seen: dict[CustomId, int] = {}
    for number, raw in enumerate(lines, start=1):
        result = parse_line(raw, number, defaults, seen)
        if result is None:
            continue
        if isinstance(result, Malformed):
            malformed.append(result)
        else:
            seen[result.custom_id] = number
            items.append(result)
    return items, malformed


def parse_line(
    raw: bytes | str,
    number: int,
    defaults: GenerationConfig,
    seen: dict[CustomId, int] | None = None,
) -> BatchItem | Malformed | None:
    """One input line as a BatchItem, a Malformed, or None for a blank line. ``seen`` maps the
    ids of earlier valid lines to their line numbers."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return Malformed(number, f"not UTF-8 ({exc.reason} at byte {exc.start}); save as UTF-8")
    text = raw.removeprefix("\ufeff") if number == 1 else raw
    if not text.strip():
        return None
    try:
        record = json.loads(text)
    except ValueError as exc:
        return Malformed(number, f"not JSON ({exc}); each line must be one object like {_EXAMPLE}")
    if not isinstance(record, dict):
        return Malformed(
            number, f"a JSON {type(record).__name__}, not an object; write it like {_EXAMPLE}"
        )
    if "custom_id" not in record:
        return Malformed(number, "no custom_id; give each line a unique string or integer id")
    custom_id = record.pop("custom_id")
    valid_id = (isinstance(custom_id, str) and custom_id) or (
        isinstance(custom_id, int) and not isinstance(custom_id, bool)
    )
    if not valid_id:
        return Malformed(
            number,
            f"custom_id must be a non-empty string or an integer, got {show_json(custom_id)}",
        )
    if seen is not None and custom_id in seen:
        return Malformed(
            number,
            f"custom_id {show_json(custom_id)} repeats line {seen[custom_id]}'s; ids must be "
            f"unique: rename it",
        )
    prompt = record.pop("prompt", None)
    if not isinstance(prompt, str):
        what = (
            "no prompt" if prompt is None else f"prompt must be a string, got {show_json(prompt)}"
        )
        return Malformed(number, f"{what}; give the line a string prompt")
    unknown = [name for name in record if name not in _FIELD_NAMES]
    if unknown:
        return Malformed(
            number,
            f"unknown field {unknown[0]!r}: a line has custom_id, prompt and any of the "
            f"generation fields {', '.join(_FIELD_NAMES)}; rename or drop it",
        )
    try:
        overrides = json_overrides(record)
    except ConfigError as exc:
        return Malformed(number, f"{exc}; fix it, or drop it to use the command line's value")
    item = BatchItem(number, custom_id, prompt, overrides)
    try:
        item.config(defaults)
    except ConfigError as exc:
        return Malformed(
            number, f"{exc}; fix the value, or drop it to use the command line's value"
        )
    return item


def read_input(
    path: str | Path, defaults: GenerationConfig
) -> tuple[list[BatchItem], list[Malformed]]:
    """:func:`parse_input` of the file at ``path``; ConfigError when it cannot be read."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"cannot read the input file {str(path)!r} ({exc.strerror or exc}); give --input "
            f"a readable JSONL file"
        ) from None
    return parse_input(_split_lines(data), defaults)


def _split_lines(data: bytes) -> list[bytes]:
    """Lines split on b"\\n" only (JSON strings may hold U+2028 and friends), CR trimmed."""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return [line.removesuffix(b"\r") for line in lines]


# -- output and resume ------------------------------------------------------------------------


@dataclass(frozen=True)
class ResumePlan:
    """What an existing output file means for this run, and how to tidy it first.

    ``done``: ids whose last line has ``error: null`` (skipped). ``retry``: ids of the input whose
    last line carries an error (their lines go; they run again). ``lines``: the whole lines to
    keep, in file order. ``rewrite``: a whole line is dropped, so the file is rewritten;
    ``torn_at``: where a torn last line starts (the file is cut there), else None.
    """

    done: frozenset[CustomId]
    retry: frozenset[CustomId]
    lines: tuple[bytes, ...]
    rewrite: bool
    torn_at: int | None


def plan_resume(data: bytes, ids: Iterable[CustomId], *, name: str = "output") -> ResumePlan:
    """Read an output file's bytes (pure). ``ids``: the valid input lines' ids.

    The last line of each id counts: ``error: null`` is done; an error is retried when the id is
    in ``ids`` (the line is dropped), kept otherwise. Earlier lines of an id are superseded and
    dropped. Bytes after the last newline are a torn line. A whole line that is not a result line
    (a JSON object with a string or integer ``custom_id`` and an ``error``) raises ConfigError
    naming it, rather than be deleted."""
    wanted = set(ids)
    end = data.rfind(b"\n") + 1
    torn_at = end if end < len(data) else None
    last: dict[CustomId, int] = {}  # id -> index of its last line
    parsed: list[tuple[bytes, CustomId | None, bool]] = []  # (line, id, has error)
    for number, line in enumerate(data[:end].split(b"\n")[:-1], start=1):
        if not line.strip():
            parsed.append((line, None, False))
            continue
        custom_id, has_error = _result_line(line, number, name)
        last[custom_id] = len(parsed)
        parsed.append((line, custom_id, has_error))
    done: set[CustomId] = set()
    retry: set[CustomId] = set()
    keep: list[bytes] = []
    for index, (line, custom_id, has_error) in enumerate(parsed):
        if custom_id is None or last[custom_id] != index:
            continue  # blank or superseded
        if has_error and custom_id in wanted:
            retry.add(custom_id)
            continue
        if not has_error:
            done.add(custom_id)
        keep.append(line + b"\n")
    return ResumePlan(
        done=frozenset(done),
        retry=frozenset(retry),
        lines=tuple(keep),
        rewrite=len(keep) != len(parsed),
        torn_at=torn_at,
    )


def _result_line(line: bytes, number: int, name: str) -> tuple[CustomId, bool]:
    """(custom_id, whether it carries an error) of a whole output line; ConfigError if it is not
    a result line."""
    try:
        record = json.loads(line)
    except ValueError:
        record = None
    if isinstance(record, dict) and "error" in record:
        custom_id = record.get("custom_id")
        if isinstance(custom_id, str | int) and not isinstance(custom_id, bool):
            return custom_id, record["error"] is not None
    raise ConfigError(
        f"{name} line {number} is not a result line of proxyclient batch (a JSON object with "
        f"custom_id and error); fix or remove it, or choose another --output"
    )


def resume(path: str | Path, ids: Iterable[CustomId]) -> ResumePlan:
    """Read the output file at ``path`` (if any) and tidy it per :func:`plan_resume`: afterwards
    it holds whole lines only, none of them an error line of an id in ``ids``."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        data = b""
    except OSError as exc:
        raise ConfigError(
            f"cannot read the output file {str(path)!r} ({exc.strerror or exc}); give --output a "
            f"writable path"
        ) from None
    plan = plan_resume(data, ids, name=str(path))
    try:
        if plan.rewrite:
            _replace(path, plan.lines)
        elif plan.torn_at is not None:
            os.truncate(path, plan.torn_at)
    except OSError as exc:
        raise ConfigError(
            f"cannot rewrite the output file {str(path)!r} ({exc.strerror or exc}); give "
            f"--output a writable path"
        ) from None
    if plan.torn_at is not None:
        logger.warning("%s: cut a torn last line (a run was killed mid-write)", path)
    return plan


def _replace(path: Path, lines: Sequence[bytes]) -> None:
    """Write ``lines`` to a temporary file next to ``path``, fsync, and move it over ``path``."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.writelines(lines)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def result_line(custom_id: CustomId, generation: Generation, error: str | None) -> dict[str, Any]:
    """The output line of one finished item."""
    return {
        "custom_id": custom_id,
        "text": generation.text,
        "token_ids": list(generation.token_ids),
        "finish_reason": generation.finish_reason,
        "usage": dataclasses.asdict(generation.usage),
        "error": error,
    }


def encode_line(line: dict[str, Any]) -> bytes:
    """One JSON line, UTF-8, newline-terminated (escaped ASCII if the text is not encodable)."""
    try:
        return (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        return (json.dumps(line) + "\n").encode("ascii")


class ResultSink(Protocol):
    def write(self, line: dict[str, Any]) -> None: ...


class ResultWriter:
    """Appends result lines to the output file: one write and one flush per line, so a line is
    with the OS the moment its generation finishes. Use after :func:`resume` (whole lines only)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._file: IO[bytes] = open(self.path, "ab")  # noqa: SIM115 (closed in close())
        except OSError as exc:
            raise ConfigError(
                f"cannot open the output file {str(path)!r} ({exc.strerror or exc}); give "
                f"--output a writable path"
            ) from None

    def write(self, line: dict[str, Any]) -> None:
        try:
            self._file.write(encode_line(line))
            self._file.flush()
        except OSError as exc:
            raise ConfigError(
                f"cannot write to the output file {str(self.path)!r} ({exc.strerror or exc}); "
                f"make room or fix its permissions and rerun: the lines written are kept"
            ) from None

    def close(self) -> None:
        if self._file.closed:
            return
        self._file.flush()
        with contextlib.suppress(OSError):
            os.fsync(self._file.fileno())
        self._file.close()

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- progress and summary ---------------------------------------------------------------------


@dataclass
class BatchStats:
    """Counts behind the progress bar and the summary line."""

    done: int = 0  # generated without error in this run
    failed: int = 0  # ended in error in this run (their lines carry it)
    skipped: int = 0  # already done in the output file
    malformed: int = 0  # input lines skipped as malformed
    tokens: int = 0  # generated tokens, failed generations' partial ones included
    requests: int = 0  # requests to the base
    seconds: float = 0.0

    def add(self, line: dict[str, Any]) -> None:
        """Count one result line (as :func:`result_line` makes it)."""
        if line["error"] is None:
            self.done += 1
        else:
            self.failed += 1
        self.tokens += line["usage"]["completion_tokens"]
        self.requests += line["usage"]["requests"]

    def summary(self) -> str:
        """One line, e.g. ``batch: 37 done, 2 failed, 3 skipped as already done, 1 malformed
        line; 2,560 tokens in 31.2 s, 82.1 tokens/s, 0.40 requests/token; ...``."""
        parts = [f"{self.done:,} done"]
        if self.failed:
            parts.append(f"{self.failed:,} failed")
        if self.skipped:
            parts.append(f"{self.skipped:,} skipped as already done")
        if self.malformed:
            parts.append(f"{self.malformed:,} malformed line{'s' if self.malformed != 1 else ''}")
        seconds = max(self.seconds, 1e-9)
        cost = (
            f"; {self.tokens:,} tokens in {self.seconds:.1f} s, {self.tokens / seconds:.1f} "
            f"tokens/s, {self.requests / max(1, self.tokens):.2f} requests/token"
            if self.done or self.failed
            else ""
        )
        fixes = []
        if self.malformed:
            fixes.append("fix the malformed lines")
        if self.failed or self.malformed:
            fixes.append("rerun the same command to " + ("retry" if self.failed else "run them"))
        tail = f"; {' and '.join(fixes)}" if fixes else ""
        return f"batch: {', '.join(parts)}{cost}{tail}"


class Progress:
    """A tqdm bar on ``file`` (stderr) while it is a terminal: prompts done of those to run,
    ETA, and tokens/s and requests/s as postfix. Silent in pipes and files."""

    def __init__(self, total: int, *, file: IO[str] | None = None) -> None:
        from tqdm import tqdm

        file = sys.stderr if file is None else file
        self._started = time.perf_counter()
        self._bar = tqdm(
            total=total,
            file=file,
            disable=not _isatty(file),
            unit="prompt",
            desc="batch",
            dynamic_ncols=True,
        )

    def update(self, stats: BatchStats) -> None:
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        self._bar.set_postfix_str(
            f"{stats.tokens / elapsed:.1f} tok/s, {stats.requests / elapsed:.1f} req/s",
            refresh=False,
        )
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()


def _isatty(file: IO[str]) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):
        return False


# -- the runner -------------------------------------------------------------------------------


async def run_batch(
    tuner: ProxyTuner,
    items: Sequence[BatchItem],
    config: GenerationConfig,
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    output: ResultSink,
    progress: Progress | None = None,
) -> BatchStats:
    """Generate every item (``config`` with the item's overrides), at most ``concurrency`` at a
    time, writing each result line to ``output`` as it finishes. A failed generation's line
    carries the error and what was generated before it; the others go on."""
    if concurrency < 1:
        raise ConfigError(f"concurrency must be >= 1, got {concurrency}")
    stats = BatchStats()
    started = time.perf_counter()
    pending = iter(items)

    async def one(item: BatchItem) -> None:
        try:
            generation, error = await tuner.agenerate(item.prompt, item.config(config)), None
        except ProxyClientError as exc:
            generation, error = exc.partial or Generation("", [], "error"), str(exc)
        except Exception as exc:  # a bug must not sink the other lines either
            logger.info("custom_id %s failed", show_json(item.custom_id), exc_info=True)
            generation, error = Generation("", [], "error"), f"{type(exc).__name__}: {exc}"
        line = result_line(item.custom_id, generation, error)
        output.write(line)
        stats.add(line)
        if progress is not None:
            progress.update(stats)

    async def worker() -> None:
        # The bound: `concurrency` of these share one iterator, so no more generations run at
        # once and no task exists per prompt before its turn.
        for item in pending:
            await one(item)

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(min(concurrency, len(items))):
                group.create_task(worker())
    except BaseExceptionGroup as failure:  # the output could not be written: stop, say why
        raise failure.exceptions[0] from None
    finally:
        stats.seconds = time.perf_counter() - started
    return stats
