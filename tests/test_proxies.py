"""ProxyPair: log-probs at every new position, equal to full forwards; KV caches rewound."""

import asyncio

import pytest
import torch

from proxyclient.local import LocalModel
from proxyclient.proxies import PairState, ProxyPair
from tests.support.reference import next_logprobs


@pytest.fixture(scope="module")
def pair(tiny_models):
    pair = ProxyPair(
        LocalModel.load(tiny_models["expert"], device="cpu"),
        LocalModel.load(tiny_models["anti_expert"], device="cpu"),
    )
    yield pair
    pair.close()


def test_every_new_position_matches_a_full_forward(pair, hf_models):
    ids = hf_models["tokenizer"]("def main():\n    return x + 1").input_ids
    state = PairState()
    first = asyncio.run(pair.logprobs(state, ids[:4], ids[:4]))
    assert first.expert.shape == (1, pair.expert.output_size)
    drafted = asyncio.run(pair.logprobs(state, ids, ids, positions=len(ids) - 4))
    assert drafted.expert.shape[0] == len(ids) - 4
    for row, n in enumerate(range(5, len(ids) + 1)):
        for got, model in ((drafted.expert, "expert"), (drafted.anti, "anti_expert")):
            expected = next_logprobs(hf_models[model], ids[:n]).float()
            torch.testing.assert_close(got[row], expected, atol=1e-5, rtol=1e-5)
    assert state.expert.length == state.anti.length == len(ids)


def test_rewind_then_feed_matches_a_fresh_sequence(pair, hf_models):
    ids = hf_models["tokenizer"]("import os\nclass Foo(object):").input_ids
    state = PairState()
    asyncio.run(pair.logprobs(state, ids, ids))
    state.truncate(5, 5)
    assert state.crop_to == (4, 4)  # one fewer: its log-probs are needed
    got = asyncio.run(pair.logprobs(state, ids[:5], ids[:5]))
    assert state.expert.length == state.anti.length == 5
    torch.testing.assert_close(
        got.expert[0], next_logprobs(hf_models["expert"], ids[:5]).float(), atol=1e-5, rtol=1e-5
    )


def test_no_new_token_reuses_the_last_answer(pair):
    state = PairState()
    ids = [1, 50, 60]
    first = asyncio.run(pair.logprobs(state, ids, ids))
    again = asyncio.run(pair.logprobs(state, ids, ids))
    assert torch.equal(first.expert, again.expert) and state.expert.length == 3
    with pytest.raises(ValueError, match="2 positions need as many unseen ids"):
        pair.logprobs_now(state, ids, ids, positions=2)
