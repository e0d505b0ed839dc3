"""Many prompts at once: wall time, client CPU and local batch sizes for 1, 4, 16 and 64 prompts.

The miniature's base-large, steered by expert-small / base-small on this CPU through
``ProxyTuner.generate_many(prompts, concurrency=N)``: N prompts (held-out questions followed by
the start of the next, as in bench_speed.py), 64 tokens each, greedy, k = 20, the default
speculation (``auto``).

The base (``--base``):

- ``replay`` (default): scripts/replay_server.py answers every request from a recording after a
  fixed round trip (``--rtt``, 50 ms), with no compute, so the numbers are the client's. The
  recording (``--recording``, default under .cache/replay/) is made the first time, or with
  ``--record``: the same runs against a real vLLM CPU server through the recording proxy. A
  request the recording lacks (a miss) fails its generation; the script then says so.
- ``vllm``: the real vLLM CPU server behind the latency relay of scripts/bench_speed.py (``--rtt``
  added to every request); it computes every request on the same cores as the client.

Columns: wall time, ratio to one prompt's, this process's CPU time (the client; the base is
another process) in all and per base request (and of that, the tuner's event loop thread's:
HTTP, parsing and the engine; and the local forwards' thread's) and per generated token, how
busy the whole machine's cores were (client and base together), generated tokens/s, base
requests, the local forwards by batch size (how many sequences each held), the process's peak
resident memory during the run, and on the replay base its own CPU time and the client
connections it saw. With
``--base vllm``, before the runs, how busy the machine is with the server idle and in the half
second after one request: its engine keeps cores busy after each request, which the client's runs
share.

Then the local step alone: one forward of both proxies for B sequences at once (``feed_many``;
each with a 48-token cache, one new token), median of 20, against B = 1.

    .venv/bin/python scripts/bench_throughput.py                  # replay base: 1, 4, 16, 64
    .venv/bin/python scripts/bench_throughput.py --counts 1 16 --rtt 50
    .venv/bin/python scripts/bench_throughput.py --base vllm      # the real CPU server
    .venv/bin/python scripts/bench_throughput.py --counts 64 --baseline REV --rounds 4

``--baseline REV``: the same runs with REV's package, in turn with this checkout's, round by
round (see scripts/baseline.py); medians and spreads of wall time and client CPU per request.

torch uses 1 thread: client and base share this machine's cores (see scripts/bench_step.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

if not __package__:  # run as a file: `scripts.` imports; a baseline's proxyclient stays first
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from scripts.bench_speed import LatencyRelay, candidate_prompts

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
    """CPU time of this process (the client: every thread), user + system."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _thread_cpu_seconds() -> dict[str, float]:
    """CPU seconds of this process's threads by role: the tuner's event loop (everything but the
    local forwards: HTTP, parsing, the engine) and the local forwards' worker (Linux /proc)."""
    roles = {"proxyclient-loop": "loop", "proxyclient-local": "forwards"}
    tick = os.sysconf("SC_CLK_TCK")
    spent = dict.fromkeys(roles.values(), 0.0)
    for thread in threading.enumerate():
        role = next((r for prefix, r in roles.items() if thread.name.startswith(prefix)), None)
        if role is None:
            continue
        try:
            stat = Path(f"/proc/self/task/{thread.native_id}/stat").read_text()
        except OSError:
            continue  # ended meanwhile
        fields = stat.rsplit(")", 1)[1].split()
        spent[role] += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return spent


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


@dataclass
class Row:
    count: int
    wall: float
    cpu: float
    loop_cpu: float  # the tuner's event loop thread
    forwards_cpu: float  # the local forwards' thread
    busy: float
    tokens: int
    requests: int
    sizes: dict[int, int]
    peak_mb: float
    base_cpu: float | None  # the replay server's CPU seconds; None on vLLM
    connections: int | None  # the client's connections the replay server saw; None on vLLM


def default_recording(models: Path, tokens: int, speculate: str) -> Path:
    name = f"bench_throughput-{models.name}-{tokens}t-{speculate}.jsonl.gz"  # requests differ
    return REPO / ".cache" / "replay" / name


