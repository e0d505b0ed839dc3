"""Where a streamed draft's time goes, request by request: the base's first position, the gaps
between positions, and the client's turnaround from closing one stream to sending the next.

The miniature's base-large on the vLLM CPU server behind bench_speed.py's latency relay, steered
by expert-small / base-small (``speculate="stream"``, greedy, k = 20, 4 prompts x 64 tokens), at
each ``--rtts``; then, for comparison, an idle vLLM's own time to first token on direct requests.

    .venv/bin/python scripts/stream_rounds.py              # RTT 0 and 50 ms: about 2 min
    .venv/bin/python scripts/stream_rounds.py --rtts 200 --stream-tokens 6
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import torch

if not __package__:  # run as a file: `scripts.` and `tests.` import from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.bench_speed import LatencyRelay, candidate_prompts

MODELS = Path(__file__).resolve().parent / "miniature_models"


def timed(base: Any, log: list[dict[str, Any]]) -> None:
    """Wrap ``base.stream_draft`` to log each request's start, positions' arrival and close."""
    stream_draft = base.stream_draft

    def wrapped(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        positions = stream_draft(*args, **kwargs)
        record: dict[str, Any] = {"start": time.perf_counter(), "arrived": []}
        log.append(record)

        async def relayed() -> AsyncIterator[Any]:
            try:
                async for position in positions:
                    record["arrived"].append(time.perf_counter())
                    yield position
            finally:
                record["closed"] = time.perf_counter()
                await positions.aclose()

        return relayed()

    base.stream_draft = wrapped


def median_ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e3:.1f}" if values else "–"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rtts", type=float, nargs="+", default=[0.0, 50.0])
    parser.add_argument("--stream-tokens", type=int, default=None, help="default: the engine's")
    parser.add_argument("--prompts", type=int, default=4)
    args = parser.parse_args(argv)

    from proxyclient import GenerationConfig, ProxyTuner, connect
    from scripts.miniature import BASE_NAME, load_eval
    from scripts.vllm_server import VLLMServer

    torch.set_num_threads(1)
    prompts = candidate_prompts(load_eval(MODELS, quick=False))[: args.prompts]
    extra = {"stream_tokens": args.stream_tokens} if args.stream_tokens else {}
    config = GenerationConfig(max_new_tokens=64, base_k=20, speculate="stream", **extra)
    log: list[dict[str, Any]] = []
    print("| RTT ms | requests | first position ms (median, p90) | gap between positions ms "
          "| close -> next request ms |")  # fmt: skip
    print("|---|---|---|---|---|")
    with (
        VLLMServer(MODELS / "base-large", BASE_NAME, max_logprobs=20) as server,
        LatencyRelay(server.port) as relay,
    ):
        base = connect("vllm", f"{relay.root_url}/v1", BASE_NAME)
        timed(base, log)
        with ProxyTuner(base, MODELS / "expert-small", MODELS / "base-small", threads=1) as tuner:
            for rtt in args.rtts:
                relay.set_rtt(rtt)
                tuner.generate(prompts[0], config, max_new_tokens=8)  # warm-up
                del log[:]
                for prompt in prompts:
                    tuner.generate(prompt, config)
                first = sorted(r["arrived"][0] - r["start"] for r in log if r["arrived"])
                gaps = [b - a for r in log for a, b in itertools.pairwise(r["arrived"])]
                # Within one generation: the next request follows the close within a second.
                turns = [b["start"] - a["closed"] for a, b in itertools.pairwise(log)]
                turns = [t for t in turns if 0 <= t < 1]
                p90 = first[int(0.9 * (len(first) - 1))] * 1e3 if first else float("nan")
                print(f"| {rtt:g} | {len(log)} | {median_ms(first)} ({p90:.1f}) "
                      f"| {median_ms(gaps)} | {median_ms(turns)} |")  # fmt: skip
            ids = tuner.tokenizer(prompts[0]).input_ids
        first_token = []
        with httpx.Client(base_url=server.root_url, timeout=30) as client:
            for i in range(10):  # one stream at a time, each read to its end: vLLM idle
                body = {"model": BASE_NAME, "prompt": [*ids, *[5] * i], "max_tokens": 16,
                        "stream": True, "logprobs": 20, "temperature": 0}  # fmt: skip
                sent, seen = time.perf_counter(), None
                with client.stream("POST", "/v1/completions", json=body) as response:
                    for line in response.iter_lines():
                        if seen is None and line.startswith("data: {"):
                            seen = time.perf_counter() - sent
                first_token.append(seen or float("nan"))
    print(f"\nan idle vLLM's first token, direct (10 streams of 16 tokens, read to the end): "
          f"{min(first_token) * 1e3:.1f}-{max(first_token) * 1e3:.1f} ms")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
