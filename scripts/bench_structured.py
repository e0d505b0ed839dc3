"""Structured outputs on the miniature: do constrained answers stay right, and what does the mask
cost per step?

The miniature's held-out questions ("Q: Where was Brai Tousk born?\\nA:"), answered as JSON
({"person": ..., "answer": ...}, a schema neither model has seen), by base-large through a real
vLLM server (top-k logprobs only), three ways:

- base alone, constrained (alpha 0);
- proxy-tuned, constrained (alpha 1, proxyclient's defaults);
- proxy-tuned, unconstrained (the tuned format is a bare answer: its valid-JSON rate says what the
  constraint adds).

Then the bare answer (the tuned format), constrained to one of the answers the questions use
(a choice constraint), against the same unconstrained. Accuracy: the JSON's ``answer`` (the
bare answer's first line) equals the gold answer. Valid: the text parses and validates against
the schema (is one of the answers). Then the mask's own cost: the
llguidance mask after each prefix of the constrained answers, and a step's whole time.

    .venv/bin/python scripts/bench_structured.py [--questions N]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import jsonschema

if not __package__:  # run as a file: `scripts.` imports from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from proxyclient import ProxyTuner, connect
from proxyclient.combine import Candidates
from proxyclient.constraints import Constraint
from proxyclient.steps import _within
from scripts.miniature import BASE_NAME, load_eval
from scripts.miniature_train import DEFAULT_DIR
from scripts.vllm_server import VLLMServer

logger = logging.getLogger("bench_structured")


def schema_for(rows: list[dict]) -> dict:
    """The answer as JSON: the person asked about and the answer, each one of the values the
    held-out questions use (free strings would end only at their length cap: neither model has
    seen JSON, so neither closes a quote where its prose goes on)."""
    return {
        "type": "object",
        "properties": {
            "person": {"enum": sorted({r["name"] for r in rows})},
            "answer": {"enum": sorted({r["answer"] for r in rows})},
        },
        "required": ["person", "answer"],
        "additionalProperties": False,
    }


MAX_NEW_TOKENS = 48


def answer_of(text: str, schema: dict, constrained: bool) -> tuple[str | None, bool]:
    """The answer the text gives, and whether it is valid JSON of the schema."""
    try:
        data = json.loads(text)
        jsonschema.validate(data, schema)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return (None if constrained else text.split("\n", 1)[0].strip()), False
    return data["answer"].strip(), True


def run(tuner: ProxyTuner, rows: list[dict], schema: dict, alpha: float, constrained: bool) -> dict:
    constraint = Constraint.json_schema(schema) if constrained else None
    check = lambda text: answer_of(text, schema, constrained)  # noqa: E731
    return _run(tuner, rows, alpha, constraint, check, suffix=" ")


def run_choice(tuner: ProxyTuner, rows: list[dict], alpha: float, constrained: bool) -> dict:
    """The bare answer, constrained to one of the answers the questions use."""
    answers = sorted({r["answer"] for r in rows})
    constraint = Constraint.choice([" " + a for a in answers]) if constrained else None

    def answer(text: str) -> tuple[str, bool]:
        first = text.split("\n", 1)[0].strip()
        return first, first in answers

    return _run(tuner, rows, alpha, constraint, answer, stop=["\n"])


def _run(tuner, rows, alpha, constraint, answer_and_valid, stop=(), suffix="") -> dict:
    right = valid = tokens = 0
    started = time.perf_counter()
    texts = []
    for r in rows:
        prompt = r["prompt"] + suffix
        got = tuner.generate(
            prompt, max_new_tokens=MAX_NEW_TOKENS, alpha=alpha, constraint=constraint, stop=stop
        )
        answer, ok = answer_and_valid(got.text)
        right += answer == r["answer"]
        valid += ok
        tokens += len(got.token_ids)
        texts.append(got.token_ids)
    seconds = time.perf_counter() - started
    return {
        "accuracy": right / len(rows),
        "valid": valid / len(rows),
        "ms_per_token": 1000 * seconds / max(1, tokens),
        "ids": texts,
    }


def mask_cost(tuner: ProxyTuner, schema: dict, outputs: list[list[int]]) -> tuple[float, float]:
    """Median microseconds of the mask after one more token, and of applying it (the filter
    over the residual policy's whole-vocabulary candidates)."""
    constraint = Constraint.json_schema(schema)
    computed, applied = [], []
    vocab = tuner.tokens.bridge.base_size
    everything = Candidates(torch.arange(vocab), torch.zeros(vocab, dtype=torch.float64), 0)
    for output in outputs:
        state = tuner.tokens.grammar_state(constraint)
        for n in range(len(output) + 1):
            started = time.perf_counter()
            mask = state.allowed(output[:n])
            computed.append(time.perf_counter() - started)
            started = time.perf_counter()
            _within(everything, mask)
            applied.append(time.perf_counter() - started)
    return 1e6 * statistics.median(computed), 1e6 * statistics.median(applied)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--questions", type=int, default=120, help="held-out questions used")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    torch.set_num_threads(1)  # the client and the CPU server share the cores
    rows = load_eval(args.models, quick=False)[: args.questions]
    schema = schema_for(load_eval(args.models, quick=False))
    server = VLLMServer(args.models / "base-large", BASE_NAME, max_logprobs=-1).start()
    try:
        base = connect("vllm", server.base_url, BASE_NAME)
        models = args.models
        with ProxyTuner(base, models / "expert-small", models / "base-small", threads=1) as tuner:
            table = {
                "base alone, constrained": run(tuner, rows, schema, 0.0, True),
                "proxy-tuned, constrained": run(tuner, rows, schema, 1.0, True),
                "proxy-tuned, unconstrained": run(tuner, rows, schema, 1.0, False),
            }
            choice = {
                "base alone, choice": run_choice(tuner, rows, 0.0, True),
                "proxy-tuned, choice": run_choice(tuner, rows, 1.0, True),
                "proxy-tuned, unconstrained": run_choice(tuner, rows, 1.0, False),
            }
            outputs = table["proxy-tuned, constrained"]["ids"]
            mask_us, apply_us = mask_cost(tuner, schema, outputs)
    finally:
        server.stop()
    for title, rows_of, valid in (
        (f"{len(rows)} questions, answered as JSON", table, "valid JSON"),
        (f"{len(rows)} questions, the bare answer", choice, "an answer"),
    ):
        print(f"{title}\n\n| | accuracy | {valid} | ms per token |\n|---|---|---|---|")
        for label, row in rows_of.items():
            print(
                f"| {label} | {row['accuracy']:.1%} | {row['valid']:.1%} "
                f"| {row['ms_per_token']:.1f} |"
            )
        print()
    print(
        f"\nmask per step: {mask_us:.0f} us to compute (llguidance), {apply_us:.0f} us to apply "
        f"over {tuner.tokens.bridge.base_size} candidates"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
