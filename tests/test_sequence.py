"""Sequence: one generation's state on both sides, and speculation's rollback.

The property: appending tokens, rolling some back and appending others leaves the sequence —
base ids, proxy ids, realigner bytes, and the proxies' next log-probs through their cropped KV
caches — exactly as appending the final tokens once would.
"""

import asyncio

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxyclient.config import GenerationConfig
from proxyclient.loading import load_tokenizer
from proxyclient.local import LocalModel
from proxyclient.proxies import ProxyPair
from proxyclient.sequence import Sequence
from proxyclient.tokenizer import BaseTokenizer
from proxyclient.tokens import TokenSpace

PROMPT = "def main():"


class TokenizerOnly:
    """A base that is only its tokenizer (nothing here asks it for logprobs)."""

    name = "tokenizer-only"

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer


def space_and_pair(tiny_models, hf_models, expert, anti, bridged):
    tokenizer = load_tokenizer(tiny_models[anti])
    pair = ProxyPair(
        LocalModel.load(tiny_models[expert], device="cpu"),
        LocalModel.load(tiny_models[anti], device="cpu"),
    )
    base = TokenizerOnly(BaseTokenizer(hf_models["tokenizer"]) if bridged else None)
    space = TokenSpace(
        base,
        tokenizer,
        tokenizer,
        vocab_size=min(len(tokenizer), pair.expert.output_size),
        proxy_eos=frozenset({tokenizer.eos_token_id}),
    )
    return space, pair


@pytest.fixture(scope="module", params=["shared tokenizer", "bridged"])
def setup(request, tiny_models, hf_models):
    if request.param == "bridged":  # a byte-level base, SentencePiece-style proxies
        space, pair = space_and_pair(tiny_models, hf_models, "expert_sp", "anti_expert_sp", True)
        assert space.bridged
    else:
        space, pair = space_and_pair(tiny_models, hf_models, "expert", "anti_expert", False)
        assert not space.bridged
    vocab = BaseTokenizer(hf_models["tokenizer"]).vocab
    texty = [i for i, data in enumerate(vocab.token_bytes) if data]  # base ids that spell bytes
    yield space, pair, texty
    pair.close()


def fed(seq, pair):
    return asyncio.run(seq.proxy_logprobs(pair))


def snapshot(seq):
    realigner = seq.realigner
    return (
        list(seq.base_ids),
        list(seq.proxy_generated),
        None if realigner is None else (bytes(realigner.base_bytes), bytes(realigner.proxy_bytes)),
    )


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_append_rollback_append_equals_appending_once(setup, data):
    space, pair, texty = setup
    tokens = st.lists(st.sampled_from(texty), min_size=0, max_size=5)
    kept, draft, final = data.draw(tokens), data.draw(tokens), data.draw(tokens)
    feed_draft = data.draw(st.booleans())
    config = GenerationConfig(max_new_tokens=64)

    seq = Sequence.start(PROMPT, config, space)
    seq.append(kept)
    fed(seq, pair)
    checkpoint = seq.appended
    seq.append(draft)
    if feed_draft and seq.proxy_generated:  # the proxies saw the draft: their caches hold it
        fed(seq, pair)
    seq.rollback(checkpoint)
    seq.append(final)
    got = fed(seq, pair)

    once = Sequence.start(PROMPT, config, space)
    once.append(kept + final)
    expected = fed(once, pair)
    assert snapshot(seq) == snapshot(once)
    assert seq.proxies.expert.length == once.proxies.expert.length == len(once.expert_ids)
    torch.testing.assert_close(got.expert, expected.expert, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.anti, expected.anti, atol=1e-5, rtol=1e-5)


def test_accept_keeps_a_matching_draft_and_refuses_another(setup):
    space, pair, texty = setup
    seq = Sequence.start(PROMPT, GenerationConfig(max_new_tokens=8), space)
    seq.append([texty[1], texty[2], texty[3]])  # a draft
    fed(seq, pair)
    seq.accept(texty[1])
    assert seq.appended == 3 and seq.token_ids == [texty[1]]  # the draft stays in place
    with pytest.raises(ValueError, match="roll it back"):  # the step takes back what it drafted
        seq.accept(texty[4])
    seq.rollback(1)
    seq.accept(texty[4])  # the tuned choice differs from the draft's next token
    once = Sequence.start(PROMPT, GenerationConfig(max_new_tokens=8), space)
    once.append([texty[1], texty[4]])
    assert snapshot(seq) == snapshot(once) and seq.token_ids == [texty[1], texty[4]]
    torch.testing.assert_close(fed(seq, pair).expert, fed(once, pair).expert, atol=1e-5, rtol=0)


def test_emitted_tokens_cannot_be_rolled_back(setup):
    space, _pair, texty = setup
    seq = Sequence.start(PROMPT, GenerationConfig(max_new_tokens=8), space)
    seq.accept(texty[10])
    seq.append([texty[11]])
    with pytest.raises(ValueError, match="1 of them emitted"):
        seq.rollback(0)
    seq.rollback(1)
    assert seq.appended == 1 and seq.token_ids == [texty[10]]


def test_accept_ends_on_eos_length_and_stop(setup):
    space, _pair, texty = setup
    seq = Sequence.start(PROMPT, GenerationConfig(max_new_tokens=2), space)
    seq.accept(texty[20])
    assert not seq.finished
    seq.accept(texty[21])
    assert seq.finish_reason == "length" and seq.result().usage.completion_tokens == 2

    eos = next(iter(space.eos_ids))
    seq = Sequence.start(PROMPT, GenerationConfig(max_new_tokens=5), space)
    assert seq.accept(eos) == "" and seq.finish_reason == "eos" and seq.appended == 0

    seq = Sequence.start(PROMPT, GenerationConfig(max_new_tokens=9), space)
    word = space.decode([texty[30]])
    seq.accept(texty[30])
    assert seq.assembler.text == word and not seq.finished
    seq = Sequence.start(PROMPT, GenerationConfig(max_new_tokens=9, stop=(word,)), space)
    seq.accept(texty[30])
    assert seq.finish_reason == "stop" and seq.result().text == ""
