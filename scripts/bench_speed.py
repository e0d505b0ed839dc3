"""Wall time per generated token behind an added network round trip, every mode in one run.

The miniature's base-large (scripts/miniature.py; README, "Does it work?") is served by a real vLLM
CPU server and steered by expert-small (tuned) and base-small (anti-expert): k = 20, alpha 1,
greedy. Every request goes through a latency-injecting TCP relay of this script's own (a
subprocess on 127.0.0.1) that adds a round trip of 0, 20, 50 and 100 ms. For each round trip,
alternately, on the same prompts and the same number of generated tokens:

1. base loop: ``ProxyTuner.generate(alpha=0, speculate="off")``, one request per token through the
   same API, no proxies run;
2. proxy-tuning, ``speculate="off"`` (one request per token);
3. proxy-tuning, each speculation mode (``stream``, ``base``, ``expert``, ``auto``);
4. floor: the base server generates that many tokens in one streaming ``/v1/completions`` request
   (``stream``, ``ignore_eos``, temperature 0); wall time until the last chunk.

The prompts are held-out questions of the miniature followed by the start of another question
(``Q: Where was X born?\\nQ:``): both models go on writing a quiz, so the output is long. Kept are
the first where neither the base's greedy output (one batched request) nor the proxy-tuned one
ends before ``--tokens`` tokens. One warm-up generation per mode and round trip (8 tokens).

    .venv/bin/python scripts/bench_speed.py          # 4 prompts x 64 tokens, RTT 0/20/50/100: 5 min
    .venv/bin/python scripts/bench_speed.py --quick  # 2 prompts, RTT 0 and 50: 2 min
    .venv/bin/python scripts/bench_speed.py --modes off  # speculation modes to run (1, 4 always)
    .venv/bin/python scripts/bench_speed.py --json-out /tmp/speed.json --plot /tmp/speed.png
    .venv/bin/python scripts/bench_speed.py --check-proxy   # the relay's self-check, no vLLM
    .venv/bin/python scripts/bench_speed.py --from-json /tmp/speed.json --plot /tmp/speed.png

The plot (wall per generated token against the round trip, one line per mode, the floor dashed;
``scripts/bench_speed.png`` by default, none with ``--quick`` unless ``--plot`` is given) needs
matplotlib, which is not a runtime dependency: ``pip install -e ".[bench]"``, or pass --no-plot.

Columns (per round trip and mode: sums over the prompts divided by the tokens generated):
- wall ms / token: the client's wall time around each generation;
- vs (1), vs (4): that wall per token over the base loop's and over the floor's;
- requests / token: HTTP requests to the base (``Usage.requests``; the floor: 1 per generation);
- prompt tokens / token: token ids sent to the base, summed over requests (``Usage.prompt_tokens``;
  each request resends the prefix, which is what a hosted API bills as input);
- base completion tokens / token: ``Usage.base_completion_tokens``, what the base generated or
  scored (billed as output; the floor: the tokens it streamed);
- vLLM generated / token: the tokens vLLM's ``vllm:generation_tokens_total`` counted over the
  generation, read once it runs no request: what a hosted API bills as output, including what
  it generated after a stream we closed (which the client never received, so column 7 misses it);
- acceptance: drafted tokens that became output over drafted tokens
  (``accepted_draft_tokens / base_completion_tokens``; speculation modes only);
- local ms / token: the expert and anti-expert forwards (``Timings.local_s``).
Printed beside the table: the added round trip measured on vLLM's /health, the share of output
positions where the proxy-tuned choice differs from the base's own greedy choice after the same
prefix (one ``prompt_logprobs`` request per prompt), the tokens each mode generated, and whether
every speculation mode gave the same tokens as ``off`` on every prompt (``--json-out``: all of it,
every generation, and the server's cached prompt tokens, ``--enable-prompt-tokens-details``).

The relay holds each chunk RTT/2 in each direction, in order (one pipeline per direction per
connection), so every HTTP exchange pays the round trip, also on a kept-alive connection, and a
stream's last chunk arrives RTT/2 after the server sent it. Connecting is not delayed (keep-alive
makes it a one-off); bandwidth is not limited. It runs in its own process so that its timers do
not wait for the client's GIL.

vLLM's prefix caching is on (its default), but vLLM's CPU backend uses blocks of 128 tokens and
caches only full blocks: prefixes here (under 100 tokens) never hit it. torch uses 1 thread:
client and server share this machine's 2 cores (see scripts/bench_step.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

# torch, the engine and the miniature are imported where the benchmark runs: the relay process
# (this script with --relay-worker) and --check-proxy need none of them.
SCRIPTS = Path(__file__).resolve().parent
if not __package__:  # run as a file: `scripts.` and `tests.` import from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.managed_server import fetch_metric  # noqa: E402  (needs the path above)

if TYPE_CHECKING:
    from proxyclient import Generation, GenerationConfig, ProxyTuner

logger = logging.getLogger("bench_speed")

DEFAULT_PLOT = SCRIPTS / "bench_speed.png"
RTTS_MS = (0.0, 20.0, 50.0, 100.0)
QUICK_RTTS_MS = (0.0, 50.0)
SPECULATION_MODES = ("off", "stream", "base", "expert", "auto")
DEFAULT_PROMPTS = 4
QUICK_PROMPTS = 2
WARMUP_TOKENS = 8
LABELS = {
    "loop": "(1) base loop, 1 request/token",
    "off": "(2) proxy, speculate off",
    "stream": "(3) proxy, speculate stream",
    "base": "(3) proxy, speculate base",
    "expert": "(3) proxy, speculate expert",
    "auto": "(3) proxy, speculate auto",
    "floor": "(4) floor: base streams",
}
HEALTH_PROBES = 7

# -- the latency-injecting relay ------------------------------------------------------------------

RELAY_MAX_CONNECTIONS = 256
RELAY_QUEUE_CHUNKS = 256  # per direction and connection: the relay's memory is bounded
RELAY_CHUNK_BYTES = 65536


async def _until_first_failure(*coros: Coroutine[Any, Any, None]) -> None:
    """Run ``coros`` together until all finish or one fails; cancel the rest on failure."""
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _relay_serve(upstream_port: int) -> None:
    """The relay process: print the port, then take round trips in ms from stdin (one per line,
    answered 'ok') until stdin closes, i.e. until the benchmark exits however it does."""
    loop = asyncio.get_running_loop()
    one_way = [0.0]  # seconds each chunk is held, per direction
    live: set[asyncio.Task[Any]] = set()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # One ordered pipeline per direction: a chunk is due one_way after it arrived, so chunks
        # keep their order and spacing, and the link adds latency, not a wait per chunk.
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(RELAY_QUEUE_CHUNKS)

        async def receive() -> None:
            while True:
                data = await reader.read(RELAY_CHUNK_BYTES)
                await queue.put((loop.time() + one_way[0], data))
                if not data:
                    return

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:  # the sender closed its side: pass the half-close on
                    with contextlib.suppress(OSError, RuntimeError):
                        if writer.can_write_eof():
                            writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()

        await _until_first_failure(receive(), deliver())

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter):
        task = asyncio.current_task()
        if len(live) >= RELAY_MAX_CONNECTIONS or task is None:
            client_writer.close()
            return
        live.add(task)
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
            try:
                await _until_first_failure(
                    pipe(client_reader, server_writer), pipe(server_reader, client_writer)
                )
            finally:
                server_writer.close()
        except (OSError, asyncio.CancelledError):  # a reset, or the relay shutting down
            pass
        finally:
            client_writer.close()
            live.discard(task)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    try:
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            one_way[0] = float(line) / 2e3
            print("ok", flush=True)
    finally:
        server.close()
        for task in list(live):
            task.cancel()
        await asyncio.gather(*live, return_exceptions=True)


class LatencyRelay:
    """A TCP relay on 127.0.0.1 in front of ``upstream_port`` that adds a settable round trip.

    It runs in its own process (this script with --relay-worker), so its timers do not wait for
    this process's GIL; it exits when its stdin closes, so it never outlives the benchmark.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.rtt_ms = 0.0
        self._process: subprocess.Popen[str] | None = None

    def start(self) -> LatencyRelay:
        command = [sys.executable, __file__, "--relay-worker", str(self.upstream_port)]
        self._process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line.strip().isdigit():
            self.close()
            raise RuntimeError(f"the latency relay did not start (said {line!r})")
        self.port = int(line)
        return self

    def set_rtt(self, rtt_ms: float) -> None:
        process = self._process
        assert process is not None and process.stdin is not None and process.stdout is not None
        process.stdin.write(f"{rtt_ms}\n")
        process.stdin.flush()
        if process.stdout.readline().strip() != "ok":
            raise RuntimeError("the latency relay stopped answering")
        self.rtt_ms = rtt_ms

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(OSError):
            if process.stdin is not None:
                process.stdin.close()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> LatencyRelay:
        return self.start() if self._process is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _times_ms(client: httpx.Client, url: str, count: int) -> list[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        client.get(url).raise_for_status()
        times.append((time.perf_counter() - started) * 1e3)
    return sorted(times)


def _median_ms(client: httpx.Client, url: str, count: int) -> float:
    return statistics.median(_times_ms(client, url, count))


def check_proxy(rtt_ms: float = 50.0, requests: int = 20) -> int:
    """Time a tiny GET directly and through the relay (0 and ``rtt_ms``), on one kept-alive
    connection; assert the relay adds about ``rtt_ms`` to every request."""
    peers: set[tuple[str, int]] = set()

    class Tiny(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive
        disable_nagle_algorithm = True  # headers and body are two writes: no delayed-ACK stall

        def do_GET(self) -> None:
            peers.add(self.client_address)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    upstream = ThreadingHTTPServer(("127.0.0.1", 0), Tiny)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    port = upstream.server_address[1]
    try:
        with LatencyRelay(port) as relay, httpx.Client(timeout=10) as client:
            _median_ms(client, f"http://127.0.0.1:{port}/", 3)  # warm-up
            direct = _median_ms(client, f"http://127.0.0.1:{port}/", requests)
            measured = {}
            for rtt in (0.0, rtt_ms):
                relay.set_rtt(rtt)
                _median_ms(client, f"{relay.root_url}/", 2)  # the connection, kept alive
                peers.clear()
                measured[rtt] = _times_ms(client, f"{relay.root_url}/", requests)
                through = len(peers)
    finally:
        upstream.shutdown()
    added = {rtt: statistics.median(ms) - direct for rtt, ms in measured.items()}
    print(f"direct GET: {direct:.2f} ms (median of {requests})")
    for rtt, ms in measured.items():
        print(
            f"through the relay at RTT {rtt:g} ms: median {statistics.median(ms):.2f} ms "
            f"(min {ms[0]:.2f}, max {ms[-1]:.2f}), added {added[rtt]:.2f} ms"
        )
    print(f"upstream connections the last {requests} relayed requests came on: {through}")
    ok = abs(added[0.0]) < 5 and abs(added[rtt_ms] - rtt_ms) < max(5.0, 0.1 * rtt_ms)
    # Every request paid the round trip, all on one kept-alive connection.
    ok = ok and measured[rtt_ms][0] >= rtt_ms and through == 1
    print(f"relay self-check: {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


# -- measurements ---------------------------------------------------------------------------------


@dataclass
class Sample:
    """One timed generation."""

    rtt_ms: float
    mode: str
    prompt: int
    tokens: int
    wall_s: float
    requests: int
    prompt_tokens: int
    base_completion_tokens: int
    accepted_draft_tokens: int
    local_s: float
    base_s: float
    cached_prompt_tokens: int | None
    finish_reason: str
    token_ids: list[int] = field(default_factory=list)
    server_generated: int = 0  # vLLM's generation_tokens_total over the sample, settled


@dataclass
class Row:
    """One line of the table: one mode at one round trip, summed over prompts."""

    rtt_ms: float
    mode: str
    generations: int
    tokens: int
    wall_ms: float  # per generated token, as every per-token value below
    vs_loop: float
    vs_floor: float
    requests: float
    prompt_tokens: float
    base_completion_tokens: float
    acceptance: float | None
    local_ms: float
    cached_prompt_tokens: float | None
    # Against the lower bound of any client: one round trip per disagreement with the base's own
    # greedy choice, plus the base's own streamed generation ((4): one request, its per-token time).
    vs_bound: float = float("nan")
    server_generated: float = float("nan")  # what vLLM generated (the bill), per token


def engine_sample(
    tuner: ProxyTuner, prompt: str, config: GenerationConfig, rtt_ms: float, mode: str, index: int
) -> Sample:
    started = time.perf_counter()
    result: Generation = tuner.generate(prompt, config)
    wall = time.perf_counter() - started
    usage, timings = result.usage, result.timings
    return Sample(
        rtt_ms,
        mode,
        index,
        len(result.token_ids),
        wall,
        usage.requests,
        usage.prompt_tokens,
        usage.base_completion_tokens,
        usage.accepted_draft_tokens,
        timings.local_s,
        timings.base_s,
        usage.cached_prompt_tokens,
        result.finish_reason,
        list(result.token_ids),
    )


def floor_sample(
    client: httpx.Client,
    name: str,
    prompt_ids: Sequence[int],
    tokens: int,
    rtt_ms: float,
    index: int,
) -> Sample:
    """The base server's own generation of ``tokens`` tokens in one streaming request."""
    payload = {
        "model": name,
        "prompt": list(prompt_ids),
        "max_tokens": tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    usage: dict[str, Any] = {}
    finish = "error"
    started = time.perf_counter()
    with client.stream("POST", "/v1/completions", json=payload) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                finish = choice.get("finish_reason") or finish
    wall = time.perf_counter() - started
    generated = int(usage.get("completion_tokens", 0))
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    return Sample(
        rtt_ms, "floor", index, generated, wall, 1, len(prompt_ids), generated, 0, 0.0, wall,
        cached, finish,
    )  # fmt: skip


def generated_by_vllm(root_url: str, before: float) -> int:
    """The tokens vLLM generated since its counter read ``before``: read once no request runs
    (a closed stream is aborted within a decode step or two), at most 5 s later."""
    deadline = time.monotonic() + 5
    while fetch_metric(root_url, "vllm:num_requests_running") > 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    return round(fetch_metric(root_url, "vllm:generation_tokens_total") - before)


def base_reaches(
    client: httpx.Client, name: str, prompt_ids: Sequence[Sequence[int]], tokens: int
) -> list[bool]:
    """Whether the base's own greedy output of each prompt runs ``tokens`` tokens without EOS
    (one batched request)."""
    body = client.post(
        "/v1/completions",
        json={
            "model": name,
            "prompt": [list(ids) for ids in prompt_ids],
            "max_tokens": tokens,
            "temperature": 0.0,
        },
    )
    body.raise_for_status()
    finished = {c["index"]: c["finish_reason"] for c in body.json()["choices"]}
    return [finished[i] == "length" for i in range(len(prompt_ids))]


def base_disagrees(
    client: httpx.Client, name: str, prompt_ids: Sequence[int], output: Sequence[int]
) -> list[bool]:
    """At each output position: whether the base's own greedy choice after the same prefix
    (rank 1 of ``prompt_logprobs``) is another token."""
    body = client.post(
        "/v1/completions",
        json={
            "model": name,
            "prompt": [*prompt_ids, *output],
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": 1,
        },
    )
    body.raise_for_status()
    scored = body.json()["choices"][0]["prompt_logprobs"][len(prompt_ids) :]
    differs = []
    for token, entries in zip(output, scored, strict=True):
        best = next(int(t) for t, entry in entries.items() if entry["rank"] == 1)
        differs.append(best != token)
    return differs


def added_rtt_ms(direct: httpx.Client, relayed: httpx.Client) -> float:
    """What the relay adds to a GET /health of vLLM's, median against median."""
    _median_ms(relayed, "/health", 1)
    return _median_ms(relayed, "/health", HEALTH_PROBES) - _median_ms(
        direct, "/health", HEALTH_PROBES
    )


def candidate_prompts(rows: Sequence[dict[str, str]]) -> list[str]:
    """Each held-out question, then the start of another: the models write a quiz."""
    return [row["prompt"].split("\n", 1)[0] + "\nQ:" for row in rows]


def aggregate(samples: Sequence[Sample], disagreements: Sequence[int] = ()) -> list[Row]:
    """Sum each (round trip, mode) over prompts; per generated token; ratios to (1), (4) and
    the lower bound (``disagreements``: per prompt, the output positions where the base's own
    greedy choice differs)."""
    groups: dict[tuple[float, str], list[Sample]] = {}
    for sample in samples:
        groups.setdefault((sample.rtt_ms, sample.mode), []).append(sample)
    rows = []
    for (rtt, mode), group in groups.items():
        tokens = max(1, sum(s.tokens for s in group))
        drafted = sum(s.base_completion_tokens for s in group)
        accepted = sum(s.accepted_draft_tokens for s in group)
        cached = [s.cached_prompt_tokens for s in group]
        rows.append(
            Row(
                rtt,
                mode,
                len(group),
                tokens,
                sum(s.wall_s for s in group) / tokens * 1e3,
                float("nan"),
                float("nan"),
                sum(s.requests for s in group) / tokens,
                sum(s.prompt_tokens for s in group) / tokens,
                drafted / tokens,
                accepted / drafted if mode in SPECULATION_MODES[1:] and drafted else None,
                sum(s.local_s for s in group) / tokens * 1e3,
                None if None in cached else sum(c or 0 for c in cached) / tokens,
            )
        )
    by_key = {(r.rtt_ms, r.mode): r for r in rows}
    for row in rows:
        loop, floor = by_key.get((row.rtt_ms, "loop")), by_key.get((row.rtt_ms, "floor"))
        row.vs_loop = row.wall_ms / loop.wall_ms if loop else float("nan")
        row.vs_floor = row.wall_ms / floor.wall_ms if floor else float("nan")
        floors = groups.get((row.rtt_ms, "floor"), [])
        if floors and len(disagreements) >= len(floors):
            bound_s = sum(f.wall_s + disagreements[f.prompt] * row.rtt_ms / 1e3 for f in floors)
            bound_ms = bound_s / max(1, sum(f.tokens for f in floors)) * 1e3
            row.vs_bound = row.wall_ms / bound_ms
        group = groups[(row.rtt_ms, row.mode)]
        row.server_generated = sum(s.server_generated for s in group) / row.tokens
    order = list(LABELS)
    return sorted(rows, key=lambda r: (r.rtt_ms, order.index(r.mode)))


def format_table(rows: Sequence[Row]) -> str:
    lines = [
        "| RTT ms | mode | wall ms / token | vs (1) | vs (4) | vs bound | requests / token "
        "| prompt tokens / token | base completion tokens / token | vLLM generated / token "
        "| acceptance | local ms / token |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        acceptance = "–" if r.acceptance is None else f"{100 * r.acceptance:.0f}%"
        lines.append(
            f"| {r.rtt_ms:g} | {LABELS[r.mode]} | {r.wall_ms:.1f} | {r.vs_loop:.2f} | "
            f"{r.vs_floor:.2f} | {r.vs_bound:.2f} | {r.requests:.3f} | {r.prompt_tokens:.1f} | "
            f"{r.base_completion_tokens:.2f} | {r.server_generated:.2f} | {acceptance} "
            f"| {r.local_ms:.2f} |"
        )
    return "\n".join(lines)


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit(
            "--plot needs matplotlib, which proxyclient does not depend on: "
            'pip install -e ".[bench]" (or pass --no-plot)'
        ) from None


def plot(rows: Sequence[Row], path: Path, title: str) -> None:
    """Wall per generated token against the round trip, one line per mode, the floor dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for mode, label in LABELS.items():
        points = [(r.rtt_ms, r.wall_ms) for r in rows if r.mode == mode]
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        style: dict[str, Any] = {"marker": "o"}
        if mode == "floor":
            style = {"marker": "s", "color": "black", "linestyle": "--", "zorder": 3}
        elif mode == "auto":  # often the same as one of the others: keep both visible
            style = {"marker": "x", "linestyle": ":", "markersize": 8, "zorder": 3}
        ax.plot(xs, ys, label=label, **style)
    rtts = sorted({r.rtt_ms for r in rows})
    ax.set_xticks(rtts)
    ax.set_xlabel("added network round trip (ms)")
    ax.set_ylabel("wall time per generated token (ms)")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def identical_line(samples: Sequence[Sample], reference: dict[int, list[int]]) -> str:
    """Whether each proxy-tuned mode gave the reference (``off``) tokens on every prompt."""
    verdicts = []
    for mode in SPECULATION_MODES:
        runs = [s for s in samples if s.mode == mode]
        if not runs:
            continue
        wrong = [s for s in runs if s.token_ids != reference[s.prompt]]
        where = ", ".join(f"prompt {s.prompt} at RTT {s.rtt_ms:g}" for s in wrong[:3])
        verdicts.append(f"{mode} {'no (' + where + ')' if wrong else 'yes'}")
    return "identical tokens (vs speculate off, every prompt and RTT): " + "; ".join(verdicts)


# -- the run --------------------------------------------------------------------------------------


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from proxyclient import GenerationConfig, ProxyClientError, ProxyTuner, connect
    from scripts.miniature import BASE_NAME, load_eval
    from scripts.vllm_server import VLLMServer

    started = time.perf_counter()
    # One torch thread: client and server share the 2 cores (see bench_step.py).
    torch.set_num_threads(1)
    models: Path = args.models
    candidates = candidate_prompts(load_eval(models, quick=False))
    logger.info("starting vLLM for %s ...", models / "base-large")
    server = VLLMServer(
        models / "base-large",
        BASE_NAME,
        max_logprobs=args.base_k,
        log_path=args.server_log,
        extra_args=["--enable-prompt-tokens-details"],
    ).start()
    logger.info("vLLM ready after %.0f s", server.startup_seconds or 0.0)
    with contextlib.ExitStack() as stack:
        stack.callback(server.stop)  # runs last
        relay = stack.enter_context(LatencyRelay(server.port))
        direct = stack.enter_context(httpx.Client(base_url=server.root_url, timeout=120))
        relayed = stack.enter_context(httpx.Client(base_url=relay.root_url, timeout=120))
        base = connect("vllm", f"{relay.root_url}/v1", BASE_NAME)
        tuner = stack.enter_context(
            ProxyTuner(base, models / "expert-small", models / "base-small", threads=1)
        )

        def config(mode: str, tokens: int = args.tokens, alpha: float = 1.0) -> GenerationConfig:
            extra = {"draft_tokens": args.draft_tokens} if args.draft_tokens else {}
            if args.stream_tokens:
                extra["stream_tokens"] = args.stream_tokens
            return GenerationConfig(
                max_new_tokens=tokens,
                alpha=alpha,
                base_k=args.base_k,
                temperature=0.0,
                speculate=mode,
                **extra,
            )

        # Prompts: the base's own greedy output must run the whole length (one batched request
        # per slice of candidates), then the proxy-tuned one (speculate off, no added latency:
        # these outputs are the reference every mode is checked against).
        relay.set_rtt(0.0)
        prompts: list[str] = []
        reference: dict[int, list[int]] = {}
        tried = 0
        for start in range(0, len(candidates), 48):
            batch = candidates[start : start + 48]
            ids = [tuner.tokenizer(p).input_ids for p in batch]
            reaches = base_reaches(direct, BASE_NAME, ids, args.tokens)
            for prompt, ok in zip(batch, reaches, strict=True):
                if not ok or len(prompts) == args.prompts:
                    continue
                tried += 1
                result = tuner.generate(prompt, config("off"))
                if result.finish_reason == "length" and len(result.token_ids) == args.tokens:
                    reference[len(prompts)] = list(result.token_ids)
                    prompts.append(prompt)
            if len(prompts) == args.prompts:
                break
        if not prompts:
            raise SystemExit(f"no candidate prompt runs {args.tokens} tokens without EOS")
        logger.info("prompts: %d of %d tried proxy-tuned", len(prompts), tried)
        prompt_ids = [list(tuner.tokenizer(p).input_ids) for p in prompts]
        disagreements = [
            base_disagrees(direct, BASE_NAME, prompt_ids[i], reference[i]) for i in reference
        ]
        differs = sum(map(sum, disagreements)) / sum(map(len, disagreements))
        prompt_info = [
            {
                "prompt": prompt,
                "prompt_tokens": len(prompt_ids[i]),
                "tuned_text": tuner.tokens.decode(reference[i]),
                "differs_from_base": sum(disagreements[i]) / len(disagreements[i]),
            }
            for i, prompt in enumerate(prompts)
        ]

        modes = ["loop", *args.modes, "floor"]
        unavailable: dict[str, str] = {}

        def run(mode: str, index: int, rtt: float, tokens: int = args.tokens) -> Sample:
            before = fetch_metric(server.root_url, "vllm:generation_tokens_total")
            if mode == "floor":
                sample = floor_sample(relayed, BASE_NAME, prompt_ids[index], tokens, rtt, index)
            else:
                cfg = config("off", tokens, alpha=0.0) if mode == "loop" else config(mode, tokens)
                sample = engine_sample(tuner, prompts[index], cfg, rtt, mode, index)
            sample.server_generated = generated_by_vllm(server.root_url, before)
            return sample

        samples: list[Sample] = []
        measured_rtt: dict[str, float] = {}
        for rtt in args.rtts:
            relay.set_rtt(rtt)
            measured_rtt[f"{rtt:g}"] = added_rtt_ms(direct, relayed)
            logger.info("RTT %g ms (measured on /health: +%.1f ms)", rtt, measured_rtt[f"{rtt:g}"])
            for mode in list(modes):  # warm-up; a mode the engine refuses is left out
                try:
                    run(mode, 0, rtt, WARMUP_TOKENS)
                except (ProxyClientError, NotImplementedError) as exc:
                    unavailable[mode] = f"{type(exc).__name__}: {exc}"
                    modes.remove(mode)
                    logger.warning("mode %s left out: %s", mode, unavailable[mode])
            for index in range(len(prompts)):
                shift = index % len(modes)
                for mode in modes[shift:] + modes[:shift]:  # alternate, each mode first in turn
                    samples.append(run(mode, index, rtt))
            logger.info("RTT %g ms done (%.0f s so far)", rtt, time.perf_counter() - started)

    rows = aggregate(samples, [sum(d) for d in disagreements])
    tokens_by_mode = {
        mode: sorted({s.tokens for s in samples if s.mode == mode}) for mode in LABELS
    }
    return {
        "config": {
            "tokens": args.tokens,
            "prompts": len(prompts),
            "rtts_ms": list(args.rtts),
            "modes": modes,
            "base_k": args.base_k,
            "draft_tokens": args.draft_tokens,
            "stream_tokens": args.stream_tokens,
            "alpha": 1.0,
            "models": str(models),
        },
        "prompts": prompt_info,
        "differs_from_base": differs,
        "measured_added_rtt_ms": measured_rtt,
        "unavailable_modes": unavailable,
        "tokens_by_mode": {m: t for m, t in tokens_by_mode.items() if t},
        "identical": identical_line(samples, reference),
        "rows": [asdict(r) for r in rows],
        "samples": [asdict(s) for s in samples],
        "runtime_s": time.perf_counter() - started,
    }


def report(result: dict[str, Any]) -> str:
    cfg = result["config"]
    rows = [Row(**r) for r in result["rows"]]
    prompts = result["prompts"]
    measured = ", ".join(f"{k} -> +{v:.1f}" for k, v in result["measured_added_rtt_ms"].items())
    tokens = "; ".join(
        f"{LABELS[m].split(' ', 1)[0]} {m}: {'/'.join(map(str, t))}"
        for m, t in result["tokens_by_mode"].items()
    )
    lines = [
        f"{len(prompts)} prompts x {cfg['tokens']} tokens, greedy, k = {cfg['base_k']}, "
        f"alpha 1; base-large on vLLM (CPU), expert-small / base-small local (torch 1 thread)",
        f"prompt tokens: {', '.join(str(p['prompt_tokens']) for p in prompts)}",
        f"proxy-tuned choice differs from the base's greedy choice at "
        f"{100 * result['differs_from_base']:.1f}% of output positions (per prompt: "
        + ", ".join(f"{100 * p['differs_from_base']:.0f}%" for p in prompts)
        + ")",
        f"added round trip measured on /health (ms): {measured}",
        "",
        format_table(rows),
        "",
        f"tokens generated per prompt: {tokens}",
        result["identical"],
    ]
    for mode, why in result["unavailable_modes"].items():
        lines.append(f"left out: {mode} ({why})")
    lines.append(f"runtime: {result['runtime_s']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 prompts, RTT 0 and 50 ms")
    parser.add_argument("--prompts", type=int, default=None, help=f"default {DEFAULT_PROMPTS}")
    parser.add_argument("--tokens", type=int, default=64, help="generated tokens per prompt")
    parser.add_argument(
        "--rtts", type=float, nargs="+", default=None, help="added round trips in ms"
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=SPECULATION_MODES,
        default=list(SPECULATION_MODES),
        help="speculation modes to run; the base loop (1) and the floor (4) always run",
    )
    parser.add_argument("--draft-tokens", type=int, default=None, help="default: the engine's")
    parser.add_argument("--stream-tokens", type=int, default=None, help="default: the engine's")
    parser.add_argument("--base-k", type=int, default=20, help="k asked of the base")
    parser.add_argument("--models", type=Path, default=SCRIPTS / "miniature_models")
    parser.add_argument("--json-out", type=Path, default=None, help="everything measured, JSON")
    parser.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="PNG to write (default scripts/bench_speed.png; none with --quick)",
    )
    parser.add_argument("--no-plot", action="store_true", help="write no PNG")
    parser.add_argument("--server-log", type=Path, default=None, help="vLLM's log file")
    parser.add_argument("--check-proxy", action="store_true", help="the relay's self-check")
    parser.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="a saved --json-out run: its table (and --plot)",
    )
    parser.add_argument("--relay-worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.relay_worker is not None:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_relay_serve(args.relay_worker))
        return 0
    if args.check_proxy:
        return check_proxy()
    args.prompts = args.prompts or (QUICK_PROMPTS if args.quick else DEFAULT_PROMPTS)
    args.rtts = args.rtts or list(QUICK_RTTS_MS if args.quick else RTTS_MS)
    if args.no_plot:
        args.plot = None
    elif args.plot is None and not args.quick and args.from_json is None:
        args.plot = DEFAULT_PLOT
    if args.plot is not None:
        require_matplotlib()  # before minutes of measuring

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.from_json is not None:
        result = json.loads(args.from_json.read_text())
    else:
        result = benchmark(args)
    print(report(result))
    if args.json_out is not None and args.from_json is None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=1) + "\n")
    if args.plot is not None:
        cfg = result["config"]
        title = (
            f"miniature base-large on vLLM (CPU) behind an added round trip\n"
            f"{cfg['prompts']} prompts x {cfg['tokens']} tokens, greedy, "
            f"k = {cfg['base_k']}, proxies expert-small / base-small"
        )
        plot([Row(**r) for r in result["rows"]], args.plot, title)
        logger.info("plot: %s", args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
