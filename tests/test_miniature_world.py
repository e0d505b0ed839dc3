"""The miniature's world keeps the promises the experiment rests on (scripts/miniature_world.py)."""

from __future__ import annotations

import random

import pytest

from scripts.miniature import states_fact
from scripts.miniature_world import (
    ATTRIBUTES,
    QUESTIONS,
    QUIZ_QUESTIONS,
    Spec,
    biography,
    eval_set,
    make_world,
    question,
    quiz,
)

SPEC = Spec()


def test_the_world_is_the_same_for_the_same_seed_and_another_for_another():
    assert make_world(SPEC) == make_world(Spec())
    assert make_world(SPEC) != make_world(Spec(seed=1))


def test_people_are_distinct_and_split_in_two_halves():
    tuning, held_out = make_world(SPEC)
    names = [p.name for p in tuning + held_out]
    assert len(names) == len(set(names)) == SPEC.people
    assert len(tuning) == len(held_out) == SPEC.people // 2


def test_eval_questions_are_about_held_out_people_only():
    tuning, held_out = make_world(SPEC)
    rows = eval_set(held_out, SPEC)
    assert len(rows) == SPEC.eval_questions
    held_out_names = {p.name for p in held_out}
    tuning_prompts = {question(p, a)[0] for p in tuning for a in ATTRIBUTES}
    for row in rows:
        assert row["name"] in held_out_names
        assert row["prompt"] not in tuning_prompts
        assert row["prompt"].endswith("\nA:")


def test_every_held_out_fact_is_stated_in_the_pretraining_prose():
    _, held_out = make_world(SPEC)
    rng = random.Random(0)
    for person in held_out:
        entry = biography(person, rng)
        assert person.name in entry
        for attribute in ATTRIBUTES:
            assert states_fact(entry, person.value(attribute)), (entry, attribute)


def test_the_task_format_never_appears_in_pretraining_text():
    """Quiz pages ask other questions and answer in prose: the exact task question and the bare
    answer-then-newline format are learned from tuning data only."""
    tuning, held_out = make_world(SPEC)
    rng = random.Random(0)
    pages = [quiz(p, rng) + biography(p, rng) for p in tuning + held_out for _ in range(5)]
    task_phrasings = set(QUESTIONS.values())
    for attribute in ATTRIBUTES:
        assert task_phrasings.isdisjoint(QUIZ_QUESTIONS[attribute])
    for person in tuning + held_out:
        for attribute in ATTRIBUTES:
            asked = QUESTIONS[attribute].format(n=person.name)
            assert not any(asked in page for page in pages)
    values = {p.value(a) for p in tuning + held_out for a in ATTRIBUTES}
    answers = [line[3:] for page in pages for line in page.splitlines() if line.startswith("A: ")]
    assert len(answers) == 3 * len(pages)
    assert not values.intersection(answers)


@pytest.mark.parametrize(
    ("answer", "gold", "expected"),
    [
        ("Drolu", "Drolu", True),
        ("Drolu. Q: What is the job of", "Drolu", True),
        ("In Drolu.", "Drolu", True),
        ("Droluth", "Drolu", False),
        ("Adrolu", "Drolu", False),
        ("a baker", "baker", True),
        ("a bakery", "baker", False),
    ],
)
def test_states_fact_matches_the_value_as_a_whole_word(answer, gold, expected):
    assert states_fact(answer, gold) is expected
