import math

import numpy as np
import pytest
import torch

from proxyclient.combine import base_scores, combine
from proxyclient.config import UnseenPolicy

# Hand-computed case: vocabulary of 4, the base reveals ids 2 (p=.5) and 0 (p=.25).
BASE_IDS = torch.tensor([2, 0])
BASE_LP = torch.tensor([math.log(0.5), math.log(0.25)], dtype=torch.float64)
EXPERT = torch.tensor([-1.0, -2.0, -3.0, -4.0])
ANTI = torch.tensor([-2.0, -2.0, -2.0, -2.0])


def run(policy, alpha=0.5, base_ids=BASE_IDS, base_lp=BASE_LP, vocab_size=4):
    return combine(
        base_ids, base_lp, EXPERT, ANTI, alpha=alpha, policy=policy, twin=torch.arange(vocab_size)
    )


def test_restrict_scores_only_the_returned_tokens():
    out = run(UnseenPolicy.RESTRICT)
    assert out.ids.tolist() == [2, 0]
    # log .5 + .5 * (-3 + 2) and log .25 + .5 * (-1 + 2)
    assert out.scores.tolist() == pytest.approx([-1.1931472, -0.8862944])
    assert out.dropped == 0


def test_floor_gives_unseen_tokens_the_smallest_returned_logprob():
    out = run(UnseenPolicy.FLOOR)
    assert out.ids.tolist() == [0, 1, 2, 3]
    # id1: log .25 + .5 * 0; id3: log .25 + .5 * (-4 + 2)
    assert out.scores.tolist() == pytest.approx([-0.8862944, -1.3862944, -1.1931472, -2.3862944])


def test_residual_spreads_the_leftover_mass_over_unseen_tokens():
    out = run(UnseenPolicy.RESIDUAL)
    # leftover 1 - .75 = .25 over 2 unseen tokens: log .125 each before the correction
    assert out.scores.tolist() == pytest.approx([-0.8862944, -2.0794415, -1.1931472, -3.0794415])


def test_alpha_zero_is_the_base_alone():
    out = run(UnseenPolicy.RESTRICT, alpha=0.0)
    assert out.scores.tolist() == pytest.approx(BASE_LP.tolist())


@pytest.mark.parametrize("policy", list(UnseenPolicy))
def test_whole_vocabulary_makes_every_policy_the_exact_formula(policy):
    lp = torch.log_softmax(torch.tensor([0.3, -1.0, 2.0, 0.1], dtype=torch.float64), dim=0)
    ids = torch.argsort(lp, descending=True)
    out = run(policy, alpha=2.0, base_ids=ids, base_lp=lp[ids])
    exact = lp + 2.0 * (EXPERT.double() - ANTI.double())
    assert dict(zip(out.ids.tolist(), out.scores.tolist(), strict=True)) == pytest.approx(
        dict(enumerate(exact.tolist()))
    )


def test_ids_outside_the_shared_vocabulary_are_dropped_and_counted():
    ids = torch.tensor([5, 2, 4])
    lp = torch.tensor([math.log(0.4), math.log(0.3), math.log(0.1)], dtype=torch.float64)
    out = run(UnseenPolicy.RESTRICT, base_ids=ids, base_lp=lp)
    assert out.ids.tolist() == [2]
    assert out.dropped == 2


def test_residual_counts_dropped_ids_as_returned_mass():
    ids = torch.tensor([5, 2])
    lp = torch.tensor([math.log(0.4), math.log(0.5)], dtype=torch.float64)
    out = base_scores(ids, lp, torch.arange(4), UnseenPolicy.RESIDUAL)
    # leftover 1 - .9 = .1 over the 3 ids the base did not return inside the vocabulary
    assert out.scores.tolist() == pytest.approx(
        [math.log(0.1 / 3)] * 2 + [math.log(0.5)] + [math.log(0.1 / 3)]
    )


def test_residual_with_no_mass_left_excludes_the_unseen():
    lp = torch.tensor([math.log(0.6), math.log(0.4)], dtype=torch.float64)
    out = base_scores(torch.tensor([1, 3]), lp, torch.arange(4), UnseenPolicy.RESIDUAL)
    assert out.scores[0] == -math.inf and out.scores[2] == -math.inf


def test_combine_does_not_modify_its_inputs():
    expert, anti = EXPERT.clone(), ANTI.clone()
    twin = torch.arange(4)
    combine(BASE_IDS, BASE_LP, expert, anti, alpha=1.0, policy=UnseenPolicy.FLOOR, twin=twin)
    assert torch.equal(expert, EXPERT) and torch.equal(anti, ANTI)


def test_proxy_logprobs_shorter_than_the_bridge_are_refused():
    with pytest.raises(ValueError, match="maps to proxy id 4"):
        run(UnseenPolicy.RESTRICT, vocab_size=5)


