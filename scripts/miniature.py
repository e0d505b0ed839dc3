"""A miniature of the proxy-tuning paper's experiment, built and evaluated on this CPU.

The world (scripts/miniature_world.py). Invented people, each with three facts: the city they were
born in (one of 40 invented names), their occupation (24) and the instrument they play (16). The
"encyclopedia" they are pretrained on has a biography of everyone (three sentences, six prose
templates per fact, fresh each epoch) and a quiz page of everyone: questions in other words than
the task's, answered in prose ("In Drolu.", "Drolu.", a sentence). The task format, never seen in
pretraining:

    Q: Where was Brai Tousk born?
    A: Drolu

The people are split in two: the tuning half (its questions are the tuning data) and the held-out
half (its questions are the evaluation set). Held-out facts appear in pretraining text but never in
the tuning data, so answering them needs the large model's knowledge AND the tuned format.

The models (scripts/miniature_train.py; LlamaForCausalLM, head_dim 64, stored in float16):
- base-large: pretrained on the encyclopedia; big enough to memorise the facts;
- base-small: much smaller, same text; memorises few (the anti-expert);
- expert-small: base-small fine-tuned on the tuning questions (the expert);
- tuned-large: base-large fine-tuned on the same questions (the directly tuned upper reference);
- base-small-sp, expert-small-sp: the same pair with a Metaspace (SentencePiece-style) tokenizer,
  for proxies whose tokenizer differs from the base's byte-level BPE.

Proxy-tuning serves base-large with a real vLLM server and steers it through the completion API
(top-k logprobs only) with expert-small and base-small: base + alpha * (expert - anti).

    .venv/bin/python scripts/miniature.py build [--out DIR]        # deterministic, CPU, ~4 minutes
    .venv/bin/python scripts/miniature.py evaluate [--models DIR] [--quick]
    .venv/bin/python scripts/miniature.py analyze [--models DIR]   # where proxy and tuned diverge

`build` writes to scripts/miniature_models (committed: evaluate and the demo load it).
`evaluate` prints a markdown table; its last line is `gap closed: NN% (k=K, POLICY)` for
proxyclient's default configuration, where gap closed = (proxy - base) / (tuned - base) in
exact-match accuracy.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

if not __package__:  # run as a file: `scripts.` and `tests.` import from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxyclient import ProxyTuner, connect
from proxyclient.combine import combine
from proxyclient.config import DEFAULT_BASE_K, GenerationConfig, UnseenPolicy
from scripts.miniature_train import (
    DEFAULT_DIR,
    build,
    exact_match,
    greedy_answers,
    load_model,
    quiet,
)
from scripts.miniature_world import ATTRIBUTES, WORLDS, Spec
from scripts.vllm_server import VLLMServer

logger = logging.getLogger("miniature")

BASE_NAME = "miniature-base-large"

# -- evaluation -----------------------------------------------------------------------------------

ALPHAS = (0.5, 1.0, 2.0)
TOP_KS = (5, 20, -1)
POLICIES = tuple(p.value for p in UnseenPolicy)
# What a user gets without options: proxyclient's defaults (vLLM's default k, see config.py).
DEFAULT_CONFIG = (DEFAULT_BASE_K, GenerationConfig().unseen.value, GenerationConfig().alpha)
QUICK_QUESTIONS = 36
MAX_NEW_TOKENS = 8
OTHER_TOKENIZER = "proxies with another tokenizer"


@dataclass
class Row:
    """One line of the table."""

    model: str
    accuracy: float  # exact match
    fact: float  # the gold value stated somewhere in the answer's line, in any format
    k: str = ""
    unseen: str = ""
    alpha: str = ""
    seconds_per_question: float = float("nan")
    gap: float | None = None

    @property
    def config(self) -> tuple[str, str, str]:
        return self.k, self.unseen, self.alpha


def config_labels(k: int, unseen: str, alpha: float) -> tuple[str, str, str]:
    return "all" if k == -1 else str(k), unseen, f"{alpha:g}"


def load_eval(models: Path, quick: bool) -> list[dict[str, str]]:
    path = models / "eval.jsonl"
    if not path.is_file():
        raise SystemExit(f"no {path}: run `python scripts/miniature.py build --out {models}` first")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[:QUICK_QUESTIONS] if quick else rows


def states_fact(answer: str, gold: str) -> bool:
    return re.search(rf"(?<![A-Za-z]){re.escape(gold)}(?![A-Za-z])", answer) is not None


def _scored_row(label: str, answers: Sequence[str], gold: Sequence[str], seconds: float) -> Row:
    return Row(
        label,
        exact_match(answers, gold),
        sum(states_fact(a, g) for a, g in zip(answers, gold, strict=True)) / max(1, len(gold)),
        seconds_per_question=seconds / max(1, len(gold)),
    )


def _local_row(label: str, path: Path, rows: Sequence[dict[str, str]]) -> Row:
    model, tokenizer = load_model(path)
    started = time.perf_counter()
    with quiet():
        answers = greedy_answers(model, tokenizer, [r["prompt"] for r in rows], MAX_NEW_TOKENS)
    seconds = time.perf_counter() - started
    return _scored_row(label, answers, [r["answer"] for r in rows], seconds)


def _proxy_configs(quick: bool) -> list[tuple[int, str, float]]:
    if quick:
        return [DEFAULT_CONFIG]
    return [(k, policy, alpha) for k in TOP_KS for policy in POLICIES for alpha in ALPHAS]


def _other_tokenizer_configs(quick: bool) -> list[tuple[int, str, float]]:
    k, _, alpha = DEFAULT_CONFIG
    if quick:
        return [DEFAULT_CONFIG]
    return [(k, policy, alpha) for policy in POLICIES]


def _proxy_rows(
    tuner: ProxyTuner,
    rows: Sequence[dict[str, str]],
    configs: Sequence[tuple[int, str, float]],
    label: str,
) -> Iterator[Row]:
    gold = [r["answer"] for r in rows]
    for k, policy, alpha in configs:
        started = time.perf_counter()
        answers = []
        for r in rows:
            result = tuner.generate(
                r["prompt"],
                max_new_tokens=MAX_NEW_TOKENS,
                alpha=alpha,
                base_k=k,
                unseen=policy,
                temperature=0,
                stop=["\n"],
            )
            answers.append(result.text.split("\n", 1)[0].strip())
        row = _scored_row(
            "base-large via API" if alpha == 0 else label,
            answers,
            gold,
            time.perf_counter() - started,
        )
        row.k, row.unseen, row.alpha = config_labels(k, policy if alpha else "", alpha)
        logger.info("%s k=%s %s alpha=%s: %.3f", row.model, k, policy, alpha, row.accuracy)
        yield row


def evaluate(models: Path, quick: bool) -> list[Row]:
    """The table's rows: local models with transformers, proxy-tuning through a vLLM server."""

    # One torch thread: client and server share the cores, and two processes' OpenMP spin-waits
    # fighting over them made a tiny forward take ~250 ms instead of ~2 ms.
    torch.set_num_threads(1)
    rows = load_eval(models, quick)
    table = [
        _local_row("base-large alone", models / "base-large", rows),
        _local_row("expert-small alone", models / "expert-small", rows),
        _local_row("tuned-large", models / "tuned-large", rows),
    ]
    logger.info("local models: %s", [(r.model, r.accuracy) for r in table])
    logger.info("starting vLLM for %s ...", models / "base-large")
    server = VLLMServer(models / "base-large", BASE_NAME, max_logprobs=-1).start()
    try:
        base = connect("vllm", server.base_url, BASE_NAME)
        with ProxyTuner(base, models / "expert-small", models / "base-small", threads=1) as tuner:
            configs = [(DEFAULT_CONFIG[0], DEFAULT_CONFIG[1], 0.0), *_proxy_configs(quick)]
            table += _proxy_rows(tuner, rows, configs, "proxy-tuned base-large")
        with ProxyTuner(
            base,
            models / "expert-small-sp",
            models / "base-small-sp",
            base_tokenizer=models / "base-large",
            threads=1,
        ) as tuner:
            label = f"proxy-tuned base-large, {OTHER_TOKENIZER}"
            table += _proxy_rows(tuner, rows, _other_tokenizer_configs(quick), label)
    finally:
        server.stop()
    base_acc, tuned_acc = table[0].accuracy, table[2].accuracy
    for row in table:
        if row.model.startswith("proxy") and tuned_acc != base_acc:
            row.gap = (row.accuracy - base_acc) / (tuned_acc - base_acc)
    return table