def run_counts(base_url: str, args: argparse.Namespace, prompts, replay=None) -> tuple:
    """Warm up, then ``generate_many`` for each count; the rows and the local-step times."""
    from proxyclient import GenerationConfig, ProxyTuner, connect
    from scripts.miniature import BASE_NAME

    base = connect("vllm", base_url, BASE_NAME)
    rows = []
    with ProxyTuner(
        base, args.models / "expert-small", args.models / "base-small", threads=1
    ) as tuner:
        config = GenerationConfig(max_new_tokens=args.tokens, base_k=20, speculate=args.speculate)
        tuner.generate_many(prompts[:2], config, concurrency=2)  # warm-up
        for count in args.counts:
            tuner.proxies.batch_sizes.clear()
            before = replay.stats(reset=True) if replay is not None else None
            started, cpu_before = time.perf_counter(), _cpu_seconds()
            threads_before = _thread_cpu_seconds()
            busy_before, total_before = _machine_busy_seconds()
            with PeakMemory() as memory:
                results = tuner.generate_many(prompts[:count], config, concurrency=count)
            wall, cpu = time.perf_counter() - started, _cpu_seconds() - cpu_before
            threads = _thread_cpu_seconds()
            busy_after, total_after = _machine_busy_seconds()
            after = replay.stats() if replay is not None else None
            busy = (busy_after - busy_before) / (total_after - total_before)
            errors = [r.error for r in results if r.error]
            misses = after["misses"] if after else 0
            if errors:
                hint = ""
                if misses:
                    hint = (
                        f" ({misses} requests missing from the recording, e.g. "
                        f"{after['missed_keys'][0][:200]!r}; rerun with --record)"
                    )
                raise SystemExit(f"{len(errors)} generations failed, e.g. {errors[0]}{hint}")
            rows.append(
                Row(
                    count,
                    wall,
                    cpu,
                    threads["loop"] - threads_before["loop"],
                    threads["forwards"] - threads_before["forwards"],
                    busy,
                    sum(len(r.token_ids) for r in results),
                    sum(r.usage.requests for r in results),
                    dict(sorted(tuner.proxies.batch_sizes.items())),
                    memory.peak_mb,
                    after["cpu_s"] - before["cpu_s"] if after and before else None,
                    after["connections"] if after else None,
                )
            )
            print(f"{count} prompts done in {wall:.1f} s", file=sys.stderr)
        steps = {b: local_step_ms(tuner.proxies, b) for b in (1, 4, 16, 64)} if args.steps else {}
    return rows, steps


