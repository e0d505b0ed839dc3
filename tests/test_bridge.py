"""The shared byte vocabulary and the realignment of two tokenizations (pure, property-based)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from other_tokenizers import metaspace_tokenizer, tiktoken_encoding

from proxyclient.bridge import Realigner, VocabBridge, pair_fingerprint
from proxyclient.tokenizer import BaseTokenizer
from proxyclient.vocab import from_hf, from_tiktoken

TEXTS = st.lists(
    st.sampled_from([*"abcdef _():=\n\t", "é", "日本", "🙂", "   ", "\u00a0", "def ", "return"]),
    max_size=25,
).map("".join)
SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def pairs(hf_models):
    byte_level = BaseTokenizer(hf_models["tokenizer"])
    metaspace = BaseTokenizer(metaspace_tokenizer())
    tiktoken = BaseTokenizer(tiktoken_encoding())
    return {
        "byte-level -> metaspace": (byte_level, metaspace),
        "metaspace -> byte-level": (metaspace, byte_level),
        "tiktoken -> metaspace": (tiktoken, metaspace),
    }


def realigner(base, proxy):
    return Realigner(base.vocab, proxy.vocab, lambda t: proxy.encode(t, add_special_tokens=False))


def test_twins_spell_the_same_bytes(pairs):
    for base, proxy in pairs.values():
        bridge = VocabBridge.build(base.vocab, proxy.vocab)
        assert 0 < bridge.shared < len(base.vocab)
        for base_id, proxy_id in enumerate(bridge.twin.tolist()):
            if proxy_id >= 0:
                assert base.vocab.token_bytes[base_id] == proxy.vocab.token_bytes[proxy_id]


def test_special_tokens_pair_by_role(hf_models):
    base = BaseTokenizer(hf_models["tokenizer"])
    proxy = BaseTokenizer(metaspace_tokenizer())
    bridge = VocabBridge.build(base.vocab, proxy.vocab, {base.eos_token_id: proxy.eos_token_id})
    assert bridge.twin[base.eos_token_id] == proxy.eos_token_id


def test_identity_bridge():
    assert torch.equal(VocabBridge.identity(5).twin, torch.arange(5))


def test_fingerprint_changes_with_either_vocabulary(hf_models):
    byte_level, metaspace = from_hf(hf_models["tokenizer"]), from_hf(metaspace_tokenizer())
    tiktoken = from_tiktoken(tiktoken_encoding())
    assert pair_fingerprint(byte_level, metaspace) == pair_fingerprint(byte_level, metaspace)
    assert pair_fingerprint(byte_level, metaspace) != pair_fingerprint(metaspace, byte_level)
    assert pair_fingerprint(byte_level, metaspace) != pair_fingerprint(tiktoken, metaspace)


@SETTINGS
@given(text=TEXTS)
def test_canonical_base_tokens_keep_both_sides_on_the_same_bytes(pairs, text):
    for base, proxy in pairs.values():
        align = realigner(base, proxy)
        proxy_ids: list[int] = []
        tokens = base.encode(text, add_special_tokens=False)
        for token in tokens:
            proxy_ids += align.feed(token)
            assert align.aligned
        # (a Metaspace base spells a leading space before the first word)
        assert proxy.vocab.bytes_of(proxy_ids) == base.vocab.bytes_of(tokens)


@SETTINGS
@given(data=st.data())
def test_any_choice_of_base_tokens_keeps_both_sides_on_the_same_bytes(pairs, data):
    """The base may choose any token, splitting characters and words anywhere."""
    for base, proxy in pairs.values():
        choosable = [i for i, b in enumerate(base.vocab.token_bytes) if b]
        tokens = data.draw(st.lists(st.sampled_from(choosable), min_size=1, max_size=20))
        align = realigner(base, proxy)
        proxy_ids: list[int] = []
        for token in tokens:
            fed = align.feed(token)
            assert fed, "every base token moves the proxies (they can spell any byte)"
            proxy_ids += fed
            assert align.aligned
        assert proxy.vocab.bytes_of(proxy_ids) == base.vocab.bytes_of(tokens)


def test_proxies_use_their_own_split_where_it_spells_the_bytes(hf_models):
    base, proxy = BaseTokenizer(hf_models["tokenizer"]), BaseTokenizer(metaspace_tokenizer())
    align = realigner(base, proxy)
    text = "return value"
    fed = [p for t in base.encode(text, add_special_tokens=False) for p in align.feed(t)]
    assert proxy.vocab.bytes_of(fed) == text.encode()
    assert len(fed) <= len(text)  # words, not bytes