def test_a_bridge_maps_base_candidates_to_their_proxy_twins():
    # base ids 0..5; base 2 -> proxy 3, base 0 -> proxy 1, base 4 has no twin.
    twin = torch.tensor([1, 0, 3, 2, -1, -1])
    ids = torch.tensor([2, 4, 0])
    lp = torch.tensor([math.log(0.5), math.log(0.3), math.log(0.1)], dtype=torch.float64)
    out = combine(ids, lp, EXPERT, ANTI, alpha=1.0, policy=UnseenPolicy.RESTRICT, twin=twin)
    assert out.ids.tolist() == [2, 0] and out.dropped == 1
    # base 2 gets proxy 3's correction (-4 + 2), base 0 gets proxy 1's (-2 + 2)
    assert out.scores.tolist() == pytest.approx([math.log(0.5) - 2.0, math.log(0.1)])
    floor = combine(ids, lp, EXPERT, ANTI, alpha=1.0, policy=UnseenPolicy.FLOOR, twin=twin)
    assert floor.ids.tolist() == [0, 1, 2, 3]  # the shared vocabulary, in base ids


def _dense_reference(base_ids, base_lp, expert, anti, alpha, policy, twin):
    """The formula over the shared vocabulary, written out per id (no cached index)."""
    shared = [i for i in range(twin.numel()) if twin[i] >= 0]
    seen = {int(i): float(lp) for i, lp in zip(base_ids, base_lp, strict=True) if int(i) in shared}
    restricted = [i for i in base_ids.tolist() if i in seen]
    ids = restricted if policy is UnseenPolicy.RESTRICT else shared
    if policy is UnseenPolicy.FLOOR:
        unseen = min(seen.values())
    else:
        leftover = 1.0 - float(torch.logsumexp(base_lp.double(), 0).exp())
        unseen = math.log(leftover / (len(shared) - len(seen))) if leftover > 0 else -math.inf
    return ids, [
        seen.get(i, unseen) + alpha * (float(expert[twin[i]]) - float(anti[twin[i]])) for i in ids
    ]


@pytest.mark.parametrize("policy", list(UnseenPolicy))
@pytest.mark.parametrize(
    "twin",
    [
        torch.arange(12),  # one tokenizer
        torch.tensor([0, 1, -1, 3, 4, -1, 6, 7, 8, 9, 10, 11]),  # gaps
        torch.tensor([5, 0, 1, -1, 2, 3, 4, 6, 7, -1, 8, 9]),  # a bridge: other ids
    ],
    ids=["same-ids", "gaps", "bridge"],
)
def test_combine_equals_the_formula_written_out_for_each_kind_of_twin_map(policy, twin):
    generator = torch.Generator().manual_seed(3)
    expert = torch.log_softmax(torch.randn(12, generator=generator), 0)
    anti = torch.log_softmax(torch.randn(12, generator=generator), 0)
    base_ids = torch.tensor([4, 0, 7, 2])
    base_lp = torch.log(torch.tensor([0.3, 0.2, 0.1, 0.05], dtype=torch.float64))
    for _ in range(2):  # the second call reads the cached index
        got = combine(base_ids, base_lp, expert, anti, alpha=0.7, policy=policy, twin=twin)
        ids, scores = _dense_reference(base_ids, base_lp, expert, anti, 0.7, policy, twin)
        assert got.ids.tolist() == ids
        torch.testing.assert_close(got.scores, torch.tensor(scores, dtype=torch.float64))


@pytest.mark.parametrize("policy", list(UnseenPolicy))
def test_a_twin_map_of_one_tokenizer_scores_as_the_general_map_does(policy):
    """One tokenizer on both sides takes a shortcut (no twin lookups, no drop mask); the same map
    with one base id more and no twin for it takes the general path: the same scores, exactly."""
    generator = torch.Generator().manual_seed(3)
    identity = torch.arange(50)
    general = torch.cat([identity, torch.tensor([-1])])
    expert = torch.log_softmax(torch.randn(64, generator=generator), 0)
    anti = torch.log_softmax(torch.randn(64, generator=generator), 0)
    for k in (1, 5, 20, 50):
        ids = torch.randperm(50, generator=generator)[:k]
        logprobs = torch.sort(torch.rand(k, generator=generator, dtype=torch.float64)).values
        logprobs = torch.log(logprobs / logprobs.sum() * 0.9).flip(0)
        fast, slow = (
            combine(ids, logprobs, expert, anti, alpha=1.5, policy=policy, twin=twin)
            for twin in (identity, general)
        )
        assert torch.equal(fast.ids, slow.ids) and fast.dropped == slow.dropped == 0
        assert torch.equal(fast.scores, slow.scores)
    # An id past the vocabulary is dropped on the shortcut too.
    past = combine(torch.tensor([3, 50]), torch.tensor([-0.5, -1.0], dtype=torch.float64),
                   expert, anti, alpha=1.0, policy=policy, twin=identity)  # fmt: skip
    assert past.dropped == 1


