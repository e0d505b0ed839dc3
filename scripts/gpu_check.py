"""One short check of the accelerator path (cuda, bf16), printed as a report.

    python scripts/gpu_check.py              # on a machine with a GPU
    python scripts/gpu_check.py --device cpu # the same checks on the CPU

1. device/dtype "auto" resolve to cuda/bf16;
2. with fp32 proxies on the device, the loop equals the paper's formula (all three models local,
   fp32 on the CPU) token for token; with bf16 proxies, how far the tokens agree;
3. KV-cached steps on the device match full forwards;
4. overlap: per-step wall time with a base that answers after a fixed network delay, for larger
   proxies on the device, with and without overlapping the two.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

if not __package__:  # run as a file: `scripts.` and `tests.` import from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxyclient import ProxyTuner
from proxyclient.adapters.base import Capabilities, TopLogprobs
from proxyclient.devices import resolve_device, resolve_dtype
from proxyclient.kvcache import KVState
from proxyclient.local import LocalModel
from scripts.make_tiny_models import build_proxy_pair, build_tiny_models
from tests.support.local_base import LocalBase
from tests.support.reference import assert_same_tokens, proxy_tuned_greedy

PROMPTS = ["def main():", "import os\nclass Foo(object):\n    ", "for i in range(10):"]


class DelayedBase:
    """Answers a fixed top-20 after ``delay`` seconds of (CPU-free) waiting: a remote server."""

    name = "delayed"
    capabilities = Capabilities(
        max_k=20, token_id_prompts=True, ids_in_response=True, prompt_scoring=False, logprobs="raw"
    )

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.answer = TopLogprobs(tuple(range(3, 23)), tuple(-1.0 - 0.1 * i for i in range(20)))

    async def top_logprobs(self, prompt, k):
        await asyncio.sleep(self.delay)
        return self.answer

    async def aclose(self) -> None:
        pass


@torch.inference_mode()
def full_forward(model: LocalModel, ids: list[int]) -> torch.Tensor:
    logits = model.model(input_ids=torch.tensor([ids], device=model.device)).logits[0, -1]
    return torch.log_softmax(logits.float(), dim=-1).cpu()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--delay-ms", type=float, default=20.0)
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    device = resolve_device(args.device)
    print(f"torch {torch.__version__}, device {device}", end="")
    print(f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else "")
    print(f"1. auto resolves to: {resolve_device('auto')}, {resolve_dtype('auto', device)}")
    failures = 0

    with tempfile.TemporaryDirectory() as tmp:
        tiny = build_tiny_models(Path(tmp) / "tiny")
        ref = {
            name: AutoModelForCausalLM.from_pretrained(tiny[name], dtype=torch.float32).eval()
            for name in ("base", "expert", "anti_expert")
        }
        for dtype in ("float32", "bfloat16"):
            tuner = ProxyTuner(
                LocalBase(ref["base"]), tiny["expert"], tiny["anti_expert"],
                device=device, dtype=dtype,
            )  # fmt: skip
            weights = next(tuner.proxies.expert.model.parameters())
            assert weights.dtype == resolve_dtype(dtype, device)
            agree, total = 0, 0
            for prompt in PROMPTS:
                for alpha in (0.5, 1.0, 2.0):
                    got = tuner.generate(prompt, max_new_tokens=16, alpha=alpha, base_k=-1)
                    expected = proxy_tuned_greedy(
                        ref["base"], ref["expert"], ref["anti_expert"],
                        tuner.tokenizer(prompt).input_ids, alpha=alpha, max_new_tokens=16,
                        eos_ids=tuner.eos_ids,
                    )  # fmt: skip
                    tokens = [s.token for s in expected]
                    n = next((i for i, (a, b) in enumerate(zip(got.token_ids, tokens, strict=False))
                              if a != b), min(len(tokens), len(got.token_ids)))  # fmt: skip
                    agree, total = agree + n, total + len(tokens)
                    if dtype == "float32":
                        try:
                            assert_same_tokens(got.token_ids, expected, tuner.eos_ids)
                        except AssertionError as exc:
                            failures += 1
                            print(f"   FAIL fp32 {prompt!r} alpha={alpha}: {exc}")
            print(
                f"2. {dtype} proxies on {device}: {agree}/{total} tokens agree with the fp32 "
                f"CPU formula before any divergence"
            )
            tuner.close()

        for dtype in (torch.float32, torch.bfloat16):
            model = LocalModel.load(tiny["expert"], device=device, dtype=dtype)
            ids = [0, 321, 530, 264, 827, 40, 41, 42]
            state = KVState()
            steps = [model.feed(state, ids[:3])[0]] + [model.feed(state, [t])[0] for t in ids[3:]]
            worst = max(
                float((lp - full_forward(model, ids[:n])).abs().max())
                for n, lp in zip(range(3, len(ids) + 1), steps, strict=True)
            )
            print(f"3. KV-cached vs full forward on {device}, {dtype}: max |diff| {worst:.2e}")
            if dtype == torch.float32 and worst > 1e-4:
                failures += 1

        expert, anti = build_proxy_pair(tiny["anti_expert"], Path(tmp), hidden=1024, layers=16)
        delay = args.delay_ms / 1e3
        print(f"4. overlap, proxies hidden 1024 x 16 layers (bf16 on cuda), base delay "
              f"{args.delay_ms:g} ms, 64 tokens, median of 3 (ms per step):")  # fmt: skip
        for overlap in (True, False):
            tuner = ProxyTuner(DelayedBase(delay), expert, anti, device=device, overlap=overlap)
            tuner.generate("def main():", max_new_tokens=8, base_k=20, unseen="restrict")  # warm-up
            walls, locals_ = [], []
            for _ in range(3):
                t = tuner.generate(
                    "def main():", max_new_tokens=64, base_k=20, unseen="restrict"
                ).timings
                walls.append(t.wall_s / t.steps * 1e3)
                locals_.append(t.local_s / t.steps * 1e3)
            print(f"   overlap {'on ' if overlap else 'off'}: wall {statistics.median(walls):.2f}"
                  f"  local {statistics.median(locals_):.2f}")  # fmt: skip
            tuner.close()
    print("RESULT:", "ok" if failures == 0 else f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    start = time.perf_counter()
    code = main()
    print(f"took {time.perf_counter() - start:.1f} s")
    sys.exit(code)
