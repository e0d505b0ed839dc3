"""The cost of one step's combine + choice, by vocabulary size and unseen-token policy.

Under ``residual`` and ``floor`` every token of the shared vocabulary is a candidate, so a step
costs passes over the whole vocabulary (128k for Llama 3); this measures them without models or
a server: a fixed top-20 answer, random proxy log-probs, greedy choice, torch on 1 thread.

    .venv/bin/python scripts/bench_combine.py
    .venv/bin/python scripts/bench_combine.py --vocab 151936 --calls 500
"""

from __future__ import annotations

import argparse
import time

import torch

from proxyclient.adapters.base import TopLogprobs
from proxyclient.combine import combine
from proxyclient.config import UnseenPolicy
from proxyclient.sampling import choose
from proxyclient.steps import _as_arrays


def per_call_ms(vocab: int, policy: UnseenPolicy, calls: int) -> float:
    generator = torch.Generator().manual_seed(0)
    twin = torch.arange(vocab)
    expert = torch.log_softmax(torch.randn(vocab, generator=generator), 0)
    anti = torch.log_softmax(torch.randn(vocab, generator=generator), 0)
    base = torch.topk(torch.log_softmax(torch.randn(vocab, generator=generator).double(), 0), 20)
    top = TopLogprobs(tuple(base.indices.tolist()), tuple(base.values.tolist()))
    started = time.perf_counter()
    for _ in range(calls):  # as a step does: the answer arrives as tuples
        ids, logprobs = _as_arrays(top)
        candidates = combine(
            ids,
            logprobs,
            expert,
            anti,
            alpha=1.0,
            policy=policy,
            twin=twin,
        )
        choose(candidates.scores, temperature=0, top_k=0, top_p=1.0, generator=None)
    return (time.perf_counter() - started) / calls * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, action="append", help="vocabulary sizes")
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("vocab    policy     ms per step (combine + greedy choice)")
    for vocab in args.vocab or [1000, 32000, 128256]:
        for policy in UnseenPolicy:
            print(f"{vocab:<8} {policy.value:<10} {per_call_ms(vocab, policy, args.calls):.3f}")


if __name__ == "__main__":
    main()
