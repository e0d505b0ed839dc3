"""The shared byte vocabulary and the realignment of two tokenizations (pure, property-based)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxyclient.bridge import Realigner, VocabBridge, pair_fingerprint
from proxyclient.tokenizer import BaseTokenizer
from proxyclient.vocab import from_hf, from_tiktoken
from tests.support.other_tokenizers import (
    metaspace_tokenizer,
    metaspace_tokenizer_special_bytes,
    tiktoken_encoding,
)

TEXTS = st.lists(
    st.sampled_from([*"abcdef _():=\n\t", "é", "日本", "🙂", "   ", "\u00a0", "def ", "return"]),
    max_size=25,
).map("".join)
SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


# SentencePiece-style tokenizers: <0xNN> byte-fallback tokens as ordinary vocabulary entries
# (Llama-2), or as *special* added tokens (what the ``tokenizers`` BPE trainer makes of them).
METASPACE = {
    "plain <0xNN>": metaspace_tokenizer,
    "special <0xNN>": metaspace_tokenizer_special_bytes,
}


@pytest.fixture(scope="module", params=sorted(METASPACE))
def pairs(request, hf_models):
    """Every pair of tokenizer families, with one shape of SentencePiece-style tokenizer."""
    byte_level = BaseTokenizer(hf_models["tokenizer"])
    metaspace = BaseTokenizer(METASPACE[request.param]())
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


def test_single_byte_base_tokens_have_twins(pairs):
    """Every proxy family here can spell any byte alone, so a base token that is one byte (a lone
    byte of a multi-byte character, say) has a twin: proxies follow it without waiting."""
    for base, proxy in pairs.values():
        bridge = VocabBridge.build(base.vocab, proxy.vocab)
        lone = [i for i, b in enumerate(base.vocab.token_bytes) if b is not None and len(b) == 1]
        assert lone
        for base_id in lone:
            assert bridge.twin[base_id] >= 0, base.vocab.token_bytes[base_id]


def test_lone_bytes_of_a_character_are_spelled_exactly(pairs):
    """The base splits "é" and "日" into lone bytes; the proxies follow byte by byte."""
    for base, proxy in pairs.values():
        tokens = [base.vocab.id_of(bytes([b])) for b in "é日".encode()]
        assert None not in tokens  # every base here has the 256 single bytes
        tokens[2:2] = base.encode(" return", add_special_tokens=False)
        align = realigner(base, proxy)
        proxy_ids: list[int] = []
        for token in tokens:
            fed = align.feed(token)
            assert fed, "a lone byte moves the proxies"
            proxy_ids += fed
            assert align.aligned
        assert proxy.vocab.bytes_of(proxy_ids) == base.vocab.bytes_of(tokens)


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
    text = " return value"  # (Metaspace spells a leading space: its split of this is exact)
    fed = [p for t in base.encode(text, add_special_tokens=False) for p in align.feed(t)]
    assert proxy.vocab.bytes_of(fed) == text.encode()
    own = proxy.encode(text, add_special_tokens=False)
    assert proxy.vocab.bytes_of(own) == text.encode()
    assert fed == own  # the proxies' own split (words), not one token per byte
