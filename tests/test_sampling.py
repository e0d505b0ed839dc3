import math

import pytest
import torch

from proxyclient.sampling import choose, warp

SCORES = torch.tensor([math.log(0.5), math.log(0.3), math.log(0.2)], dtype=torch.float64)


def test_greedy_picks_the_highest_score_and_the_first_on_ties():
    assert choose(torch.tensor([0.1, 0.7, 0.2]), temperature=0) == 1
    assert choose(torch.tensor([0.7, 0.1, 0.7]), temperature=0) == 0


def test_top_k_keeps_the_k_best():
    out = warp(SCORES, temperature=1.0, top_k=2, top_p=1.0)
    assert torch.isfinite(out).tolist() == [True, True, False]


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [(0.5, [True, False, False]), (0.6, [True, True, False]), (0.85, [True, True, True])],
)
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
    # probabilities .5, .3, .2: mass before each is 0, .5, .8
    assert torch.isfinite(warp(SCORES, temperature=1.0, top_k=0, top_p=top_p)).tolist() == kept


def test_temperature_divides_the_scores():
    assert warp(SCORES, temperature=0.5, top_k=0, top_p=1.0).tolist() == pytest.approx(
        (SCORES / 0.5).tolist()
    )


def test_warp_does_not_modify_its_input():
    scores = SCORES.clone()
    warp(scores, temperature=0.7, top_k=2, top_p=0.6)
    assert torch.equal(scores, SCORES)


def test_sampling_is_reproducible_with_a_seed():
    def draws(seed):
        gen = torch.Generator().manual_seed(seed)
        return [choose(SCORES, temperature=1.0, generator=gen) for _ in range(50)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_sampling_follows_the_distribution():
    gen = torch.Generator().manual_seed(0)
    counts = [0, 0, 0]
    for _ in range(4000):
        counts[choose(SCORES, temperature=1.0, generator=gen)] += 1
    assert [c / 4000 for c in counts] == pytest.approx([0.5, 0.3, 0.2], abs=0.03)


def test_sampling_never_picks_a_removed_candidate():
    gen = torch.Generator().manual_seed(0)
    picks = {choose(SCORES, temperature=2.0, top_k=2, generator=gen) for _ in range(300)}
    assert picks == {0, 1}


def test_no_candidates_is_an_error():
    with pytest.raises(ValueError, match="no candidate"):
        choose(torch.tensor([]), temperature=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_greedy_choice_is_torch_argmax_on_ties_and_infinities(dtype):
    """Greedy reads CPU float scores through numpy; it picks what torch.argmax picks: the first
    of tied maxima, an all -inf row's first entry, the first NaN."""
    generator = torch.Generator().manual_seed(2)
    rows = [torch.randint(0, 4, (50,), generator=generator).to(dtype) for _ in range(30)]
    rows += [
        torch.full((7,), -math.inf, dtype=dtype),
        torch.tensor([1.0, math.nan, 2.0, math.nan], dtype=dtype),
    ]
    rows += [torch.tensor([-math.inf, math.inf, math.inf], dtype=dtype)]
    for row in rows:
        assert choose(row, temperature=0) == int(torch.argmax(row))
