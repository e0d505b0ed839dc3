"""Per-step timings of the decoding loop.

1. Local per-step time at prefix 16 vs 512 tokens (KV cache on: must be flat), next to a full
   forward over the prefix (what a step would cost without the cache).
2. Per-step wall time against a real vLLM server with and without overlapping the base request
   and the local forwards, same prompt, same tokens, run alternately.

    .venv/bin/python scripts/bench_step.py                   # tiny proxies (hidden 128, 2 layers)
    .venv/bin/python scripts/bench_step.py --proxy-hidden 512 --proxy-layers 8

torch uses 1 thread: client and server share this machine's 2 cores, and with 2 torch threads the
OpenMP spin-waits of both processes fight over them (a tiny local forward took ~250 ms instead of
~2 ms next to a vLLM CPU server).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import torch

if not __package__:  # run as a file: `scripts.` and `tests.` import from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxyclient import GenerationConfig, ProxyTuner, connect
from proxyclient.kvcache import KVState
from proxyclient.local import LocalModel
from scripts.make_tiny_models import build_proxy_pair, build_tiny_models
from scripts.vllm_server import VLLMServer

REPO = Path(__file__).resolve().parent.parent


class WithLatency:
    """The base behind an extra network round trip (sleeping, so it uses no CPU): on this machine
    the server is local, while users' servers are remote."""

    def __init__(self, base, seconds: float) -> None:
        self.base, self.seconds = base, seconds
        self.name, self.capabilities = base.name, base.capabilities

    async def top_logprobs(self, prompt, k):
        await asyncio.sleep(self.seconds)
        return await self.base.top_logprobs(prompt, k)

    async def aclose(self) -> None:
        await self.base.aclose()


def local_step_ms(model: LocalModel, prefix: int, steps: int) -> tuple[float, float]:
    """Median ms of one cached single-token step after ``prefix`` tokens, and of a full forward."""
    ids = [(7 * i) % 900 + 3 for i in range(prefix + steps)]
    state = KVState()
    model.feed(state, ids[:prefix])
    cached = []
    for token in ids[prefix:]:
        start = time.perf_counter()
        model.feed(state, [token])
        cached.append(time.perf_counter() - start)
    full = []
    for _ in range(max(3, steps // 4)):
        start = time.perf_counter()
        model.feed(KVState(), ids[:prefix])
        full.append(time.perf_counter() - start)
    return statistics.median(cached) * 1e3, statistics.median(full) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--proxy-hidden", type=int, default=128)
    parser.add_argument("--proxy-layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=48, help="tokens per timed generation")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per setting")
    parser.add_argument(
        "--added-latency-ms",
        type=float,
        nargs="*",
        default=[0.0, 20.0],
        help="simulated network round trips to time part 2 with",
    )
    parser.add_argument("--models", type=Path, default=REPO / ".cache" / "tiny-models")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    tiny = build_tiny_models(args.models)
    expert, anti = tiny["expert"], tiny["anti_expert"]
    if (args.proxy_hidden, args.proxy_layers) != (128, 2):
        expert, anti = build_proxy_pair(
            tiny["anti_expert"], args.models, hidden=args.proxy_hidden, layers=args.proxy_layers
        )
    print(f"proxies: hidden {args.proxy_hidden}, {args.proxy_layers} layers; torch threads: 1")

    model = LocalModel.load(expert, device="cpu")
    print("\n1. local step of one proxy (median ms)")
    print(f"{'prefix':>8} {'cached step':>12} {'full forward':>13}")
    for prefix in (16, 512):
        local_step_ms(model, prefix, 8)  # warm-up
        cached, full = local_step_ms(model, prefix, 64)
        print(f"{prefix:>8} {cached:>12.2f} {full:>13.2f}")

    print("\n2. per step against a real vLLM server (base: tiny 3-layer model), k=20")
    server = VLLMServer(tiny["base"], "tiny-base", max_logprobs=50).start()
    try:
        for latency_ms in args.added_latency_ms:
            print(f"\n   added network latency: {latency_ms:g} ms per request")
            time_overlap(server, expert, anti, latency_ms / 1e3, args)
    finally:
        server.stop()
    return 0


def time_overlap(server: VLLMServer, expert: Path, anti: Path, latency: float, args) -> None:
    config = GenerationConfig(max_new_tokens=args.tokens, base_k=20, unseen="restrict")
    tuners = {}
    for overlap in (True, False):
        base = WithLatency(connect("vllm", server.base_url, "tiny-base"), latency)
        tuners[overlap] = ProxyTuner(base, expert, anti, overlap=overlap)
    for tuner in tuners.values():
        tuner.generate("def main():", config, max_new_tokens=4)  # warm-up
    samples: dict[bool, list] = {True: [], False: []}
    for _ in range(args.rounds):
        for overlap, tuner in tuners.items():
            samples[overlap].append(tuner.generate("def main():", config).timings)
    print(f"{'overlap':>8} {'wall/step':>10} {'base/step':>10} {'local/step':>11}  (ms)")
    for overlap, timings in samples.items():
        steps = sum(t.steps for t in timings)
        wall = sum(t.wall_s for t in timings) / steps * 1e3
        base = sum(t.base_s for t in timings) / steps * 1e3
        local = sum(t.local_s for t in timings) / steps * 1e3
        print(f"{'on' if overlap else 'off':>8} {wall:>10.2f} {base:>10.2f} {local:>11.2f}")
    for tuner in tuners.values():
        tuner.close()


if __name__ == "__main__":
    sys.exit(main())
