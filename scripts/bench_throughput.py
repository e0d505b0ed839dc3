"""Many prompts at once: wall time, tokens/s and local batch sizes for 1, 4, 16 and 64 prompts.

The miniature's base-large on a real vLLM CPU server behind the latency relay of
scripts/bench_speed.py (50 ms round trip by default), steered by expert-small / base-small on this
CPU through ``ProxyTuner.generate_many(prompts, concurrency=N)``: N prompts (held-out questions
followed by the start of the next, as in bench_speed.py), 64 tokens each, greedy, k = 20, the
default speculation (``auto``). Columns: wall time, ratio to one prompt's, this process's CPU
time (the client; the relay and the vLLM server are other processes), how busy the whole
machine's cores were (client, relay and server together: near 100% means the hardware, not the
client's scheduling, sets the pace), generated tokens/s, requests, the local forwards by batch
size (how many sequences each held), and the process's peak resident memory during the run.
Before the runs, how busy the machine is with the server idle and in the half second after one
request: its engine keeps cores busy after each request, which the client's runs share.

Then the local step alone: one forward of both proxies for B sequences at once (``feed_many``;
each with a 48-token cache, one new token), median of 20, against B = 1.

    .venv/bin/python scripts/bench_throughput.py                  # 1, 4, 16, 64 prompts: ~2 min
    .venv/bin/python scripts/bench_throughput.py --counts 1 16 --rtt 50

torch uses 1 thread: client and server share this machine's 2 cores (see scripts/bench_step.py).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_speed import LatencyRelay, candidate_prompts

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "scripts" / "miniature_models"


class PeakMemory:
    """The process's peak resident memory while it is entered (sampled every 20 ms)."""

    def __init__(self) -> None:
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        page = 4096
        while not self._stop.is_set():
            with open("/proc/self/statm") as f:
                resident = int(f.read().split()[1]) * page / 2**20
            self.peak_mb = max(self.peak_mb, resident)
            self._stop.wait(0.02)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _machine_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields) - idle) / tick, sum(fields) / tick


def _busy_share(seconds: float) -> float:
    """The share of the machine's cores busy over the next ``seconds``."""
    busy_before, total_before = _machine_busy_seconds()
    time.sleep(seconds)
    busy_after, total_after = _machine_busy_seconds()
    return (busy_after - busy_before) / (total_after - total_before)


def server_busy(base_url: str, model: str) -> tuple[float, float]:
    """How busy the machine is with the server idle (2 s) and in the 0.5 s after one request
    (client idle): what the server's engine costs its neighbours on shared cores."""
    time.sleep(2)
    idle = _busy_share(2)
    body = {"model": model, "prompt": [5, 6, 7], "max_tokens": 2}
    httpx.post(f"{base_url}/completions", json=body, timeout=60).raise_for_status()
    return idle, _busy_share(0.5)


def _cpu_seconds() -> float:
    """CPU time of this process (the client and the in-process latency relay), user + system."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def local_step_ms(pair, batch: int, rounds: int = 20) -> float:
    """Median ms of one forward of both proxies for ``batch`` sequences, one new token each."""
    from proxyclient.proxies import PairState

    states = [PairState() for _ in range(batch)]
    prefixes = [[(7 * i + 3 * row) % 900 + 3 for i in range(48)] for row in range(batch)]
    for state, ids in zip(states, prefixes, strict=True):
        pair.logprobs_now(state, ids, ids)
    times = []
    for step in range(rounds):
        tokens = [[(step * 31 + row) % 900 + 3] for row in range(batch)]
        started = time.perf_counter()
        pair.expert.feed_many([s.expert for s in states], tokens)
        pair.anti_expert.feed_many([s.anti for s in states], tokens)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--rtt", type=float, default=50.0, help="added round trip, ms")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--models", type=Path, default=MODELS)
    args = parser.parse_args(argv)

    from miniature import BASE_NAME, load_eval
    from vllm_server import VLLMServer

    from proxyclient import GenerationConfig, ProxyTuner, connect

    torch.set_num_threads(1)
    prompts = candidate_prompts(load_eval(args.models, quick=False))[: max(args.counts)]
    server = VLLMServer(args.models / "base-large", BASE_NAME, max_logprobs=20).start()
    rows = []
    with contextlib.ExitStack() as stack:
        stack.callback(server.stop)
        relay = stack.enter_context(LatencyRelay(server.port))
        relay.set_rtt(args.rtt)
        base = connect("vllm", f"{relay.root_url}/v1", BASE_NAME)
        tuner = stack.enter_context(
            ProxyTuner(base, args.models / "expert-small", args.models / "base-small", threads=1)
        )
        config = GenerationConfig(max_new_tokens=args.tokens, base_k=20)
        tuner.generate_many(prompts[:2], config, concurrency=2)  # warm-up
        idle_busy, after_request_busy = server_busy(server.base_url, BASE_NAME)
        for count in args.counts:
            tuner.proxies.batch_sizes.clear()
            started, cpu_before = time.perf_counter(), _cpu_seconds()
            busy_before, total_before = _machine_busy_seconds()
            with PeakMemory() as memory:
                results = tuner.generate_many(prompts[:count], config, concurrency=count)
            wall, cpu = time.perf_counter() - started, _cpu_seconds() - cpu_before
            busy_after, total_after = _machine_busy_seconds()
            busy = (busy_after - busy_before) / (total_after - total_before)
            errors = [r.error for r in results if r.error]
            if errors:
                raise SystemExit(f"{len(errors)} generations failed, e.g. {errors[0]}")
            tokens = sum(len(r.token_ids) for r in results)
            requests = sum(r.usage.requests for r in results)
            sizes = dict(sorted(tuner.proxies.batch_sizes.items()))
            rows.append((count, wall, cpu, busy, tokens, requests, sizes, memory.peak_mb))
            print(f"{count} prompts done in {wall:.1f} s", file=sys.stderr)
        steps = {b: local_step_ms(tuner.proxies, b) for b in (1, 4, 16, 64)}

    one = rows[0][1]
    print(
        f"\n{args.tokens} tokens per prompt (fewer where one ends at EOS), greedy, k = 20, "
        f"speculate auto, {args.rtt:g} ms added round trip; base-large on vLLM (CPU), "
        f"expert-small / base-small local (torch 1 thread). Machine busy with the vLLM server "
        f"idle: {idle_busy:.0%}; in the 0.5 s after one request: {after_request_busy:.0%}\n"
    )
    print(
        "| prompts | wall s | vs 1 prompt | client CPU s | machine busy | tokens "
        "| tokens/s | requests | local forwards by batch size | peak RSS MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for count, wall, cpu, busy, tokens, requests, sizes, peak in rows:
        spread = ", ".join(f"{b}: {n}" for b, n in sizes.items())
        print(
            f"| {count} | {wall:.1f} | {wall / one:.2f}x | {cpu:.1f} | {busy:.0%} "
            f"| {tokens} "
            f"| {tokens / wall:.0f} | {requests} | {spread} | {peak:.0f} |"
        )
    print("\n| sequences in one local step | ms (both proxies) | vs 1 |")
    print("|---|---|---|")
    for batch, ms in steps.items():
        print(f"| {batch} | {ms:.2f} | {ms / steps[1]:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
