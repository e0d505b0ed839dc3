"""The main job on an embedded default: a base that knows facts, steered into a tuned format.

Uses the miniature world of scripts/miniature.py (committed models under scripts/miniature_models):
base-large read an encyclopedia of invented people; expert-small is a much smaller model tuned
to answer `Q: ... A:` with the bare value, on questions about OTHER people. For questions about
held-out people, this prints side by side:

- base-large alone, through a local vLLM server (alpha = 0): it knows the fact but answers like
  its encyclopedia (a sentence, then more quiz text);
- expert-small alone (local): the format, but it is too small to know the fact;
- proxy-tuned base-large (base + alpha * (expert - anti-expert), through the same API): the
  format from the expert, the fact from the base.

    bash scripts/demo.sh                                  # set up, then this script
    .venv/bin/python scripts/demo.py --questions 5 --alpha 1
    .venv/bin/python scripts/demo.py --prompt $'Q: Where was Brai Tousk born?\\nA:'

Pass --base-url to use a vLLM server already serving scripts/miniature_models/base-large (and
--base-model NAME unless it serves it as miniature-base-large).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import transformers

if not __package__:  # run as a file: `scripts.` and `tests.` import from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxyclient import GenerationConfig, ProxyTuner, connect
from proxyclient.config import DEFAULT_BASE_K
from scripts.miniature import BASE_NAME, DEFAULT_DIR, greedy_answers, load_model
from scripts.vllm_server import VLLMServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable); default: eval")
    parser.add_argument("--questions", type=int, default=4, help="held-out questions to ask")
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--models", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--base-url", help="use this running server instead of starting one")
    parser.add_argument(
        "--base-model", default=BASE_NAME, help="the name --base-url serves base-large under"
    )
    args = parser.parse_args(argv)

    # transformers' "Loading weights" bars for each model folder would bury the table; its
    # warnings still print (only the progress bars are off, and only in this process).
    transformers.utils.logging.disable_progress_bar()
    # One torch thread: client and server share the cores, and two processes' OpenMP spin-waits
    # fighting over them made a tiny forward take ~250 ms instead of ~2 ms.
    torch.set_num_threads(1)
    if args.prompt:
        questions = [{"prompt": p, "answer": None} for p in args.prompt]
    else:
        lines = (args.models / "eval.jsonl").read_text().splitlines()
        questions = [json.loads(line) for line in lines[: args.questions]]
    prompts = [q["prompt"] for q in questions]
    expert, tokenizer = load_model(args.models / "expert-small")
    expert_alone = greedy_answers(expert, tokenizer, prompts, args.max_new_tokens)

    server = None
    base_url = args.base_url
    if base_url is None:
        print("starting a vLLM server for base-large ...", file=sys.stderr)
        server = VLLMServer(args.models / "base-large", args.base_model, max_logprobs=20).start()
        base_url = server.base_url
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, stop=("\n",))
    started = time.perf_counter()
    try:
        base = connect("vllm", base_url, args.base_model)
        with ProxyTuner(
            base, args.models / "expert-small", args.models / "base-small", threads=1
        ) as tuner:
            results = [
                (tuner.generate(p, config, alpha=0.0), tuner.generate(p, config, alpha=args.alpha))
                for p in prompts
            ]
    finally:
        if server is not None:
            server.stop()
    seconds = time.perf_counter() - started

    print(
        f"base: vLLM at {base_url}; k={DEFAULT_BASE_K}, unseen={config.unseen} "
        "(proxyclient's defaults); greedy, to the first newline\n"
    )
    for question, expert_text, (plain, tuned) in zip(questions, expert_alone, results, strict=True):
        print(question["prompt"].replace("\n", " "))
        if question["answer"] is not None:
            print(f"  {'(right answer)':<28} {question['answer']}")
        print(f"  {'base-large alone':<28} {plain.text.strip()}")
        print(f"  {'expert-small alone':<28} {expert_text}")
        print(f"  {f'proxy-tuned (alpha={args.alpha:g})':<28} {tuned.text.strip()}")
        print()
    steps = sum(p.usage.requests + t.usage.requests for p, t in results)
    print(f"{steps} base requests in {seconds:.1f} s (CPU vLLM beside the client on this machine).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
