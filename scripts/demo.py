"""The main job on an embedded default: the base's own output next to the proxy-tuned output.

Builds the tiny offline models (scripts/make_tiny_models.py), starts a local vLLM server for the
base (scripts/vllm_server.py), and generates greedily from the same prompt with alpha = 0 (the base
alone; equal to the server's own greedy output) and with the chosen alpha (proxy-tuned).

    bash scripts/demo.sh                       # set up, then this script with its defaults
    .venv/bin/python scripts/demo.py --prompt "class Foo:" --alpha 2

The tiny models have random weights: the text is code-flavoured noise, and the point is the
difference the expert makes. Pass --base-url to use a server you already run.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_tiny_models import build_tiny_models
from vllm_server import VLLMServer

from proxyclient import GenerationConfig, ProxyTuner, connect

REPO = Path(__file__).resolve().parent.parent
BASE_NAME = "tiny-base"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt", default="def main():\n    ")
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--top-logprobs", type=int, default=20)
    parser.add_argument("--models", type=Path, default=REPO / ".cache" / "tiny-models")
    parser.add_argument("--base-url", help="use this running server instead of starting one")
    args = parser.parse_args(argv)

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # The client shares this machine's cores with the server: one torch thread (real-servers.md).
    torch.set_num_threads(1)
    models = build_tiny_models(args.models)
    server = None
    base_url = args.base_url
    if base_url is None:
        print("starting a vLLM server for the base model ...", file=sys.stderr)
        server = VLLMServer(models["base"], BASE_NAME, max_logprobs=50).start()
        base_url = server.base_url
    try:
        base = connect("vllm", base_url, BASE_NAME)
        with ProxyTuner(base, models["expert"], models["anti_expert"], threads=1) as tuner:
            config = GenerationConfig(
                max_new_tokens=args.max_new_tokens, top_logprobs=args.top_logprobs
            )
            started = time.perf_counter()
            plain = tuner.generate(args.prompt, config, alpha=0.0)
            tuned = tuner.generate(args.prompt, config, alpha=args.alpha)
            seconds = time.perf_counter() - started
    finally:
        if server is not None:
            server.stop()

    print(f"prompt: {args.prompt!r}   base: vLLM at {base_url}   k={args.top_logprobs}\n")
    _side_by_side(
        "base alone (alpha=0)", plain.text, f"proxy-tuned (alpha={args.alpha})", tuned.text
    )
    same = sum(a == b for a, b in zip(plain.token_ids, tuned.token_ids, strict=False))
    print(
        f"\n{len(tuned.token_ids)} tokens each; the first {_common_prefix(plain, tuned)} agree, "
        f"{same} positions agree overall. {plain.usage.requests + tuned.usage.requests} base "
        f"requests in {seconds:.2f} s."
    )
    return 0


def _common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a.token_ids, b.token_ids, strict=False):
        if x != y:
            break
        n += 1
    return n


def _side_by_side(left_title: str, left: str, right_title: str, right: str, width: int = 44):
    def lines(text: str) -> list[str]:
        out: list[str] = []
        for line in text.replace("\t", "    ").split("\n"):
            out.extend(textwrap.wrap(line, width, replace_whitespace=False) or [""])
        return out

    left_lines, right_lines = lines(repr(left)[1:-1]), lines(repr(right)[1:-1])
    print(f"{left_title:<{width}} | {right_title}")
    print(f"{'-' * width}-+-{'-' * width}")
    for i in range(max(len(left_lines), len(right_lines))):
        a = left_lines[i] if i < len(left_lines) else ""
        b = right_lines[i] if i < len(right_lines) else ""
        print(f"{a:<{width}} | {b}")


if __name__ == "__main__":
    sys.exit(main())
