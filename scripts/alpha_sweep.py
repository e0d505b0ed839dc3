"""Accuracy and the share of changed tokens against alpha, on the miniature (scripts/miniature.py).

base-large served by a real vLLM CPU server, steered through its completion API by expert-small
(tuned) and base-small (anti-expert) with proxyclient's defaults (k = 20, ``residual``), greedy,
8 tokens, stop at a newline, for alpha from 0 to 2. Per alpha:

- exact match on the held-out questions (as ``miniature.py evaluate``), beside tuned-large's
  (the directly tuned upper reference, computed locally) and base-large alone's;
- changed tokens: the share of output positions where the proxy-tuned choice differs from the
  base's own greedy choice after the same prefix (one ``prompt_logprobs`` request per answer, as
  scripts/bench_speed.py measures it).

    .venv/bin/python scripts/alpha_sweep.py                 # 240 questions x 17 alphas: ~6 min
    .venv/bin/python scripts/alpha_sweep.py --questions 36 --alphas 0 0.5 1 2
    .venv/bin/python scripts/alpha_sweep.py --json-out /tmp/sweep.json --plot /tmp/sweep.png
    .venv/bin/python scripts/alpha_sweep.py --from-json /tmp/sweep.json   # only the plot

The plot (``scripts/alpha_sweep.png`` by default) needs matplotlib: ``pip install -e ".[bench]"``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import torch

if not __package__:  # run as a file: `scripts.` imports from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxyclient import GenerationConfig, ProxyTuner, connect
from scripts.bench_speed import base_disagrees
from scripts.miniature import BASE_NAME, DEFAULT_CONFIG, MAX_NEW_TOKENS, load_eval
from scripts.miniature_train import DEFAULT_DIR, exact_match, greedy_answers, load_model, quiet
from scripts.vllm_server import VLLMServer

HERE = Path(__file__).resolve().parent
DEFAULT_ALPHAS = tuple(i / 8 for i in range(17))  # 0, 0.125, ..., 2
DEFAULT_PLOT = HERE / "alpha_sweep.png"


def answer_of(text: str) -> str:
    return text.split("\n", 1)[0].strip()


def local_accuracy(path: Path, rows: list[dict[str, str]]) -> float:
    model, tokenizer = load_model(path)
    with quiet():
        answers = greedy_answers(model, tokenizer, [r["prompt"] for r in rows], MAX_NEW_TOKENS)
    return exact_match([answer_of(a) for a in answers], [r["answer"] for r in rows])


def sweep(models: Path, alphas: list[float], questions: int) -> dict[str, Any]:
    """Every alpha's accuracy and changed share, with the local references."""
    torch.set_num_threads(1)  # client and server share the cores (see miniature.py)
    rows = load_eval(models, quick=False)
    if questions:
        rows = rows[:questions]
    prompts, gold = [r["prompt"] for r in rows], [r["answer"] for r in rows]
    k, unseen, _ = DEFAULT_CONFIG
    result: dict[str, Any] = {
        "questions": len(rows),
        "k": k,
        "unseen": unseen,
        "tuned_large": local_accuracy(models / "tuned-large", rows),
        "base_large": local_accuracy(models / "base-large", rows),
        "alphas": [],
    }
    server = VLLMServer(models / "base-large", BASE_NAME, max_logprobs=-1).start()
    try:
        base = connect("vllm", server.base_url, BASE_NAME)
        with (
            ProxyTuner(base, models / "expert-small", models / "base-small", threads=1) as tuner,
            httpx.Client(base_url=server.root_url, timeout=60) as client,
        ):
            for alpha in alphas:
                started = time.perf_counter()
                config = GenerationConfig(
                    max_new_tokens=MAX_NEW_TOKENS,
                    alpha=alpha,
                    base_k=k,
                    unseen=unseen,
                    temperature=0,
                    stop=["\n"],
                )
                outputs = tuner.generate_many(prompts, config)
                differs: list[bool] = []
                for prompt, output in zip(prompts, outputs, strict=True):
                    if output.token_ids:
                        ids = list(tuner.tokens.encode(prompt, config)[1].base)
                        differs += base_disagrees(client, BASE_NAME, ids, output.token_ids)
                point = {
                    "alpha": alpha,
                    "accuracy": exact_match([answer_of(o.text) for o in outputs], gold),
                    "changed": sum(differs) / max(1, len(differs)),
                    "tokens": len(differs),
                    "seconds": time.perf_counter() - started,
                }
                result["alphas"].append(point)
                print(
                    f"alpha {alpha:5.3f}: exact match {100 * point['accuracy']:5.1f}%, changed "
                    f"{100 * point['changed']:5.1f}% of {point['tokens']} tokens "
                    f"({point['seconds']:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        server.stop()
    return result


def table(result: dict[str, Any]) -> str:
    lines = [
        f"{result['questions']} held-out questions, k = {result['k']}, {result['unseen']}, "
        f"greedy; tuned-large {100 * result['tuned_large']:.1f}%, base-large alone "
        f"{100 * result['base_large']:.1f}%",
        "",
        "| alpha | exact match | changed tokens |",
        "|---|---|---|",
    ]
    for p in result["alphas"]:
        lines.append(f"| {p['alpha']:g} | {100 * p['accuracy']:.1f}% | {100 * p['changed']:.1f}% |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = [p["alpha"] for p in result["alphas"]]
    figure, axis = plt.subplots(figsize=(7, 4.2), dpi=120)
    axis.plot(alphas, [100 * p["accuracy"] for p in result["alphas"]], "o-", label="exact match")
    axis.plot(
        alphas,
        [100 * p["changed"] for p in result["alphas"]],
        "s-",
        label="changed tokens (not the base's own top-1)",
    )
    axis.axhline(100 * result["tuned_large"], color="gray", ls="--", lw=1, label="tuned-large")
    axis.axvline(1.0, color="gray", ls=":", lw=1)
    axis.annotate("default alpha", (1.0, 2), xytext=(4, 0), textcoords="offset points", fontsize=8)
    axis.set_xlabel("alpha (scores = base + alpha * (expert - anti-expert))")
    axis.set_ylabel("% of questions / % of output tokens")
    axis.set_ylim(0, 100)
    axis.set_xlim(min(alphas) - 0.05, max(alphas) + 0.05)
    axis.set_title(
        f"Miniature: proxy-tuned base-large, k = {result['k']}, {result['unseen']}, "
        f"{result['questions']} questions",
        fontsize=10,
    )
    axis.grid(alpha=0.3)
    axis.legend(loc="center right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--alphas", type=float, nargs="+", default=list(DEFAULT_ALPHAS))
    parser.add_argument("--questions", type=int, default=0, help="the first N (0: all)")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT)
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--from-json", type=Path, default=None, help="plot a saved run")
    args = parser.parse_args(argv)
    if args.from_json is not None:
        result = json.loads(args.from_json.read_text())
    else:
        result = sweep(args.models, args.alphas, args.questions)
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(result, indent=1))
    print(table(result))
    if not args.no_plot:
        plot(result, args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
