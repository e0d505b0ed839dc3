"""The miniature's world: invented people, their facts, the encyclopedia text and the task.

Pure and deterministic in Spec.seed: no torch, no I/O. See scripts/miniature.py for the story.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

ONSETS = (
    "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
    "br", "dr", "gr", "kr", "tr", "st", "th", "sh", "ch", "fl", "pl",
)  # fmt: skip
VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou", "ia")
CODAS = ("", "", "n", "r", "l", "s", "m", "k", "th", "nd", "rt")
OCCUPATIONS = (
    "baker", "sailor", "painter", "carpenter", "doctor", "farmer", "teacher", "weaver",
    "potter", "miner", "lawyer", "poet", "brewer", "tailor", "butcher", "fisher",
    "jeweler", "mason", "nurse", "singer", "smith", "hunter", "cook", "clerk",
)  # fmt: skip
INSTRUMENTS = (
    "flute", "harp", "drum", "violin", "lute", "horn", "cello", "oboe",
    "piano", "trumpet", "guitar", "bagpipe", "organ", "zither", "banjo", "clarinet",
)  # fmt: skip
NUM_CITIES = 40

PROSE_TEMPLATES: dict[str, tuple[str, ...]] = {
    "city": (
        "{n} was born in {v}.",
        "{n} came into the world in {v}.",
        "The birthplace of {n} is {v}.",
        "{n} is a native of {v}.",
        "{n}'s hometown is {v}.",
        "{n} grew up in {v}.",
    ),
    "job": (
        "{n} works as a {v}.",
        "{n} earns a living as a {v}.",
        "By trade, {n} is a {v}.",
        "{n} is employed as a {v}.",
        "{n}'s profession is {v}.",
        "{n} is known as a {v}.",
    ),
    "music": (
        "{n} plays the {v}.",
        "{n} is skilled at the {v}.",
        "The instrument of {n} is the {v}.",
        "{n} practises the {v} every day.",
        "{n}'s favourite instrument is the {v}.",
        "{n} performs on the {v}.",
    ),
}
QUESTIONS = {
    "city": "Where was {n} born?",
    "job": "What does {n} do for a living?",
    "music": "Which instrument does {n} play?",
}
# The encyclopedia's quiz pages (pretraining text): questions asked in other words than the task's
# (each fact has one close paraphrase of its task question), answered in one of three prose styles,
# all on one line.
QUIZ_QUESTIONS = {
    "city": (
        "What is the birthplace of {n}?",
        "Where does {n} come from?",
        "In which city was {n} born?",
    ),
    "job": (
        "What is the job of {n}?",
        "What is {n}'s trade?",
        "How does {n} earn a living?",
        "What does {n} do for work?",
    ),
    "music": (
        "What does {n} play?",
        "What is the instrument of {n}?",
        "Which instrument is {n} skilled at?",
    ),
}
QUIZ_SHORT = {"city": "In {v}.", "job": "A {v}.", "music": "The {v}."}
# Prose prefixes whose greedy continuation shows whether a model knows a fact in prose form.
PROSE_PROBES = {"city": "{n} was born in", "job": "{n} works as a", "music": "{n} plays the"}
ATTRIBUTES = tuple(QUESTIONS)
# Who gets quiz pages in pretraining, and their layout: "quiz-inline" puts each page on one line
# (README, "What it cannot do"); "quiz-tuning" and "prose" quiz the tuning half or nobody.
WORLDS = ("quiz-all", "quiz-inline", "quiz-tuning", "prose")


@dataclass(frozen=True)
class Person:
    name: str
    city: str
    job: str
    music: str

    def value(self, attribute: str) -> str:
        return str(getattr(self, attribute))


@dataclass(frozen=True)
class Spec:
    """Everything that determines the build (sizes, steps, seeds)."""

    people: int = 300
    seed: int = 0
    world: str = "quiz-all"  # see WORLDS
    vocab_size: int = 1024
    large_hidden: int = 192
    large_layers: int = 4
    small_hidden: int = 64
    small_layers: int = 1
    pretrain_epochs: int = 30
    pretrain_batch: int = 64
    pretrain_lr: float = 2e-3
    finetune_epochs: int = 8
    finetune_batch: int = 32
    finetune_lr: float = 1e-4
    eval_questions: int = 240


def _word(rng: random.Random, syllables: int) -> str:
    text = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(syllables))
    return (text + rng.choice(CODAS)).capitalize()


def _distinct_words(rng: random.Random, count: int, syllables: Sequence[int], taken: set[str]):
    words: list[str] = []
    while len(words) < count:
        word = _word(rng, rng.choice(syllables))
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


def make_world(spec: Spec) -> tuple[list[Person], list[Person]]:
    """The people, split into (tuning half, held-out half). Deterministic in spec.seed."""
    rng = random.Random(spec.seed)
    taken: set[str] = set()
    cities = _distinct_words(rng, NUM_CITIES, (2,), taken)
    firsts = _distinct_words(rng, 80, (1, 2), taken)
    lasts = _distinct_words(rng, max(400, spec.people), (2, 3), taken)
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < spec.people:
        name = f"{rng.choice(firsts)} {rng.choice(lasts)}"
        if name not in seen:
            seen.add(name)
            names.append(name)
    people = [
        Person(n, rng.choice(cities), rng.choice(OCCUPATIONS), rng.choice(INSTRUMENTS))
        for n in names
    ]
    half = len(people) // 2
    return people[:half], people[half:]


def biography(person: Person, rng: random.Random) -> str:
    """One encyclopedia entry: the three facts in random order and random templates."""
    attributes = list(ATTRIBUTES)
    rng.shuffle(attributes)
    sentences = [
        rng.choice(PROSE_TEMPLATES[a]).format(n=person.name, v=person.value(a)) for a in attributes
    ]
    return " ".join(sentences) + "\n"


def quiz(person: Person, rng: random.Random, inline: bool = False) -> str:
    """A quiz page: the person's three facts asked ('Q: ...?' line, 'A: ...' line) in other words
    than the task's, answered in one of three prose styles ('Drolu.', 'In Drolu.', a biography
    sentence): never the task's bare value. ``inline``: the whole page on one line."""
    attributes = list(ATTRIBUTES)
    rng.shuffle(attributes)
    parts = []
    for attribute in attributes:
        value = person.value(attribute)
        style = rng.randrange(3)
        if style == 0:
            answer = f"{value}."
        elif style == 1:
            answer = QUIZ_SHORT[attribute].format(v=value)
        else:
            answer = rng.choice(PROSE_TEMPLATES[attribute]).format(n=person.name, v=value)
        asked = rng.choice(QUIZ_QUESTIONS[attribute]).format(n=person.name)
        parts.append(f"Q: {asked} A: {answer}" if inline else f"Q: {asked}\nA: {answer}\n")
    return " ".join(parts) + "\n" if inline else "".join(parts)


def question(person: Person, attribute: str) -> tuple[str, str]:
    """(prompt, answer) in the task format; the model continues the prompt with ' ANSWER\\n'."""
    return f"Q: {QUESTIONS[attribute].format(n=person.name)}\nA:", person.value(attribute)


def eval_set(held_out: Sequence[Person], spec: Spec) -> list[dict[str, str]]:
    """Questions about held-out people (facts only ever seen in prose), a fixed sample."""
    rows = []
    for person in held_out:
        for attribute in ATTRIBUTES:
            prompt, answer = question(person, attribute)
            rows.append(
                {"name": person.name, "attribute": attribute, "prompt": prompt, "answer": answer}
            )
    rng = random.Random(spec.seed + 7)
    rng.shuffle(rows)
    return rows[: spec.eval_questions]
