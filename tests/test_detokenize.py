import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxyclient.detokenize import TextAssembler

TEXTS = st.lists(
    st.sampled_from([*list("ab cd\n\t_():="), "é", "日本", "🙂", "  ", "\xa0"]),
    min_size=1,
    max_size=30,
).map("".join)
SLOW = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def tokenizer(hf_models):
    return hf_models["tokenizer"]


def decoder(tokenizer):
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def assemble(tokenizer, ids, stop=(), prompt="x = 1\n"):
    assembler = TextAssembler(decoder(tokenizer), tokenizer(prompt).input_ids, stop)
    pieces = []
    for token in ids:
        pieces.append(assembler.add(token))
        if assembler.stopped:
            break
    pieces.append(assembler.finish())
    return pieces, assembler


@SLOW
@given(text=TEXTS)
def test_pieces_add_up_to_the_decoded_text(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    pieces, assembler = assemble(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids) == assembler.text
    # Incomplete UTF-8 waits for the next token instead of showing U+FFFD.
    assert all("\ufffd" not in p for p in pieces)


@SLOW
@given(text=TEXTS, stop=st.sampled_from(["\n", "cd", "日本", "🙂 ", "zz"]))
def test_stop_sequences_cut_the_text_and_are_never_shown(tokenizer, text, stop):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    pieces, assembler = assemble(tokenizer, ids, stop=[stop])
    full = tokenizer.decode(ids)
    expected = full[: full.index(stop)] if stop in full else full
    assert "".join(pieces) == expected == assembler.text
    assert assembler.stopped == (stop in full)


def test_text_that_may_start_a_stop_sequence_is_held_back(tokenizer):
    assembler = TextAssembler(decoder(tokenizer), [], ["END"])
    shown = [assembler.add(t) for t in tokenizer("abc E", add_special_tokens=False).input_ids]
    assert "".join(shown) == "abc "
    assert assembler.finish() == "E"


@pytest.mark.parametrize("family", ["byte-level BPE", "Metaspace", "Metaspace, special bytes"])
def test_the_base_tokenizers_shortcut_decodes_as_its_hf_tokenizer_does(hf_models, family):
    """BaseTokenizer.decode calls the Rust backend where transformers' decode would only pass
    the ids on to it: the same text, for any ids, special ones and broken characters included."""
    import random

    from proxyclient.tokenizer import BaseTokenizer
    from tests.support.other_tokenizers import (
        metaspace_tokenizer,
        metaspace_tokenizer_special_bytes,
    )

    inner = {
        "byte-level BPE": lambda: hf_models["tokenizer"],
        "Metaspace": metaspace_tokenizer,
        "Metaspace, special bytes": metaspace_tokenizer_special_bytes,
    }[family]()
    base = BaseTokenizer(inner)
    assert base._decode_ids != inner.decode  # the shortcut is taken
    reference = BaseTokenizer(inner)
    reference._decode_ids = inner.decode  # what transformers itself does
    rng = random.Random(7)
    for _ in range(300):
        ids = [rng.randrange(len(inner)) for _ in range(rng.randrange(1, 9))]
        assert base.decode(ids) == reference.decode(ids)
