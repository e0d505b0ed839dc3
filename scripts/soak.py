"""Soak: many concurrent generations against a real vLLM server through a fault-injecting proxy.

Starts a vLLM CPU server for the tiny test base (scripts/vllm_server.py) and the fault proxy of the
tests (tests/support/fault_proxy.py) in front of it, both on 127.0.0.1 only, runs the prompts once
without faults for reference, then again and again with ``--fault-rate`` of the requests faulty
(drops, resets, hangs past the read timeout, 5xx and 429 with and without Retry-After, truncated or
malformed JSON, NaN or missing logprobs), each round ``ProxyTuner.agenerate_many`` over
``--concurrency`` prompts at once, until ``--duration`` seconds or ``--max-generations``.

Each generation is counted once:
- completed: finished, and its greedy output equals the fault-free run's;
  recovered: completed although some of its requests were faulty;
- failed cleanly: finish_reason "error", a message, and its tokens a prefix of the fault-free run's;
- lost: anything else (no result, an exception that escaped, a different output): must be 0.
RSS and open file descriptors are measured after the reference run and at the end.

    .venv/bin/python scripts/soak.py --duration 120 --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if not __package__:  # run as a file: `scripts.` and `tests.` import from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.fault_proxy import Fault, FaultProxy  # noqa: E402

FAULT_MIX = [
    Fault("drop"),
    Fault("reset"),
    Fault("hang", seconds=6.0),  # past the client's 5 s read timeout
    Fault("status", status=500),
    Fault("status", status=502),
    Fault("status", status=503),
    Fault("status", status=503, headers=(("Retry-After", "1"),)),
    Fault("status", status=429),
    Fault("status", status=429, headers=(("retry-after-ms", "300"),)),
    Fault("truncate"),
    Fault("malformed"),
    Fault("nan"),
    Fault("missing"),
]
_PROMPT_IDS = re.compile(rb'"prompt":\s*\[([\d,\s]+)')


@dataclass
class Tally:
    completed: int = 0
    recovered: int = 0
    failed_cleanly: int = 0
    lost: int = 0
    rounds: int = 0
    requests: int = 0
    faults: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    lost_examples: list[str] = field(default_factory=list)

    @property
    def generations(self) -> int:
        return self.completed + self.failed_cleanly + self.lost


def rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


def prompts(n: int) -> list[str]:
    return [f"# task {i}\ndef solve_{i}(items):\n    " for i in range(n)]


def faulted_keys(records, keys: list[tuple[int, ...]]) -> tuple[Counter, Counter]:
    """Per generation (by its prompt's ids, which every request of it begins with), how many of
    its requests were faulty; and the faults by kind."""
    per_key: Counter = Counter()
    kinds: Counter = Counter()
    known, lengths = set(keys), {len(k) for k in keys}
    for record in records:
        if record.fault.kind == "pass":
            continue
        kinds[str(record.fault)] += 1
        match = _PROMPT_IDS.search(record.body)
        ids = [int(x) for x in match.group(1).split(b",") if x.strip()] if match else []
        for n in lengths:
            if tuple(ids[:n]) in known:
                per_key[tuple(ids[:n])] += 1
    return per_key, kinds


async def soak(args: argparse.Namespace) -> dict:
    import httpx
    import torch

    from proxyclient import GenerationConfig, ProxyTuner, connect
    from scripts.make_tiny_models import build_tiny_models
    from scripts.vllm_server import VLLMServer

    torch.set_num_threads(1)  # the server shares this machine's cores
    models = build_tiny_models(REPO / ".cache" / "tiny-models")
    server = VLLMServer(models["base"], "tiny-base", max_logprobs=20)
    print("starting vLLM ...", file=sys.stderr)
    server.start()
    proxy = FaultProxy(server.root_url.removeprefix("http://")).start()
    tally = Tally()
    try:
        base = connect(
            "vllm",
            f"{proxy.url}/v1",
            "tiny-base",
            timeout=httpx.Timeout(5.0, connect=2.0),
            max_retries=args.max_retries,
        )
        config = GenerationConfig(max_new_tokens=args.tokens, base_k=20, speculate=args.speculate)
        texts = prompts(args.concurrency)
        async with ProxyTuner(base, models["expert"], models["anti_expert"], device="cpu") as tuner:
            keys = [tuple(tuner.tokens.encode_prompt(p).base) for p in texts]
            assert len(set(keys)) == len(keys), "prompts must differ"
            reference = await tuner.agenerate_many(texts, config, concurrency=args.concurrency)
            assert all(r.finish_reason != "error" for r in reference), "fault-free run failed"
            proxy.take_records()
            before = {"rss_mib": rss_mib(), "open_fds": open_fds()}
            proxy.random_faults(args.fault_rate, FAULT_MIX, seed=args.seed)
            started = time.monotonic()
            while (
                time.monotonic() - started < args.duration
                and tally.generations < args.max_generations
            ):
                try:
                    results = await tuner.agenerate_many(
                        texts, config, concurrency=args.concurrency
                    )
                except Exception as exc:  # must not happen: agenerate_many keeps failures
                    results = [None] * len(texts)
                    tally.lost_examples.append(f"round raised {type(exc).__name__}: {exc}")
                records = proxy.take_records()
                faulty, kinds = faulted_keys(records, keys)
                tally.rounds += 1
                tally.requests += len(records)
                tally.faults.update(kinds)
                for key, want, got in zip(keys, reference, results, strict=True):
                    classify(tally, want, got, faulty[key])
            elapsed = time.monotonic() - started
            proxy.schedule()
        after = {"rss_mib": rss_mib(), "open_fds": open_fds()}
    finally:
        proxy.stop()
        server.stop()
    return {
        "command": " ".join(sys.argv),
        "seconds": round(elapsed, 1),
        "concurrency": args.concurrency,
        "fault_rate": args.fault_rate,
        "rounds": tally.rounds,
        "generations": tally.generations,
        "completed": tally.completed,
        "recovered": tally.recovered,
        "failed_cleanly": tally.failed_cleanly,
        "lost": tally.lost,
        "requests": tally.requests,
        "faults_injected": sum(tally.faults.values()),
        "faults": dict(tally.faults.most_common()),
        "errors": dict(tally.errors.most_common()),
        "lost_examples": tally.lost_examples[:5],
        "before": before,
        "after": after,
    }


def classify(tally: Tally, want, got, faults: int) -> None:
    if got is None:
        tally.lost += 1
        return
    if got.finish_reason != "error":
        if got.token_ids == want.token_ids and got.text == want.text:
            tally.completed += 1
            tally.recovered += faults > 0
        else:
            tally.lost += 1
            tally.lost_examples.append(f"different output: {got.text!r} != {want.text!r}")
        return
    prefix = want.token_ids[: len(got.token_ids)] == got.token_ids
    if got.error and prefix and want.text.startswith(got.text):
        tally.failed_cleanly += 1
        tally.errors[_reason(got.error)] += 1
    else:
        tally.lost += 1
        tally.lost_examples.append(f"failed without its tokens: {got.error!r}")


def _reason(error: str) -> str:
    """What an error says happened, without the request and the attempt counts."""
    said = error.split("): ", 1)[-1]
    return re.split(r" \(?after \d+ attempt|\. |; |: '", said)[0][:60]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of faulty rounds")
    parser.add_argument("--max-generations", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64, help="generations per round")
    parser.add_argument("--fault-rate", type=float, default=0.05, help="share of faulty requests")
    parser.add_argument("--tokens", type=int, default=16, help="max_new_tokens per generation")
    parser.add_argument("--max-retries", type=int, default=3)
    parser.add_argument("--speculate", default="off", help="off: one request per token")
    parser.add_argument("--seed", type=int, default=0, help="of the fault schedule")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = parser.parse_args(argv)
    summary = asyncio.run(soak(args))
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0 if summary["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
