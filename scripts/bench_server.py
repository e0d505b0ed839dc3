"""The OpenAI-compatible server under load: N concurrent streaming clients over loopback.

The miniature's base-large, steered by expert-small / base-small in a `proxyclient serve` process
(torch 1 thread, the default speculation `auto`, k = 20); N clients (asyncio + httpx in this
process) each stream R completions one after another (greedy, 64 tokens, held-out questions of
the miniature as in bench_throughput.py). Per N: generated tokens/s over the run, time to first
token (request sent to first text chunk), inter-token latency (gap between successive text chunks
of a stream; speculation delivers an accepted draft as several chunks at once, so its gaps are
near 0), the server process's CPU over the run (100%: one core), and errors (non-200, error
events, exceptions: must be 0). ``--abusive N ...`` (default 32): those numbers of clients again,
with one more sending 6 MiB and 9 MiB completions requests in turn (a 400 and a 413 each), and
what it got back.

The base, as in bench_throughput.py (``--base``): ``replay`` (default), scripts/replay_server.py
answering from a recording after ``--rtt`` ms (50) with no compute, recorded the first time (or
with ``--record``) from a real vLLM CPU server (``--recording``: default under .cache/replay/, one
per --tokens and --requests; a request it lacks fails its stream and the script's exit status);
or ``vllm``, the real vLLM CPU server behind the latency relay of scripts/bench_speed.py.

    .venv/bin/python scripts/bench_server.py                   # N = 1, 8, 32, 64; 32 + abusive
    .venv/bin/python scripts/bench_server.py --clients 1 8 --abusive 8 --requests 1 --rtt 20
    .venv/bin/python scripts/bench_server.py --base vllm       # the real CPU server: about 3 min

Bounded: at most 64 clients, 8 requests each, 256 tokens; every request has a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

if not __package__:  # run as a file: `scripts.` and `tests.` import from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.bench_speed import LatencyRelay, candidate_prompts

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "scripts" / "miniature_models"
MAX_CLIENTS, MAX_REQUESTS, MAX_TOKENS = 64, 8, 256
REQUEST_DEADLINE_S = 300.0


@dataclass
class Stream:
    """One streamed completion, as its client saw it."""

    sent: float
    first: float | None = None
    chunks: list[float] = field(default_factory=list)  # arrival of each text chunk
    tokens: int = 0
    error: str | None = None


async def stream_one(client: httpx.AsyncClient, url: str, body: dict) -> Stream:
    record = Stream(sent=time.perf_counter())
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[len("data: ") :])
                if "error" in data:
                    record.error = data["error"]["message"]
                    continue
                if data.get("usage"):
                    record.tokens = data["usage"]["completion_tokens"]
                for choice in data["choices"]:
                    if choice.get("text"):
                        now = time.perf_counter()
                        record.first = record.first or now
                        record.chunks.append(now)
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    return record


# The abusive client's bodies: a prompt that cannot fit the context but passes the body limit
# (8 MiB), and one over the limit.
ABUSIVE_PROMPT_BYTES = (6 * 2**20, 9 * 2**20)


@dataclass
class Abuse:
    """What the abusive client sent and got back."""

    statuses: dict[int | str, int] = field(default_factory=dict)
    seconds: list[float] = field(default_factory=list)


def abusive_bodies(name: str) -> list[bytes]:
    return [
        json.dumps(
            {"model": name, "prompt": "Tell me more. " * (size // 14), "max_tokens": 8}
        ).encode()
        for size in ABUSIVE_PROMPT_BYTES
    ]


def abuse(url: str, bodies: list[bytes], record: Abuse, stop: threading.Event) -> None:
    """Send ``bodies`` in turn, one after another, until ``stop``: from a thread of its own, so
    that building and sending them takes nothing from the measured clients' loop."""
    headers = {"content-type": "application/json"}
    with httpx.Client(timeout=httpx.Timeout(REQUEST_DEADLINE_S, connect=10)) as client:
        n = 0
        while not stop.is_set():
            sent = time.perf_counter()
            try:
                status: int | str = client.post(
                    url, content=bodies[n % 2], headers=headers
                ).status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            record.seconds.append(time.perf_counter() - sent)
            record.statuses[status] = record.statuses.get(status, 0) + 1
            n += 1


