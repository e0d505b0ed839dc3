"""TopLogprobs built from an answer's entries: from_pairs and from_columns (which keep a clean
answer as it is) give what the general ranking gives, on clean answers and on every kind of mess
a server writes."""

import math
from unittest import mock

from hypothesis import example, given
from hypothesis import strategies as st

from proxyclient.adapters.base import TopLogprobs

MESS = [-9999.0, None, math.nan, -math.inf, -1e300, 0, -2]  # sentinels, and ints from JSON


@st.composite
def answers(draw):
    """An answer as servers write it: mostly clean (distinct ids, highest first), with at most a
    few of the flaws a server's answer has (out of order, a repeated id, sentinels, ints, an id
    it did not identify)."""
    logprobs = sorted(draw(st.lists(st.floats(-30.0, 0.0), max_size=25)), reverse=True)
    ids = draw(
        st.lists(st.integers(0, 60), min_size=len(logprobs), max_size=len(logprobs), unique=True)
    )
    pairs = list(zip(ids, logprobs, strict=True))
    for _ in range(draw(st.integers(0, 3))):
        if not pairs:
            break
        where = draw(st.integers(0, len(pairs) - 1))
        flaw = draw(st.sampled_from(["swap", "repeat", "mess", "unknown", "tie"]))
        token, value = pairs[where]
        if flaw == "swap":
            other = draw(st.integers(0, len(pairs) - 1))
            pairs[where], pairs[other] = pairs[other], pairs[where]
        elif flaw == "repeat":
            pairs.insert(draw(st.integers(0, len(pairs))), (token, draw(st.floats(-30.0, 0.0))))
        elif flaw == "mess":
            pairs[where] = (token, draw(st.sampled_from(MESS)))
        elif flaw == "unknown":
            pairs[where] = (None, value)
        else:  # an equal log-prob next to it: the ranking among ties must be the same
            pairs.insert(where + 1, (draw(st.integers(61, 90)), value))
    return pairs


@given(answers(), st.sampled_from([-1, 1, 5, 20]))
@example([(1, -0.5), (2, -1.0), (3, -9999.0)], -1)  # in order, but the last is a sentinel
@example([(1, 0), (2, -1.0)], -1)  # in order, but an int
@example([(1, -0.5), (2, math.nan)], -1)
def test_a_top_k_is_the_general_ranking_of_the_answer(pairs, k):
    ids, logprobs = [i for i, _ in pairs], [lp for _, lp in pairs]
    expected = TopLogprobs._ranked(pairs, k, True, True)
    by_columns = TopLogprobs.from_columns(ids, logprobs, k=k, complete=True, retokenized=True)
    by_pairs = TopLogprobs.from_pairs(iter(pairs), k=k, complete=True, retokenized=True)
    assert _same(by_columns, expected) and _same(by_pairs, expected)


@given(
    st.lists(st.floats(min_value=-50.0, max_value=0.0), min_size=1, max_size=40),
    st.sampled_from([-1, 5, 20]),
)
def test_a_clean_answer_is_kept_without_ranking(logprobs, k):
    # distinct ids, floats above the sentinel, highest first: what vLLM writes
    logprobs = sorted(logprobs, reverse=True)
    ids = list(range(100, 100 + len(logprobs)))
    expected = TopLogprobs._ranked(zip(ids, logprobs, strict=True), k, False, False)
    with mock.patch.object(TopLogprobs, "_ranked", side_effect=AssertionError("ranked")):
        got = TopLogprobs.from_columns(ids, logprobs, k=k)
        by_pairs = TopLogprobs.from_pairs(zip(ids, logprobs, strict=True), k=k)
    assert _same(got, expected) and _same(by_pairs, expected)


def _same(a: TopLogprobs, b: TopLogprobs) -> bool:
    # NaN-free by construction; ints and floats compare equal, so the types are compared too
    return a == b and list(map(type, a.logprobs)) == list(map(type, b.logprobs))
