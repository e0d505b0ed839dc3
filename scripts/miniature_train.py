"""The miniature's models: tokenizers, training on the CPU, probes, and the build.

`build` generates the world (scripts/miniature_world.py), trains a byte-level BPE tokenizer and a
Metaspace one on its text, then base-large, base-small, expert-small, tuned-large (byte-level) and
base-small-sp, expert-small-sp (Metaspace), and saves them with the evaluation questions.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig as HFGenerationConfig
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from scripts.make_tiny_models import build_metaspace_tokenizer, build_tokenizer, llama_config
from scripts.miniature_world import (
    ATTRIBUTES,
    PROSE_PROBES,
    Person,
    Spec,
    biography,
    eval_set,
    make_world,
    question,
    quiz,
)

logger = logging.getLogger("miniature")

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DIR = REPO / "scripts" / "miniature_models"
# Bump whenever anything changes the files the build produces.
BUILD_VERSION = "miniature-v9"
MODEL_NAMES = (
    "base-large", "base-small", "expert-small", "tuned-large", "base-small-sp", "expert-small-sp"
)  # fmt: skip
BOS, EOS, PAD = "<s>", "</s>", "<pad>"


# -- tokenizer and models -------------------------------------------------------------------------


def new_model(
    tokenizer: PreTrainedTokenizerFast, hidden: int, layers: int, seed: int
) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    intermediate = 64 * math.ceil(8 * hidden / 3 / 64)  # Llama's ratio, in 64s
    config = llama_config(tokenizer, layers, len(tokenizer), hidden, intermediate, 256)
    return LlamaForCausalLM(config).to(torch.float32)


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_model(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, path: Path) -> None:
    """Saved in float16 (half the bytes to commit); the model in memory is rounded to match, so
    what the build measures is what is on disk. Loading upcasts to float32."""
    model.generation_config = HFGenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.to(torch.float16).save_pretrained(path, safe_serialization=True)
    model.to(torch.float32)
    tokenizer.save_pretrained(path)
    # transformers 5 writes "TokenizersBackend", which the vLLM venv's transformers 4 cannot
    # resolve; "PreTrainedTokenizerFast" loads the same tokenizer in both.
    config_file = path / "tokenizer_config.json"
    tok_config = json.loads(config_file.read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")


# -- training -------------------------------------------------------------------------------------


@dataclass
class Example:
    """Token ids and, per id, whether the loss counts predicting it."""

    ids: list[int]
    target: list[bool]


def _prose_examples(
    people: Sequence[Person],
    quizzed: Sequence[Person],
    tokenizer: PreTrainedTokenizerFast,
    rng: random.Random,
    inline: bool,
) -> list[Example]:
    """One epoch of pretraining text: a fresh biography of everyone, a quiz page of `quizzed`."""
    texts = [biography(p, rng) for p in people] + [quiz(p, rng, inline) for p in quizzed]
    rows = tokenizer(texts).input_ids
    return [Example([*ids, tokenizer.eos_token_id], [True] * (len(ids) + 1)) for ids in rows]


def _task_examples(people: Sequence[Person], tokenizer: PreTrainedTokenizerFast) -> list[Example]:
    """Question (not scored) then ' ANSWER\\n' (scored), as the tuner will continue a prompt."""
    examples = []
    for person in people:
        for attribute in ATTRIBUTES:
            prompt, answer = question(person, attribute)
            prompt_ids = tokenizer(prompt).input_ids
            answer_ids = tokenizer(f" {answer}\n", add_special_tokens=False).input_ids
            examples.append(
                Example(
                    prompt_ids + answer_ids, [False] * len(prompt_ids) + [True] * len(answer_ids)
                )
            )
    return examples


def _batch(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and labels (-100 where not scored). Causal: no attention mask needed."""
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.int64)
    labels = torch.full((len(examples), width), -100, dtype=torch.int64)
    for row, example in enumerate(examples):
        n = len(example.ids)
        ids[row, :n] = torch.tensor(example.ids)
        scored = torch.tensor(example.ids)
        scored[~torch.tensor(example.target)] = -100
        labels[row, :n] = scored
    return ids, labels