def record(args: argparse.Namespace, prompts, recording: Path) -> None:
    """The benchmark's runs against the real vLLM server through the recording proxy."""
    from scripts.miniature import BASE_NAME
    from scripts.replay_server import ReplayServer
    from scripts.vllm_server import VLLMServer

    print(f"recording the base's answers into {recording} (vLLM on the CPU)", file=sys.stderr)
    with (
        VLLMServer(args.models / "base-large", BASE_NAME, max_logprobs=20) as server,
        ReplayServer("record", recording, upstream=server.root_url) as recorder,
    ):
        no_steps = argparse.Namespace(**(vars(args) | {"steps": False}))
        run_counts(f"{recorder.root_url}/v1", no_steps, prompts)
        print(f"recorded: {recorder.stats()}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--rtt", type=float, default=50.0, help="round trip, ms")
    parser.add_argument(
        "--speculate",
        default="auto",
        choices=["off", "stream", "base", "expert", "auto"],
        help="the speculation mode (auto: streamed drafts on vLLM)",
    )
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--models", type=Path, default=MODELS)
    parser.add_argument("--base", choices=["replay", "vllm"], default="replay")
    parser.add_argument("--recording", type=Path, default=None, help="replay: the recording")
    parser.add_argument("--record", action="store_true", help="replay: record it again first")
    parser.add_argument(
        "--no-steps", dest="steps", action="store_false", help="no local-step table"
    )
    parser.add_argument("--baseline", help="a git revision to run in turn with this checkout")
    parser.add_argument("--rounds", type=int, default=3, help="with --baseline: rounds of each")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # rows only
    args = parser.parse_args(argv)
    if args.baseline:
        return compare(args, argv if argv is not None else sys.argv[1:])

    from scripts.miniature import BASE_NAME, load_eval

    torch.set_num_threads(1)
    prompts = candidate_prompts(load_eval(args.models, quick=False))[: max(args.counts)]
    idle_busy = after_request_busy = None
    with contextlib.ExitStack() as stack:
        if args.base == "replay":
            from scripts.replay_server import ReplayServer

            recording = args.recording or default_recording(
                args.models, args.tokens, args.speculate
            )
            if args.record or not recording.exists():
                record(args, prompts, recording)
            replay = stack.enter_context(ReplayServer("replay", recording, rtt_ms=args.rtt))
            rows, steps = run_counts(f"{replay.root_url}/v1", args, prompts, replay)
            where = f"base-large replayed from {recording.relative_to(REPO)} (no compute)"
        else:
            from scripts.vllm_server import VLLMServer

            server = stack.enter_context(
                VLLMServer(args.models / "base-large", BASE_NAME, max_logprobs=20)
            )
            relay = stack.enter_context(LatencyRelay(server.port))
            relay.set_rtt(args.rtt)
            idle_busy, after_request_busy = server_busy(server.base_url, BASE_NAME)
            rows, steps = run_counts(f"{relay.root_url}/v1", args, prompts)
            where = "base-large on vLLM (CPU)"

    if args.json:
        print(json.dumps([dataclasses.asdict(row) for row in rows]))
        return 0
    one = rows[0].wall
    busy_line = ""
    if idle_busy is not None:
        busy_line = (
            f" Machine busy with the vLLM server idle: {idle_busy:.0%}; in the 0.5 s after one "
            f"request: {after_request_busy:.0%}"
        )
    print(
        f"\n{args.tokens} tokens per prompt (fewer where one ends at EOS), greedy, k = 20, "
        f"speculate {args.speculate}, {args.rtt:g} ms round trip; {where}, expert-small / "
        f"base-small local (torch 1 thread), {os.cpu_count()} cores.{busy_line}\n"
    )
    print(
        "| prompts | wall s | vs 1 prompt | client CPU s | CPU ms / request | of which: event loop "
        "/ local forwards | CPU ms / token | machine busy | tokens | tokens/s | requests "
        "| local forwards by batch size | peak RSS MB | base CPU s | connections |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        spread = ", ".join(f"{b}: {n}" for b, n in r.sizes.items())
        base_cpu = "" if r.base_cpu is None else f"{r.base_cpu:.1f}"
        connections = "" if r.connections is None else str(r.connections)
        per = 1e3 / max(1, r.requests)
        print(
            f"| {r.count} | {r.wall:.2f} | {r.wall / one:.2f}x | {r.cpu:.2f} | {r.cpu * per:.2f} "
            f"| {r.loop_cpu * per:.2f} / {r.forwards_cpu * per:.2f} "
            f"| {r.cpu * 1e3 / max(1, r.tokens):.2f} "
            f"| {r.busy:.0%} | {r.tokens} | {r.tokens / r.wall:.0f} | {r.requests} | {spread} "
            f"| {r.peak_mb:.0f} | {base_cpu} | {connections} |"
        )
    if steps:
        print("\n| sequences in one local step | ms (both proxies) | vs 1 |")
        print("|---|---|---|")
        for batch, ms in steps.items():
            print(f"| {batch} | {ms:.2f} | {ms / steps[1]:.2f}x |")
    return 0


def compare(args: argparse.Namespace, argv: list[str]) -> int:
    """``--baseline``: this script's runs (without the option) with each package in turn."""
    from scripts.baseline import package_env, source_tree

    own = list(argv)
    for option, takes_value in (("--baseline", True), ("--rounds", True)):
        while option in own:
            at = own.index(option)
            del own[at : at + 1 + takes_value]
    command = [sys.executable, __file__, *own, "--no-steps", "--json"]
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"this checkout": None, args.baseline: source_tree(args.baseline, Path(tmp))}
        runs: dict[str, list[list[dict]]] = {name: [] for name in trees}
        for _ in range(args.rounds):
            for name, tree in trees.items():
                out = subprocess.run(command, env=package_env(tree), capture_output=True, text=True)
                if out.returncode:
                    raise SystemExit(f"{name}: the benchmark failed:\n{out.stderr[-2000:]}")
                runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"\n{args.rounds} rounds of each, in turn; medians (min - max)\n")
    print(
        "| checkout | prompts | wall s | client CPU ms / request | event loop ms / request "
        "| local forwards ms / request | CPU ms / token |"
    )
    print("|---|---|---|---|---|---|---|")

    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):.2f} ({min(values):.2f} - {max(values):.2f})"

    for name, rounds in runs.items():
        for i, count in enumerate(args.counts):
            rows = [r[i] for r in rounds]
            walls = [r["wall"] for r in rows]
            per_request = [1e3 * r["cpu"] / max(1, r["requests"]) for r in rows]
            per_token = [1e3 * r["cpu"] / max(1, r["tokens"]) for r in rows]
            loop = [1e3 * r["loop_cpu"] / max(1, r["requests"]) for r in rows]
            forwards = [1e3 * r["forwards_cpu"] / max(1, r["requests"]) for r in rows]
            print(
                f"| {name} | {count} | {cell(walls)} | {cell(per_request)} | {cell(loop)} "
                f"| {cell(forwards)} | {cell(per_token)} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