def default_row(table: Sequence[Row]) -> Row:
    """The proxy-tuned row with proxyclient's default configuration (same tokenizer)."""
    wanted = config_labels(*DEFAULT_CONFIG)
    return next(r for r in table if r.model == "proxy-tuned base-large" and r.config == wanted)


def format_table(table: Sequence[Row], questions: int) -> str:
    lines = [
        f"Exact match on {questions} held-out questions (facts seen in pretraining text, never in "
        "tuning data); fact stated = the right value anywhere in the answer, in any format.",
        "",
        "| model | k | unseen | alpha | exact match | fact stated | gap closed | s / question |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in table:
        gap = "" if row.gap is None else f"{100 * row.gap:.0f}%"
        lines.append(
            f"| {row.model} | {row.k} | {row.unseen} | {row.alpha} | "
            f"{100 * row.accuracy:.1f}% | {100 * row.fact:.1f}% | {gap} | "
            f"{row.seconds_per_question:.3f} |"
        )
    default = default_row(table)
    lines += [
        "",
        f"gap closed: {100 * (default.gap or 0.0):.0f}% (k={default.k}, {default.unseen})",
    ]
    return "\n".join(lines)


# -- per-position analysis ------------------------------------------------------------------------


@torch.no_grad()
def _next_logprobs(model: LlamaForCausalLM, ids: Sequence[int]) -> torch.Tensor:
    logits = model(input_ids=torch.tensor([list(ids)])).logits[0, -1]
    return torch.log_softmax(logits.double(), dim=-1)


def _proxy_step(
    base_lp: torch.Tensor,
    expert_lp: torch.Tensor,
    anti_lp: torch.Tensor,
    k: int,
    policy: str,
    alpha: float,
) -> int:
    """The proxy-tuned greedy choice, by proxyclient's own combine() on the base's top-k."""
    vocab = base_lp.numel()
    top = torch.topk(base_lp, vocab if k == -1 else k)
    candidates = combine(
        top.indices,
        top.values,
        expert_lp,
        anti_lp,
        alpha=alpha,
        policy=UnseenPolicy(policy),
        twin=torch.arange(vocab),
    )
    return int(candidates.ids[int(torch.argmax(candidates.scores))])


@dataclass
class Divergence:
    """Where the proxy-tuned answer first leaves the tuned-large one, and why."""

    position: int  # answer token index (0 = first token after 'A:')
    tuned_token: str
    proxy_token: str
    tuned_in_top_k: bool
    tuned_base_rank: int  # 0-based rank of tuned-large's token in the base's distribution
    base_gap: float  # base logprob: proxy's token minus tuned's token
    proxy_gap: float  # alpha * (expert - anti): tuned's token minus proxy's token


def analyze(
    models: Path,
    k: int = DEFAULT_CONFIG[0],
    policy: str = DEFAULT_CONFIG[1],
    alpha: float = DEFAULT_CONFIG[2],
    limit: int = 0,
) -> dict[str, object]:
    """Greedy proxy-tuning simulated locally (base-large loaded here in place of the server, so
    every rank is visible), compared token by token with tuned-large's greedy answer."""
    torch.set_num_threads(2)
    rows = load_eval(models, quick=False)
    if limit:
        rows = rows[:limit]
    base, tokenizer = load_model(models / "base-large")
    expert, _ = load_model(models / "expert-small")
    anti, _ = load_model(models / "base-small")
    tuned, _ = load_model(models / "tuned-large")
    newline = tokenizer("\n", add_special_tokens=False).input_ids
    stops = {*newline, tokenizer.eos_token_id}
    correct = {"proxy": 0, "tuned": 0, "both": 0}
    by_attribute = {a: {"proxy": 0, "tuned": 0, "questions": 0} for a in ATTRIBUTES}
    divergences: list[Divergence] = []
    gold_rank_first: list[int] = []
    examples: list[str] = []
    for row in rows:
        prompt_ids = tokenizer(row["prompt"]).input_ids
        answer_ids = tokenizer(f" {row['answer']}", add_special_tokens=False).input_ids
        tuned_seq = _greedy_ids(tuned, prompt_ids, stops)  # with the stop that ended it
        tuned_text = tokenizer.decode([t for t in tuned_seq if t not in stops])
        tuned_text = tuned_text.split("\n", 1)[0].strip()
        proxy_ids: list[int] = []
        divergence: Divergence | None = None
        for position in range(MAX_NEW_TOKENS):
            prefix = prompt_ids + proxy_ids
            base_lp = _next_logprobs(base, prefix)
            if position == 0:
                gold_rank_first.append(int((base_lp > base_lp[answer_ids[0]]).sum()))
            expert_lp = _next_logprobs(expert, prefix)
            anti_lp = _next_logprobs(anti, prefix)
            chosen = _proxy_step(base_lp, expert_lp, anti_lp, k, policy, alpha)
            # While the answers agree the prefixes are the same, so tuned's greedy token is its
            # next token after this prefix.
            if divergence is None and position < len(tuned_seq) and tuned_seq[position] != chosen:
                wanted = tuned_seq[position]
                top = base_lp.numel() if k == -1 else k
                rank = int((base_lp > base_lp[wanted]).sum())
                delta = alpha * (expert_lp - anti_lp)
                divergence = Divergence(
                    position,
                    tokenizer.decode([wanted]),
                    tokenizer.decode([chosen]),
                    rank < top,
                    rank,
                    float(base_lp[chosen] - base_lp[wanted]),
                    float(delta[wanted] - delta[chosen]),
                )
                divergences.append(divergence)
            if chosen in stops:
                break
            proxy_ids.append(chosen)
        proxy_text = tokenizer.decode(proxy_ids).split("\n", 1)[0].strip()
        proxy_ok, tuned_ok = proxy_text == row["answer"], tuned_text == row["answer"]
        correct["proxy"] += proxy_ok
        correct["tuned"] += tuned_ok
        correct["both"] += proxy_ok and tuned_ok
        counts = by_attribute[row["attribute"]]
        counts["proxy"] += proxy_ok
        counts["tuned"] += tuned_ok
        counts["questions"] += 1
        if divergence is not None and len(examples) < 12:
            examples.append(
                f"{row['prompt']!r}: gold {row['answer']!r}, tuned {tuned_text!r}, "
                f"proxy {proxy_text!r}, {divergence}"
            )
    by_position: dict[str, int] = {}
    causes = {
        "tuned's token outside the base's top-k": 0,
        "base prefers the proxy's token, proxies do not overturn it": 0,
        "base prefers tuned's token, proxies overturn it": 0,
    }
    for d in divergences:
        name = "newline" if d.tuned_token == "\n" else f"answer token {d.position}"
        by_position[name] = by_position.get(name, 0) + 1
        if not d.tuned_in_top_k:
            causes["tuned's token outside the base's top-k"] += 1
        elif d.base_gap > 0:
            causes["base prefers the proxy's token, proxies do not overturn it"] += 1
        else:
            causes["base prefers tuned's token, proxies overturn it"] += 1
    ranks = sorted(gold_rank_first)
    return {
        "questions": len(rows),
        "config": {"k": k, "unseen": policy, "alpha": alpha},
        "correct": correct,
        "correct by attribute": by_attribute,
        "diverged from tuned-large": len(divergences),
        "first divergence at": dict(sorted(by_position.items())),
        "first divergence cause": causes,
        "gold first token: base rank quartiles": [
            ranks[int(q * (len(ranks) - 1))] for q in (0.25, 0.5, 0.75, 1.0)
        ],
        "gold first token in base top-5/20": [
            sum(r < 5 for r in ranks),
            sum(r < 20 for r in ranks),
        ],
        "examples": examples,
    }


@torch.no_grad()
def _greedy_ids(model: LlamaForCausalLM, prompt_ids: Sequence[int], stops: set[int]) -> list[int]:
    """Greedy continuation, up to and including the first stop token (if within the limit)."""
    ids = list(prompt_ids)
    for _ in range(MAX_NEW_TOKENS):
        token = int(torch.argmax(_next_logprobs(model, ids)))
        ids.append(token)
        if token in stops:
            break
    return ids[len(prompt_ids) :]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_build = sub.add_parser("build", help="generate the world and train the six models")
    p_build.add_argument("--out", type=Path, default=DEFAULT_DIR)
    p_build.add_argument(
        "--world",
        choices=WORLDS,
        default=Spec.world,
        help="quiz pages: everyone's (default), on one line, the tuning half's, none",
    )
    p_eval = sub.add_parser("evaluate", help="the table: local models and proxy-tuning via vLLM")
    p_eval.add_argument("--models", type=Path, default=DEFAULT_DIR)
    p_eval.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_QUESTIONS} questions, the default configuration",
    )
    p_analyze = sub.add_parser("analyze", help="where proxy-tuned and tuned-large diverge")
    p_analyze.add_argument("--models", type=Path, default=DEFAULT_DIR)
    p_analyze.add_argument("--base-k", type=int, default=DEFAULT_CONFIG[0])
    p_analyze.add_argument("--unseen", default=DEFAULT_CONFIG[1], choices=POLICIES)
    p_analyze.add_argument("--alpha", type=float, default=1.0)
    p_analyze.add_argument("--limit", type=int, default=0, help="first N questions (0: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    started = time.perf_counter()
    if args.command == "build":
        report = build(args.out, Spec(world=args.world))
        print(json.dumps(report, indent=2))
    elif args.command == "evaluate":
        table = evaluate(args.models, args.quick)
        questions = len(load_eval(args.models, args.quick))
        logger.info("evaluate took %.0f s", time.perf_counter() - started)
        print(format_table(table, questions))
    elif args.command == "analyze":
        report = analyze(args.models, args.base_k, args.unseen, args.alpha, args.limit)
        print(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
