"""A base with no compute, for benchmarks: an HTTP server that records a real server's answers
and replays them after a fixed round trip.

    .venv/bin/python scripts/replay_server.py record FILE --upstream http://127.0.0.1:8000
    .venv/bin/python scripts/replay_server.py replay FILE [--rtt 50] [--port 8001]

``record`` proxies every request to ``--upstream`` (any path: ``/v1/completions``,
``/v1/models``, ``/tokenize``, the discovery probes) and stores the answer (status, content type,
body) keyed by the exact request: method, path with query, and the body as canonical JSON (keys
sorted, no spaces; raw bytes when it is not JSON). Answers of 5xx and 429 are passed on but not
stored. An existing FILE is read first and added to; it is written (gzip, one JSON object a line)
when the server stops. ``replay`` answers each request from FILE after ``--rtt`` ms (also
settable in record mode, default 0 there); a request it holds no answer for is a *miss*: HTTP 410
with an OpenAI-style error body, counted. Streaming is not needed: proxyclient's adapters ask for
whole JSON answers (drafts included), so a stored body is the whole answer.

``GET /_replay/stats`` returns the counters as JSON (mode, entries, hits, misses, recorded, not
stored, the first missed keys, how many client connections it saw, this process's CPU seconds);
``POST /_replay/reset`` zeroes them. At exit the same line is printed to stderr. ``ReplayServer``
runs it in a subprocess (so that its CPU time is not the caller's) that stops when the caller
closes its stdin.

aiohttp (server and the recording proxy's client): already installed with the project's test
dependencies; nothing here is a dependency of proxyclient itself.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

MISS_STATUS = 410
FORMAT = "proxyclient-replay/1"
STATS_PATH = "/_replay/stats"
RESET_PATH = "/_replay/reset"
MAX_MISSED_KEYS = 5


def canonical_key(method: str, path_qs: str, body: bytes) -> str:
    """The request as a recording's key: ``METHOD PATH?QUERY`` and the canonical body."""
    if not body:
        canonical = ""
    else:
        try:
            canonical = json.dumps(
                json.loads(body), sort_keys=True, separators=(",", ":"), ensure_ascii=False
            )
        except (ValueError, UnicodeDecodeError):
            canonical = "bytes:" + base64.b64encode(body).decode()
    return f"{method.upper()} {path_qs}\n{canonical}"


def _encode_body(body: bytes) -> dict[str, str]:
    try:
        return {"text": body.decode("utf-8")}
    except UnicodeDecodeError:
        return {"b64": base64.b64encode(body).decode()}


def _decode_body(entry: dict[str, Any]) -> bytes:
    if "text" in entry:
        return entry["text"].encode("utf-8")
    return base64.b64decode(entry["b64"])


def load_recording(path: Path) -> dict[str, tuple[int, str, bytes]]:
    """key -> (status, content type, body) from a recording file (empty when absent)."""
    answers: dict[str, tuple[int, str, bytes]] = {}
    if not path.exists():
        return answers
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        header = json.loads(next(lines))
        if header.get("format") != FORMAT:
            raise SystemExit(f"{path}: not a recording of this server ({header!r})")
        for line in lines:
            entry = json.loads(line)
            answers[entry["key"]] = (entry["status"], entry["content_type"], _decode_body(entry))
    return answers


