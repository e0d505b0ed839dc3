"""The HTTP layer alone: client CPU per request of ``HTTPTransport.request_json``, many at once.

Replays the completions requests of a bench_throughput recording (the real bodies and answers of
a 64-prompt run: vLLM's ``/v1/completions`` with top-20 logprobs) against scripts/replay_server.py
at a fixed round trip, from ``--concurrency`` tasks on one event loop, each answer parsed by the
vLLM adapter as a generation does. The client's CPU time (this process; the server is another)
over the requests it sent: what one base request costs in the HTTP stack, JSON and parsing, with
no models and no engine. Several rounds; the median and the spread.

    .venv/bin/python scripts/bench_http.py                       # 64 at once, 50 ms, 5 rounds
    .venv/bin/python scripts/bench_http.py --concurrency 1 64 --rtt 0
    .venv/bin/python scripts/bench_http.py --baseline REV        # the same, at a git revision too

The recording is bench_throughput's (``--tokens 48 --speculate base``): run that once first.
``--baseline REV`` runs it with REV's package in turn with this checkout's, round by round (see
scripts/baseline.py).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import gzip
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as a file: `scripts.` imports; a baseline's proxyclient stays first
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from scripts.baseline import package_env, source_tree
from scripts.replay_server import ReplayServer

REPO = Path(__file__).resolve().parent.parent
RECORDING = REPO / ".cache" / "replay" / "bench_throughput-miniature_models-48t-base.jsonl.gz"


def completion_requests(recording: Path) -> list[dict[str, Any]]:
    """The bodies of the recording's ``POST /v1/completions`` requests that were answered 200."""
    bodies = []
    with gzip.open(recording, "rt", encoding="utf-8") as lines:
        next(lines)  # the header
        for line in lines:
            entry = json.loads(line)
            method, _, rest = entry["key"].partition(" ")
            path, _, body = rest.partition("\n")
            if method == "POST" and path == "/v1/completions" and entry["status"] == 200:
                bodies.append(json.loads(body))
    return bodies


def one_round(base_url: str, bodies: list[dict[str, Any]], concurrency: int) -> float:
    """CPU seconds per request of sending every body once, ``concurrency`` at a time, from the
    loop the transport does its I/O on (as a ProxyTuner lends its own)."""
    from proxyclient.adapters.http import HTTPTransport
    from proxyclient.loop_thread import LoopThread

    thread = LoopThread("bench-http")
    transport = HTTPTransport(base_url)
    transport.host_on(thread)
    try:
        return thread.run(_send_all(transport, bodies, concurrency))
    finally:
        thread.close(transport.aclose())


async def _send_all(transport: Any, bodies: list[dict[str, Any]], concurrency: int) -> float:
    from proxyclient.adapters.base import Prompt
    from proxyclient.adapters.vllm import VLLMCompletions

    adapter = VLLMCompletions(transport, model="miniature-base-large")
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)

    async def worker() -> None:
        while not queue.empty():
            body = queue.get_nowait()
            prompt = Prompt(tuple(body["prompt"]), len(body["prompt"]))
            k = body["logprobs"]
            parse = functools.partial(adapter.parse_generate, prompt=prompt, k=k)
            await adapter.send("/v1/completions", body, prompt, k, parse=parse)

    await transport.request_json("POST", "/v1/completions", bodies[0])  # connect, warm
    start = time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (time.process_time() - start) / len(bodies)


def measure(recording: Path, rtt: float, concurrencies: list[int], rounds: int) -> dict[int, list]:
    import proxyclient.adapters.vllm  # noqa: F401  (torch and all: imported before the freeze)

    bodies = completion_requests(recording)
    gc.freeze()  # as a ProxyTuner does once its models are loaded
    results: dict[int, list[float]] = {c: [] for c in concurrencies}
    with ReplayServer("replay", recording, rtt_ms=rtt) as server:
        for _ in range(rounds):
            for concurrency in concurrencies:
                per_request = one_round(server.root_url, bodies, concurrency)
                results[concurrency].append(per_request * 1000)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64])
    parser.add_argument("--rtt", type=float, default=50.0, help="round trip, ms")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--recording", type=Path, default=RECORDING)
    parser.add_argument("--baseline", help="a git revision to measure in turn with this one")
    parser.add_argument("--json", action="store_true", help="print the results as JSON only")
    args = parser.parse_args()
    if not args.recording.exists():
        raise SystemExit(
            f"{args.recording} is missing: run `.venv/bin/python scripts/bench_throughput.py "
            "--tokens 48 --speculate base` once, which records it"
        )
    if args.json:
        print(json.dumps(measure(args.recording, args.rtt, args.concurrency, args.rounds)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        trees: dict[str, Path | None] = {"this checkout": None}
        if args.baseline:
            trees[args.baseline] = source_tree(args.baseline, Path(tmp))
        runs: dict[str, dict[int, list[float]]] = {name: {} for name in trees}
        for _ in range(args.rounds):  # one round of each in turn
            for name, tree in trees.items():
                command = [sys.executable, __file__, "--json", "--rounds", "1"]
                command += ["--rtt", str(args.rtt), "--recording", str(args.recording)]
                command += ["--concurrency", *map(str, args.concurrency)]
                out = subprocess.run(
                    command, env=package_env(tree), capture_output=True, text=True, check=True
                )
                for concurrency, values in json.loads(out.stdout).items():
                    runs[name].setdefault(int(concurrency), []).extend(values)
    n = len(completion_requests(args.recording))
    rounds = f"{args.rtt:g} ms round trip, {args.rounds} rounds"
    print(f"\n{n} completions requests per round, {rounds}\n")
    print("| checkout | at once | client CPU ms / request, median | min - max |")
    print("|---|---|---|---|")
    for name, by_concurrency in runs.items():
        for concurrency, values in sorted(by_concurrency.items()):
            spread = f"{min(values):.3f} - {max(values):.3f}"
            print(f"| {name} | {concurrency} | {statistics.median(values):.3f} | {spread} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
