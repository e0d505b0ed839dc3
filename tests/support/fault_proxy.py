"""A fault-injecting HTTP proxy for tests: between a client and a real server, on a schedule.

Standard library only (asyncio, in a thread of its own). It speaks just enough HTTP/1.1: it reads
each request (headers and a Content-Length body) on a kept-alive client connection, forwards it
upstream on a fresh connection, and answers with a Content-Length response. Each request whose
path contains ``fault_path`` takes the next fault from the schedule; other requests pass.

Faults (``Fault.kind``):

- ``pass``: forwarded untouched;
- ``drop``: the connection is closed without an answer;
- ``reset``: half of the upstream answer, then a TCP reset;
- ``hang``: nothing for ``seconds`` (past the client's read timeout), then the connection closes;
- ``status``: an error answer ``status`` (500, 502, 503, 429, ...) with ``headers`` (Retry-After)
  and an OpenAI-style error body, without asking upstream;
- ``truncate``: upstream's 200 cut in half, sent as a complete (well-framed) answer;
- ``malformed``: a 200 whose body is not JSON;
- ``nan``: upstream's 200 with every floating-point number replaced by NaN;
- ``missing``: upstream's 200 without its logprobs (``choices[0].logprobs`` null);
- ``echo_auth``: an error answer ``status`` whose body repeats the request's Authorization header
  (what a careless server does with a wrong key), for tests that the key never leaks.

The schedule is a list of faults, one per matching request, then ``then`` for the rest (``pass``
by default); or a probability: each matching request independently faulty with ``rate``, the
fault drawn from ``mix`` with a seeded RNG.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import struct
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

KINDS = (
    "pass",
    "drop",
    "reset",
    "hang",
    "status",
    "truncate",
    "malformed",
    "nan",
    "missing",
    "echo_auth",
)


@dataclass(frozen=True)
class Fault:
    kind: str = "pass"
    status: int = 503
    headers: tuple[tuple[str, str], ...] = ()
    seconds: float = 0.0  # hang

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault {self.kind!r}; one of {KINDS}")

    def __str__(self) -> str:
        if self.kind in ("status", "echo_auth"):
            extra = "".join(f" {k}: {v}" for k, v in self.headers)
            return f"{self.kind} {self.status}{extra}"
        return f"hang {self.seconds:g}s" if self.kind == "hang" else self.kind


PASS = Fault()
BODY_KEPT = 400  # bytes of each request body a Record keeps


@dataclass
class _Request:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


@dataclass
class Record:
    """One request the proxy saw: its path, the fault it got, its body's first bytes."""

    path: str
    fault: Fault
    body: bytes = b""


@dataclass
class _Schedule:
    faults: list[Fault] = field(default_factory=list)
    then: Fault = PASS
    rate: float = 0.0
    mix: Sequence[Fault] = ()
    rng: random.Random = field(default_factory=random.Random)

    def next(self) -> Fault:
        if self.faults:
            return self.faults.pop(0)
        if self.rate and self.rng.random() < self.rate:
            return self.rng.choice(list(self.mix))
        return self.then