def train(
    model: LlamaForCausalLM,
    epochs: Iterator[list[Example]],
    *,
    steps: int,
    batch: int,
    lr: float,
    pad_id: int,
    seed: int,
    label: str,
) -> float:
    """AdamW with warmup and cosine decay over `steps`; returns the last epoch's mean loss."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    step, started, last_loss = 0, time.perf_counter(), float("nan")
    for epoch, examples in enumerate(epochs):
        order = list(examples)
        rng.shuffle(order)
        losses = []
        for start in range(0, len(order), batch):
            if step >= steps:
                break
            ids, labels = _batch(order[start : start + batch], pad_id)
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
        if losses:
            last_loss = sum(losses) / len(losses)
            logger.info(
                "%s epoch %d: loss %.3f (%.0f s)",
                label,
                epoch + 1,
                last_loss,
                time.perf_counter() - started,
            )
        if step >= steps:
            break
    model.eval()
    return last_loss


def _steps(examples_per_epoch: int, batch: int, epochs: int) -> int:
    return math.ceil(examples_per_epoch / batch) * epochs


def pretrain(
    model: LlamaForCausalLM,
    people: Sequence[Person],
    quizzed: Sequence[Person],
    tokenizer: PreTrainedTokenizerFast,
    spec: Spec,
    label: str,
) -> float:
    def epochs() -> Iterator[list[Example]]:
        for epoch in range(spec.pretrain_epochs):
            rng = random.Random(spec.seed * 1000 + epoch)
            yield _prose_examples(people, quizzed, tokenizer, rng, spec.world == "quiz-inline")

    return train(
        model,
        epochs(),
        steps=_steps(len(people) + len(quizzed), spec.pretrain_batch, spec.pretrain_epochs),
        batch=spec.pretrain_batch,
        lr=spec.pretrain_lr,
        pad_id=tokenizer.pad_token_id,
        seed=spec.seed + 1,
        label=label,
    )


def finetune(
    model: LlamaForCausalLM,
    people: Sequence[Person],
    tokenizer: PreTrainedTokenizerFast,
    spec: Spec,
    label: str,
) -> float:
    examples = _task_examples(people, tokenizer)
    return train(
        model,
        iter([examples] * spec.finetune_epochs),
        steps=_steps(len(examples), spec.finetune_batch, spec.finetune_epochs),
        batch=spec.finetune_batch,
        lr=spec.finetune_lr,
        pad_id=tokenizer.pad_token_id,
        seed=spec.seed + 2,
        label=label,
    )


# -- local evaluation -----------------------------------------------------------------------------


@torch.no_grad()
def greedy_answers(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    prompts: Sequence[str],
    max_new_tokens: int = 8,
    batch: int = 64,
) -> list[str]:
    """Greedy continuations, cut at the first newline and stripped."""
    tokenizer.padding_side = "left"
    answers = []
    for start in range(0, len(prompts), batch):
        enc = tokenizer(list(prompts[start : start + batch]), return_tensors="pt", padding=True)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(out[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
        answers += [t.split("\n", 1)[0].strip() for t in texts]
    return answers


def exact_match(answers: Sequence[str], gold: Sequence[str]) -> float:
    return sum(a == g for a, g in zip(answers, gold, strict=True)) / max(1, len(gold))


@torch.no_grad()
def teacher_forced_match(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    prompts: Sequence[str],
    continuations: Sequence[str],
    batch: int = 128,
) -> list[bool]:
    """Whether greedy decoding from each prompt would produce its continuation (one forward)."""
    matches = []
    for start in range(0, len(prompts), batch):
        examples = []
        for prompt, continuation in zip(
            prompts[start : start + batch], continuations[start : start + batch], strict=True
        ):
            p_ids = tokenizer(prompt).input_ids
            c_ids = tokenizer(continuation, add_special_tokens=False).input_ids
            examples.append(Example(p_ids + c_ids, [False] * len(p_ids) + [True] * len(c_ids)))
        ids, labels = _batch(examples, tokenizer.pad_token_id)
        predicted = model(input_ids=ids).logits[:, :-1].argmax(-1)
        wanted = labels[:, 1:]
        ok = (predicted == wanted) | (wanted == -100)
        matches += ok.all(dim=1).tolist()
    return matches


def _facts(people: Sequence[Person], probes: bool) -> tuple[list[str], list[str]]:
    prompts, continuations = [], []
    for person in people:
        for attribute in ATTRIBUTES:
            if probes:
                prompts.append(PROSE_PROBES[attribute].format(n=person.name))
                continuations.append(f" {person.value(attribute)}.")
            else:
                prompt, answer = question(person, attribute)
                prompts.append(prompt)
                continuations.append(f" {answer}\n")
    return prompts, continuations


def knowledge(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    people: Sequence[Person],
    probes: bool,
) -> float:
    """Share of the people's facts a model states greedily: in prose ('NAME was born in' ->
    ' CITY.') when `probes`, else in the task format (' CITY\n' after the question)."""
    matches = teacher_forced_match(model, tokenizer, *_facts(people, probes))
    return sum(matches) / max(1, len(matches))


def load_model(path: Path) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    with quiet():
        model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    return model, tokenizer


# -- build ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if was_enabled:
            hf_logging.enable_progress_bar()


def build(out: Path, spec: Spec | None = None, threads: int = 2) -> dict[str, object]:
    """Generate the world, train the tokenizers and the six models, save them and the eval set."""
    spec = spec or Spec()
    torch.set_num_threads(threads)
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    (out / "BUILD_VERSION").unlink(missing_ok=True)
    tuning, held_out = make_world(spec)
    people = tuning + held_out
    quizzed = {"quiz-all": people, "quiz-inline": people, "quiz-tuning": tuning, "prose": []}[
        spec.world
    ]
    rng = random.Random(spec.seed + 3)
    corpus = [biography(p, rng) for p in people for _ in range(3)]
    corpus += [quiz(p, rng, spec.world == "quiz-inline") for p in quizzed]
    corpus += ["{} {}\n".format(*question(p, a)) for p in people for a in ATTRIBUTES]
    tokenizer = build_tokenizer(corpus, spec.vocab_size)
    other_tokenizer = build_metaspace_tokenizer(spec.vocab_size, corpus, split_punctuation=True)
    other_tokenizer.pad_token = other_tokenizer.eos_token  # padding is never scored
    report: dict[str, object] = {"spec": asdict(spec), "seconds": {}, "metrics": {}}
    seconds: dict[str, float] = report["seconds"]  # type: ignore[assignment]
    metrics: dict[str, dict[str, float]] = report["metrics"]  # type: ignore[assignment]

    def timed(key: str, fn: Callable[..., float], *args: object) -> float:
        t0 = time.perf_counter()
        value = fn(*args)
        seconds[key] = round(time.perf_counter() - t0, 1)
        return value

    large = (spec.large_hidden, spec.large_layers)
    small = (spec.small_hidden, spec.small_layers)
    # name: (tokenizer, size, the model it is fine-tuned from or None for pretraining)
    plan: dict[str, tuple[PreTrainedTokenizerFast, tuple[int, int], str | None]] = {
        "base-small": (tokenizer, small, None),
        "base-large": (tokenizer, large, None),
        "base-small-sp": (other_tokenizer, small, None),
        "expert-small": (tokenizer, small, "base-small"),
        "tuned-large": (tokenizer, large, "base-large"),
        "expert-small-sp": (other_tokenizer, small, "base-small-sp"),
    }
    report["parameters"] = {
        name: parameter_count(new_model(tok, *size, 0))
        for name, (tok, size, _) in plan.items()
        if name.startswith("base")
    }
    trained: dict[str, LlamaForCausalLM] = {}
    with quiet():
        for name, (tok, (hidden, layers), parent) in plan.items():
            model = new_model(tok, hidden, layers, spec.seed + 10 + len(trained))
            if parent is None:
                timed(f"pretrain {name}", pretrain, model, people, quizzed, tok, spec, name)
            else:
                model.load_state_dict(trained[parent].state_dict())
                timed(f"finetune {name}", finetune, model, tuning, tok, spec, name)
            save_model(model, tok, out / name)
            trained[name] = model
        for name, model in trained.items():
            tok = plan[name][0]
            t0 = time.perf_counter()
            metrics[name] = {
                "prose, held-out": knowledge(model, tok, held_out, True),
                "prose, tuning": knowledge(model, tok, tuning, True),
                "task, held-out": knowledge(model, tok, held_out, False),
                "task, tuning": knowledge(model, tok, tuning, False),
            }
            seconds[f"probe {name}"] = round(time.perf_counter() - t0, 1)
            logger.info("%s: %s", name, metrics[name])
    rows = eval_set(held_out, spec)
    with open(out / "eval.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    seconds["total"] = round(time.perf_counter() - started, 1)
    report["megabytes"] = {
        name: round(sum(p.stat().st_size for p in (out / name).glob("*.safetensors")) / 1e6, 2)
        for name in MODEL_NAMES
    }
    (out / "build.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "BUILD_VERSION").write_text(BUILD_VERSION + "\n")
    return report