def save_recording(path: Path, answers: dict[str, tuple[int, str, bytes]]) -> None:
    """Write ``answers`` to ``path`` atomically (a temporary file, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with gzip.open(temporary, "wt", encoding="utf-8") as out:
        out.write(json.dumps({"format": FORMAT, "entries": len(answers)}) + "\n")
        for key, (status, content_type, body) in answers.items():
            entry = {"key": key, "status": status, "content_type": content_type}
            out.write(json.dumps(entry | _encode_body(body), ensure_ascii=False) + "\n")
    os.replace(temporary, path)


class Replayer:
    """The request handler and its counters; one per server process."""

    def __init__(self, mode: str, path: Path, rtt_ms: float, upstream: str | None) -> None:
        self.mode = mode
        self.path = path
        self.rtt_s = rtt_ms / 1e3
        self.upstream = upstream.rstrip("/") if upstream else None
        self.answers = load_recording(path)
        self.loaded = len(self.answers)
        self.session: Any = None  # aiohttp.ClientSession, record mode only
        self.reset()

    def reset(self) -> None:
        self.hits = self.misses = self.recorded = self.not_stored = 0
        self.missed_keys: list[str] = []
        self.peers: set[Any] = set()  # the client's connections (address, port) seen

    def stats(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "file": str(self.path),
            "entries": len(self.answers),
            "hits": self.hits,
            "misses": self.misses,
            "recorded": self.recorded,
            "not_stored": self.not_stored,
            "missed_keys": self.missed_keys,
            "connections": len(self.peers),
            "cpu_s": round(time.process_time(), 3),
        }

    async def handle(self, request: Any) -> Any:
        from aiohttp import web

        if request.path == STATS_PATH:
            return web.json_response(self.stats())
        if request.path == RESET_PATH and request.method == "POST":
            self.reset()
            return web.json_response(self.stats())
        if request.transport is not None:
            self.peers.add(request.transport.get_extra_info("peername"))
        body = await request.read()
        key = canonical_key(request.method, request.path_qs, body)
        if self.mode == "record":
            status, content_type, answer = await self._forward(request, body)
            if status >= 500 or status == 429:
                self.not_stored += 1
            else:
                self.recorded += key not in self.answers
                self.answers[key] = (status, content_type, answer)
        else:
            found = self.answers.get(key)
            if found is None:
                self.misses += 1
                if len(self.missed_keys) < MAX_MISSED_KEYS:
                    self.missed_keys.append(key[:300])
                message = f"replay miss: no recorded answer for {request.method} {request.path_qs}"
                error = {"error": {"message": message, "type": "replay_miss"}}
                return web.json_response(error, status=MISS_STATUS)
            self.hits += 1
            status, content_type, answer = found
        if self.rtt_s > 0:
            await asyncio.sleep(self.rtt_s)
        return web.Response(status=status, body=answer, headers={"Content-Type": content_type})

    async def _forward(self, request: Any, body: bytes) -> tuple[int, str, bytes]:
        import aiohttp

        if self.session is None:
            connector = aiohttp.TCPConnector(limit=0)
            self.session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=600)
            )
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        async with self.session.request(
            request.method, f"{self.upstream}{request.path_qs}", data=body, headers=headers
        ) as answer:
            content = await answer.read()
            return answer.status, answer.content_type or "application/octet-stream", content


async def serve(replayer: Replayer, sock: socket.socket, stop: asyncio.Event) -> None:
    from aiohttp import web

    app = web.Application(client_max_size=64 * 2**20)
    app.router.add_route("*", "/{tail:.*}", replayer.handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.SockSite(runner, sock, backlog=1024).start()
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        if replayer.session is not None:
            await replayer.session.close()


def run_server(args: argparse.Namespace) -> int:
    if args.mode == "record" and not args.upstream:
        raise SystemExit("record mode needs --upstream URL (the real server, without /v1)")
    rtt = args.rtt if args.rtt is not None else (0.0 if args.mode == "record" else 50.0)
    replayer = Replayer(args.mode, args.file, rtt, args.upstream)
    if args.mode == "replay" and not replayer.answers:
        raise SystemExit(f"{args.file}: no recording (run in record mode first)")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(1024)  # connections wait in the backlog until the server accepts them
    print(sock.getsockname()[1], flush=True)
    print(
        f"replay_server: {args.mode}, {replayer.loaded} answers from {args.file}, "
        f"{rtt:g} ms round trip, http://{args.host}:{sock.getsockname()[1]}",
        file=sys.stderr,
        flush=True,
    )

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        if args.stop_on_stdin_eof:

            def watch_stdin() -> None:
                with contextlib.suppress(OSError, ValueError):
                    while sys.stdin.readline():
                        pass
                loop.call_soon_threadsafe(stop.set)

            threading.Thread(target=watch_stdin, daemon=True).start()
        await serve(replayer, sock, stop)

    asyncio.run(main())
    if args.mode == "record":
        save_recording(args.file, replayer.answers)
    print(f"replay_server: {json.dumps(replayer.stats())}", file=sys.stderr, flush=True)
    return 0


class ReplayServer:
    """``scripts/replay_server.py`` in a subprocess on 127.0.0.1; stops when closed (its stdin
    closes), saving the recording in record mode. ``stats()`` reads its counters."""

    def __init__(
        self,
        mode: str,
        file: Path,
        *,
        upstream: str | None = None,
        rtt_ms: float | None = None,
        log: Path | None = None,
    ) -> None:
        self.mode, self.file, self.upstream, self.rtt_ms = mode, Path(file), upstream, rtt_ms
        self.log = log
        self.port = 0
        self.pid = 0
        self._process: subprocess.Popen[str] | None = None
        self._log_file: Any = None

    def start(self) -> ReplayServer:
        command = [sys.executable, __file__, self.mode, str(self.file), "--stop-on-stdin-eof"]
        if self.upstream:
            command += ["--upstream", self.upstream]
        if self.rtt_ms is not None:
            command += ["--rtt", str(self.rtt_ms)]
        self._log_file = self.log.open("a") if self.log else None
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            text=True,
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line.strip().isdigit():
            self.close()
            raise RuntimeError(f"the replay server did not start (said {line!r})")
        self.port, self.pid = int(line), self._process.pid
        return self

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stats(self, reset: bool = False) -> dict[str, Any]:
        import urllib.request

        url = self.root_url + (RESET_PATH if reset else STATS_PATH)
        request = urllib.request.Request(url, method="POST" if reset else "GET")
        with urllib.request.urlopen(request, timeout=10) as answer:
            return json.loads(answer.read())

    def close(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            with contextlib.suppress(OSError):
                if process.stdin is not None:
                    process.stdin.close()
            try:
                process.wait(timeout=60)  # record mode writes the file first
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> ReplayServer:
        return self.start() if self._process is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["record", "replay"])
    parser.add_argument("file", type=Path, help="the recording (.jsonl.gz)")
    parser.add_argument("--upstream", help="record: the real server's root URL")
    parser.add_argument(
        "--rtt", type=float, default=None, help="ms before each answer (replay 50, record 0)"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="default: a free port")
    parser.add_argument("--stop-on-stdin-eof", action="store_true", help=argparse.SUPPRESS)
    return run_server(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