class FaultProxy:
    """Listens on 127.0.0.1 (a free port) and forwards to ``upstream`` (``host:port``)."""

    def __init__(self, upstream: str, *, fault_path: str = "/completions") -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host or "127.0.0.1", int(port))
        self.fault_path = fault_path
        self.records: list[Record] = []
        self._schedule = _Schedule()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    # -- control, from the test's thread ---------------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(timeout=10)
        return self

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def schedule(self, faults: Iterable[Fault] = (), then: Fault = PASS) -> None:
        """The next matching requests get ``faults``, one each, and the rest ``then``."""
        with self._lock:
            self._schedule = _Schedule(list(faults), then)
            self.records = []

    def random_faults(self, rate: float, mix: Sequence[Fault], seed: int = 0) -> None:
        """Each matching request is faulty with probability ``rate``, its fault drawn from
        ``mix``."""
        with self._lock:
            self._schedule = _Schedule(rate=rate, mix=list(mix), rng=random.Random(seed))
            self.records = []

    def take_records(self) -> list[Record]:
        """The records so far, which are then forgotten."""
        with self._lock:
            records, self.records = self.records, []
            return records

    def counts(self) -> Counter[str]:
        """How many matching requests got each fault."""
        with self._lock:
            return Counter(str(r.fault) for r in self.records)

    # -- the proxy, on its own loop --------------------------------------------------------------

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def _next_fault(self, request: _Request) -> Fault:
        with self._lock:
            if self.fault_path not in request.path:
                return PASS
            fault = self._schedule.next()
            self.records.append(Record(request.path, fault, request.body[:BODY_KEPT]))
            return fault

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    return
                fault = self._next_fault(request)
                if not await self._answer(request, fault, writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            return
        except asyncio.CancelledError:  # stop(): ending quietly (3.11 logs a cancelled handler)
            return
        finally:
            self._writers.discard(writer)
            writer.transport.abort() if fault_is_reset(writer) else writer.close()

    async def _answer(self, request: _Request, fault: Fault, writer: asyncio.StreamWriter) -> bool:
        """Answer one request as ``fault`` says; False when the connection is to end."""
        kind = fault.kind
        if kind == "drop":
            return False
        if kind == "hang":
            await asyncio.sleep(fault.seconds)
            return False
        if kind == "status":
            body = json.dumps({"error": {"message": f"injected {fault.status}"}}).encode()
            await _respond(writer, fault.status, body, fault.headers)
            return True
        if kind == "echo_auth":
            said = request.header("authorization") or "(none)"
            body = json.dumps({"error": {"message": f"bad key: {said}"}}).encode()
            await _respond(writer, fault.status, body, fault.headers)
            return True
        if kind == "malformed":
            await _respond(writer, 200, b"<html>Bad gateway, but 200</html>")
            return True
        try:
            status, headers, body = await self._forward(request)
        except OSError:  # upstream down: what a reverse proxy says
            await _respond(writer, 502, b'{"error": {"message": "upstream unreachable"}}')
            return True
        if status == 200 and kind != "pass":
            if kind == "reset":
                head = _head(200, len(body), headers)
                writer.write(head + body[: len(body) // 2])
                await writer.drain()
                _mark_reset(writer)
                return False
            body = _spoil(kind, body)
        await _respond(writer, status, body, headers)
        return True

    async def _forward(self, request: _Request) -> tuple[int, list[tuple[str, str]], bytes]:
        reader, writer = await asyncio.open_connection(*self.upstream)
        try:
            skip = {"connection", "content-length", "keep-alive", "transfer-encoding"}
            lines = [f"{request.method} {request.path} HTTP/1.1"]
            lines += [f"{k}: {v}" for k, v in request.headers if k.lower() not in skip]
            lines += [f"Content-Length: {len(request.body)}", "Connection: close", "", ""]
            writer.write("\r\n".join(lines).encode("latin-1") + request.body)
            await writer.drain()
            raw = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        return _parse_response(raw)


def fault_is_reset(writer: asyncio.StreamWriter) -> bool:
    return bool(getattr(writer, "_fault_reset", False))


def _mark_reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:  # SO_LINGER 0: close() sends RST, not FIN
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer._fault_reset = True  # type: ignore[attr-defined]


async def _read_request(reader: asyncio.StreamReader) -> _Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = [tuple(line.split(":", 1)) for line in lines[1:] if ":" in line]
    headers = [(k.strip(), v.strip()) for k, v in headers]
    length = int(next((v for k, v in headers if k.lower() == "content-length"), "0"))
    body = await reader.readexactly(length) if length else b""
    return _Request(method, path, headers, body)


def _parse_response(raw: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = [tuple(x.strip() for x in line.split(":", 1)) for line in lines[1:] if ":" in line]
    if any(k.lower() == "transfer-encoding" and "chunked" in v.lower() for k, v in headers):
        body = _dechunk(body)
    keep = [
        (k, v)
        for k, v in headers
        if k.lower() not in {"content-length", "transfer-encoding", "connection", "keep-alive"}
    ]
    return status, keep, body


def _dechunk(data: bytes) -> bytes:
    out, rest = bytearray(), data
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        rest = rest[size + 2 :]
    return bytes(out)


def _head(status: int, length: int, headers: Iterable[tuple[str, str]] = ()) -> bytes:
    lines = [f"HTTP/1.1 {status} X"]
    lines += [f"{k}: {v}" for k, v in headers if k.lower() != "content-type"]
    lines += ["Content-Type: application/json", f"Content-Length: {length}", "", ""]
    return "\r\n".join(lines).encode("latin-1")


async def _respond(
    writer: asyncio.StreamWriter,
    status: int,
    body: bytes,
    headers: Iterable[tuple[str, str]] = (),
) -> None:
    writer.write(_head(status, len(body), headers) + body)
    await writer.drain()


def _spoil(kind: str, body: bytes) -> bytes:
    if kind == "truncate":
        return body[: len(body) // 2]
    data = json.loads(body)
    if kind == "nan":
        return json.dumps(_nan_floats(data)).encode()
    if kind == "missing":
        for choice in data.get("choices") or []:
            choice["logprobs"] = None
        return json.dumps(data).encode()
    raise ValueError(kind)


def _nan_floats(value: Any) -> Any:
    if isinstance(value, float):
        return float("nan")
    if isinstance(value, dict):
        return {k: _nan_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_floats(v) for v in value]
    return value