@pytest.mark.parametrize("policy", list(UnseenPolicy))
@pytest.mark.parametrize("kind", ["same-ids", "bridge"])
def test_combine_in_place_is_bit_for_bit_the_term_by_term_formula(policy, kind):
    """combine() writes the dense policies' scores into one buffer in place; the result is
    exactly base + alpha * (expert - anti) computed term by term in float64, -inf rows and
    negative alpha included."""
    generator = torch.Generator().manual_seed(11)
    vocab = 4000
    twin = torch.arange(vocab)
    if kind == "bridge":
        twin = torch.randperm(vocab + 96, generator=generator)[:vocab]
        twin[torch.randperm(vocab, generator=generator)[:300]] = -1
    expert = torch.log_softmax(torch.randn(vocab + 96, generator=generator) * 4, 0)
    anti = torch.log_softmax(torch.randn(vocab + 96, generator=generator) * 4, 0)
    expert[7] = -math.inf  # a masked proxy token
    for alpha in (1.0, 0.37, -2.5):
        ids = torch.randperm(vocab, generator=generator)[:20]
        logprobs = torch.log_softmax(torch.randn(20, generator=generator, dtype=torch.float64), 0)
        logprobs = logprobs - 0.3  # 26% of the mass left to the unseen
        got = combine(ids, logprobs, expert, anti, alpha=alpha, policy=policy, twin=twin)
        base = base_scores(ids, logprobs, twin, policy)
        proxy = twin[base.ids]
        want = base.scores + alpha * (expert[proxy].double() - anti[proxy].double())
        assert torch.equal(got.ids, base.ids) and got.dropped == base.dropped
        assert torch.equal(got.scores.isnan(), want.isnan())
        assert torch.equal(got.scores.nan_to_num(), want.nan_to_num())


@pytest.mark.parametrize("policy", list(UnseenPolicy))
def test_rows_in_bfloat16_or_attached_to_a_graph_score_as_their_float32_copies(policy):
    """combine reads its inputs through numpy views; rows numpy cannot view (bfloat16, a tensor
    that requires grad) are read as float32 copies, not refused."""
    generator = torch.Generator().manual_seed(5)
    expert = torch.log_softmax(torch.randn(64, generator=generator), 0).bfloat16()
    anti = torch.log_softmax(torch.randn(64, generator=generator), 0).requires_grad_()
    ids = torch.tensor([3, 9, 40])
    logprobs = torch.log(torch.tensor([0.5, 0.2, 0.1], dtype=torch.float64))
    twin = torch.arange(60)
    got = combine(ids, logprobs, expert, anti, alpha=0.8, policy=policy, twin=twin)
    want = combine(
        ids, logprobs, expert.float(), anti.detach(), alpha=0.8, policy=policy, twin=twin
    )
    assert torch.equal(got.ids, want.ids) and torch.equal(got.scores, want.scores)
    # A float64 row in a graph keeps its precision.
    precise = (anti.detach().double() / 3).requires_grad_()  # not float32-representable
    kept = combine(ids, logprobs, expert, precise, alpha=0.8, policy=policy, twin=twin)
    exact = combine(ids, logprobs, expert, precise.detach(), alpha=0.8, policy=policy, twin=twin)
    assert torch.equal(kept.scores, exact.scores)


@pytest.mark.parametrize("policy", list(UnseenPolicy))
def test_the_top_k_as_numpy_arrays_scores_as_tensors_do(policy):
    """A step hands combine the base's top-k as numpy arrays (read from the answer's tuples, no
    tensor in between): the same candidates as tensors give, an id past the vocabulary dropped,
    and the arrays left as they were."""
    from proxyclient.adapters.base import TopLogprobs
    from proxyclient.steps import _as_arrays

    generator = torch.Generator().manual_seed(3)
    twin = torch.arange(500)
    twin[[4, 77]] = -1
    expert = torch.log_softmax(torch.randn(512, generator=generator), 0)
    anti = torch.log_softmax(torch.randn(512, generator=generator), 0)
    logprobs = torch.log_softmax(torch.randn(20, generator=generator, dtype=torch.float64), 0)
    ids = [*torch.randperm(500, generator=generator)[:17].tolist(), 4, 77, 600]
    top = TopLogprobs(tuple(ids), tuple((logprobs - 0.2).tolist()))
    arrays = _as_arrays(top)
    assert [a.dtype for a in arrays] == [np.int64, np.float64]
    before = [a.copy() for a in arrays]
    tensors = torch.tensor(top.token_ids), torch.tensor(top.logprobs, dtype=torch.float64)
    got = combine(*arrays, expert, anti, alpha=0.7, policy=policy, twin=twin)
    want = combine(*tensors, expert, anti, alpha=0.7, policy=policy, twin=twin)
    assert got.dropped == want.dropped == 3
    assert torch.equal(got.ids, want.ids) and torch.equal(got.scores, want.scores)
    assert all(np.array_equal(a, b) for a, b in zip(arrays, before, strict=True))
    assert len(_as_arrays(TopLogprobs((), ()))[0]) == 0