async def load(
    url: str,
    name: str,
    prompts: list[str],
    clients: int,
    requests: int,
    tokens: int,
    abusive: Abuse | None = None,
):
    """``clients`` clients, each streaming ``requests`` completions in turn; with ``abusive``,
    one more client sending huge requests all the while."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    timeout = httpx.Timeout(REQUEST_DEADLINE_S, connect=10)
    stop = threading.Event()
    abuser = None
    if abusive is not None:
        bodies = abusive_bodies(name)
        abuser = threading.Thread(target=abuse, args=(url, bodies, abusive, stop), daemon=True)
        abuser.start()
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:

        async def one_client(c: int) -> list[Stream]:
            done = []
            for r in range(requests):
                body = {
                    "model": name,
                    "prompt": prompts[(c * requests + r) % len(prompts)],
                    "max_tokens": tokens,
                    "temperature": 0,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                done.append(await stream_one(client, url, body))
            return done

        started = time.perf_counter()
        per_client = await asyncio.wait_for(
            asyncio.gather(*(one_client(c) for c in range(clients))),
            timeout=REQUEST_DEADLINE_S * requests,
        )
        wall = time.perf_counter() - started
    if abuser is not None:
        stop.set()
        await asyncio.to_thread(abuser.join)
    return [s for streams in per_client for s in streams], wall


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (its threads included), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def start_server(base_url: str, name: str, models: Path, port: int, log: Path) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "proxyclient", "serve", "--api", "vllm", "--base-url", base_url,
        "--base-model", name, "--expert", str(models / "expert-small"),
        "--anti-expert", str(models / "base-small"), "--threads", "1", "--device", "cpu",
        "--base-k", "20", "--port", str(port), "--log-level", "warning",
    ]  # fmt: skip
    with log.open("w") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)


def wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"proxyclient serve exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"proxyclient serve did not come up:\n{log.read_text()[-3000:]}")


def default_recording(args: argparse.Namespace) -> Path:
    name = f"bench_server-{args.models.name}-{args.tokens}t-{args.requests}r.jsonl.gz"
    return REPO / ".cache" / "replay" / name


def run_loads(base_url: str, args: argparse.Namespace, prompts: list[str], log: Path) -> list:
    """`proxyclient serve` on ``base_url``; a warm-up, then each number of clients in turn."""
    from scripts.miniature import BASE_NAME
    from scripts.vllm_server import free_port

    rows = []
    port = free_port()
    proxy = start_server(base_url, BASE_NAME, args.models, port, log)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proxy, log)
        completions = f"{url}/v1/completions"
        asyncio.run(load(completions, BASE_NAME, prompts, 2, 1, 8))  # warm-up
        runs = [(n, False) for n in args.clients] + [(n, True) for n in args.abusive]
        for clients, abusive in runs:
            abuse_record = Abuse() if abusive else None
            cpu_before = process_cpu_s(proxy.pid)
            streams, wall = asyncio.run(
                load(
                    completions,
                    BASE_NAME,
                    prompts,
                    clients,
                    args.requests,
                    args.tokens,
                    abuse_record,
                )
            )
            server_cpu = (process_cpu_s(proxy.pid) - cpu_before) / wall
            rows.append((clients, streams, wall, abuse_record, server_cpu))
            print(f"{clients} clients done in {wall:.1f} s", file=sys.stderr)
    finally:
        proxy.terminate()
        proxy.wait(timeout=30)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument(
        "--abusive",
        type=int,
        nargs="*",
        default=[32],
        help="then these numbers of clients again, with one more sending huge requests",
    )
    parser.add_argument("--requests", type=int, default=2, help="streams per client, in turn")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rtt", type=float, default=50.0, help="added round trip, ms")
    parser.add_argument("--models", type=Path, default=MODELS)
    parser.add_argument("--base", choices=["replay", "vllm"], default="replay")
    parser.add_argument("--recording", type=Path, default=None, help="replay: the recording")
    parser.add_argument("--record", action="store_true", help="replay: record it again first")
    args = parser.parse_args(argv)
    if not all(1 <= n <= MAX_CLIENTS for n in args.clients + args.abusive):
        parser.error(f"--clients: 1 to {MAX_CLIENTS}")
    if not 1 <= args.requests <= MAX_REQUESTS or not 1 <= args.tokens <= MAX_TOKENS:
        parser.error(f"--requests: 1 to {MAX_REQUESTS}; --tokens: 1 to {MAX_TOKENS}")

    from scripts.miniature import BASE_NAME, load_eval
    from scripts.replay_server import ReplayServer
    from scripts.vllm_server import VLLMServer

    prompts = candidate_prompts(load_eval(args.models, quick=False))
    log = Path(os.environ.get("TMPDIR", "/tmp")) / "bench_server.log"
    misses = 0
    if args.base == "replay":
        recording = args.recording or default_recording(args)
        if args.record or not recording.exists():
            print(
                f"recording the base's answers into {recording} (vLLM on the CPU)", file=sys.stderr
            )
            with (
                VLLMServer(args.models / "base-large", BASE_NAME, max_logprobs=20) as server,
                ReplayServer("record", recording, upstream=server.root_url) as recorder,
            ):
                run_loads(f"{recorder.root_url}/v1", args, prompts, log)
        with ReplayServer("replay", recording, rtt_ms=args.rtt) as replay:
            rows = run_loads(f"{replay.root_url}/v1", args, prompts, log)
            misses = replay.stats()["misses"]
        where = f"base-large replayed from {recording.relative_to(REPO)} (no compute)"
    else:
        with (
            VLLMServer(args.models / "base-large", BASE_NAME, max_logprobs=20) as server,
            LatencyRelay(server.port) as relay,
        ):
            relay.set_rtt(args.rtt)
            rows = run_loads(f"{relay.root_url}/v1", args, prompts, log)
        where = "base-large on vLLM (CPU)"

    print(
        f"\n{args.requests} streamed completions per client, in turn; {args.tokens} tokens each "
        f"(fewer where one ends at EOS), greedy, k = 20, speculate auto, {args.rtt:g} ms round "
        f"trip; {where}, expert-small / base-small in `proxyclient serve` (torch 1 thread); "
        f"clients, server and base share this machine's {os.cpu_count()} cores\n"
    )
    print(
        "| clients | streams | tokens | wall s | tokens/s | TTFT p50 ms | TTFT p99 ms "
        "| ITL p50 ms | ITL p99 ms | ms/token per stream | server CPU | errors |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for clients, streams, wall, abusive, server_cpu in rows:
        ok = [s for s in streams if s.error is None and s.first is not None]
        errors = len(streams) - len(ok)
        tokens = sum(s.tokens for s in ok)
        ttft = [(s.first - s.sent) * 1e3 for s in ok if s.first is not None]
        gaps = [(b - a) * 1e3 for s in ok for a, b in zip(s.chunks, s.chunks[1:], strict=False)]
        per_token = [
            (s.chunks[-1] - s.first) * 1e3 / (s.tokens - 1)
            for s in ok
            if s.first is not None and s.tokens > 1
        ]
        label = f"{clients} + 1 abusive" if abusive else str(clients)
        print(
            f"| {label} | {len(streams)} | {tokens} | {wall:.1f} | {tokens / wall:.0f} "
            f"| {percentile(ttft, 50):.0f} | {percentile(ttft, 99):.0f} "
            f"| {percentile(gaps, 50):.1f} | {percentile(gaps, 99):.0f} "
            f"| {statistics.mean(per_token) if per_token else float('nan'):.1f} "
            f"| {server_cpu:.0%} | {errors} |"
        )
    for clients, _, _, abusive, _ in rows:
        if abusive is not None:
            answered = ", ".join(
                f"{n} x {status}" for status, n in sorted(abusive.statuses.items(), key=str)
            )
            print(
                f"\nThe abusive client among {clients} (prompts of "
                f"{' and '.join(f'{b / 2**20:.0f} MiB' for b in ABUSIVE_PROMPT_BYTES)} in turn): "
                f"{answered}; answered in {percentile(abusive.seconds, 50):.2f} s median, "
                f"{max(abusive.seconds, default=float('nan')):.2f} s at most"
            )
    failed = [s.error for _, streams, _, _, _ in rows for s in streams if s.error]
    # The abusive client's requests must be refused as such: a 400 (cannot fit) or a 413.
    failed += [
        f"the abusive client got {n} x {status}"
        for _, _, _, abusive, _ in rows
        if abusive is not None
        for status, n in abusive.statuses.items()
        if status not in (400, 413)
    ]
    if failed:
        print(f"\n{len(failed)} failures, e.g. {failed[0]}", file=sys.stderr)
    if misses:
        print(f"{misses} requests missing from the recording: rerun with --record", file=sys.stderr)
    if failed or misses:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
