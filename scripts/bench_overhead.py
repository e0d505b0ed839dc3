"""The engine's own cost per step, this checkout against an earlier revision, in one run.

The base answers at once from a fixed top-k table (no server, no network), so a step's wall time is
the proxies' forwards plus everything the engine does around them: bookkeeping, the bridge,
combine, sampling, the hops between the event loop and the worker thread. Each revision runs in
its own process (same models, same prompt, same tokens), alternately, several rounds; the median
per-step time of each round is printed, then the medians over rounds.

    .venv/bin/python scripts/bench_overhead.py --baseline HEAD~3
    .venv/bin/python scripts/bench_overhead.py --baseline 7955770 --rounds 7 --tokens 128

Noise: the spread between rounds of one revision, printed as min-max; a difference smaller than
that spread is noise. torch uses 1 thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

if not __package__:  # run as a file: `scripts.` imports; a baseline's proxyclient stays first
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from scripts.baseline import package_env, source_tree

REPO = Path(__file__).resolve().parent.parent


def worker(tokens: int, generations: int, unseen: str, k: int) -> None:
    """One process, one revision: print the per-step wall times in ms as JSON."""
    import asyncio

    import torch

    sys.path.append(str(REPO))  # `scripts.` imports; the baseline proxyclient stays first
    from proxyclient import GenerationConfig, ProxyTuner
    from proxyclient.adapters.base import Capabilities, TopLogprobs
    from scripts.make_tiny_models import build_tiny_models

    torch.set_num_threads(1)
    tiny = build_tiny_models(REPO / ".cache" / "tiny-models")
    generator = torch.Generator().manual_seed(0)
    # A fixed next-token distribution over the tiny vocabulary; its top-k is every answer.
    logprobs = torch.log_softmax(torch.randn(1000, generator=generator, dtype=torch.float64), 0)
    top = torch.topk(logprobs, k)
    answer = TopLogprobs(tuple(top.indices.tolist()), tuple(top.values.tolist()))

    class InstantBase:
        name = "instant"
        capabilities = Capabilities(
            max_k=-1,
            token_id_prompts=True,
            ids_in_response=True,
            prompt_scoring=False,
            logprobs="raw",
        )
        tokenizer = None

        async def top_logprobs(self, prompt, k):
            await asyncio.sleep(0)
            return answer

        async def aclose(self):
            pass

    with ProxyTuner(InstantBase(), tiny["expert"], tiny["anti_expert"], device="cpu") as tuner:
        # k's option was called top_logprobs before it became base_k: older baselines run too.
        k_name = "base_k" if "base_k" in GenerationConfig.__dataclass_fields__ else "top_logprobs"
        options = {"max_new_tokens": tokens, k_name: k, "unseen": unseen, "alpha": 1.0}
        tuner.generate("def main():", max_new_tokens=4)  # warm-up
        per_step = []
        for _ in range(generations):
            timings = tuner.generate("def main():", **options).timings
            per_step.append(timings.wall_s / timings.steps * 1e3)
    print(json.dumps(per_step))


def run_worker(tree: Path | None, args: argparse.Namespace) -> list[float]:
    env = package_env(tree)
    command = [
        sys.executable, __file__, "--worker", "--tokens", str(args.tokens),
        "--generations", str(args.generations), "--unseen", args.unseen, "--k", str(args.k),
    ]  # fmt: skip
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", default="HEAD", help="git revision to compare with")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per generation")
    parser.add_argument("--generations", type=int, default=5, help="generations per round")
    parser.add_argument("--unseen", default="residual")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.tokens, args.generations, args.unseen, args.k)
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        trees = {f"baseline {args.baseline}": source_tree(args.baseline, Path(tmp)), "this": None}
        rounds: dict[str, list[float]] = {name: [] for name in trees}
        for _ in range(args.rounds):
            for name, tree in trees.items():
                rounds[name].append(statistics.median(run_worker(tree, args)))
    print(
        f"per-step wall (ms), instant base, tiny proxies, k={args.k}, {args.unseen}, "
        f"{args.tokens} tokens x {args.generations} generations, {args.rounds} rounds"
    )
    print(f"{'revision':<24} {'median':>8} {'min-max over rounds':>22}")
    for name, values in rounds.items():
        spread = f"{min(values):.3f}-{max(values):.3f}"
        print(f"{name:<24} {statistics.median(values):>8.3f} {spread:>22}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
