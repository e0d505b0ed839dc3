import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxyclient.vocab import bytes_of_token_string, from_hf, from_tiktoken
from tests.support.other_tokenizers import (
    metaspace_tokenizer,
    metaspace_tokenizer_special_bytes,
    tiktoken_encoding,
)

TEXTS = st.text(
    alphabet=st.sampled_from([*"abcdef _():=\n\t", "é", "日", "本", "🙂", "\u00a0"]), max_size=40
)
SETTINGS = settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def byte_level(hf_models):
    return hf_models["tokenizer"]


@SETTINGS
@given(text=TEXTS)
def test_byte_level_bpe_ids_spell_the_text(byte_level, text):
    vocab = from_hf(byte_level)
    assert vocab.bytes_of(byte_level(text, add_special_tokens=False).input_ids) == text.encode()


# SentencePiece-style tokenizers: <0xNN> byte-fallback tokens as ordinary vocabulary entries
# (Llama-2), or as *special* added tokens (what the ``tokenizers`` BPE trainer makes of them).
METASPACE = {
    "plain <0xNN>": metaspace_tokenizer,
    "special <0xNN>": metaspace_tokenizer_special_bytes,
}


@pytest.mark.parametrize("shape", sorted(METASPACE))
@SETTINGS
@given(text=TEXTS)
def test_metaspace_with_byte_fallback_ids_spell_the_text(shape, text):
    tokenizer = METASPACE[shape]()
    vocab = from_hf(tokenizer)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    # Metaspace puts a space before the first word; decoding strips it again.
    assert vocab.bytes_of(ids) in (text.encode(), b" " + text.encode())


@SETTINGS
@given(text=TEXTS)
def test_tiktoken_ids_spell_the_text(text):
    encoding = tiktoken_encoding()
    assert from_tiktoken(encoding).bytes_of(encoding.encode(text)) == text.encode()


def test_special_tokens_have_no_bytes(byte_level):
    vocab = from_hf(byte_level)
    assert byte_level.eos_token_id in vocab.special_ids
    assert vocab.token_bytes[byte_level.eos_token_id] is None
    encoding = tiktoken_encoding()
    eot = encoding.encode_single_token("<|endoftext|>")
    assert from_tiktoken(encoding).token_bytes[eot] is None


@pytest.mark.parametrize("shape", sorted(METASPACE))
def test_byte_fallback_pieces_are_single_bytes(shape):
    vocab = from_hf(METASPACE[shape]())
    newline = METASPACE[shape]().convert_tokens_to_ids("<0x0A>")
    assert vocab.token_bytes[newline] == b"\n"
    assert newline in vocab.fallback_ids


def test_special_byte_fallback_tokens_are_bytes_not_specials():
    """Byte fallback makes <0xNN> tokens bytes, whatever their special flag."""
    tokenizer = metaspace_tokenizer_special_bytes()
    vocab = from_hf(tokenizer)
    for b in range(256):
        token_id = tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>")
        assert vocab.token_bytes[token_id] == bytes([b])
        assert token_id in vocab.fallback_ids
        assert token_id not in vocab.special_ids
    assert vocab.special_ids == {
        tokenizer.convert_tokens_to_ids(t) for t in ("<unk>", "<s>", "</s>")
    }
    text = "héllo 日本 🙂 naïve"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert any(i in vocab.fallback_ids for i in ids)  # 日本 and 🙂 need byte fallback
    assert vocab.bytes_of(ids) == b" " + text.encode()  # Metaspace's leading space


@pytest.mark.parametrize("shape", sorted(METASPACE))
def test_a_piece_wins_over_the_byte_fallback_token_with_the_same_bytes(shape):
    """Llama-2 has both "a" and "<0x61>"; its tokenizer only emits "<0x61>" for bytes no piece
    covers, so the piece is the twin proxies were trained on."""
    tokenizer = METASPACE[shape]()
    vocab = from_hf(tokenizer)
    both = [b for b in range(128) if tokenizer.convert_tokens_to_ids(chr(b)) not in (None, 0)]
    assert len(both) > 20  # ASCII letters and punctuation are pieces too
    for b in both:
        piece = tokenizer.convert_tokens_to_ids(chr(b))
        assert vocab.id_of(bytes([b])) == piece, chr(b)
    only_fallback = bytes([0xE6])
    assert vocab.id_of(only_fallback) == tokenizer.convert_tokens_to_ids("<0xE6>")


def test_id_of_finds_every_token(byte_level):
    vocab = from_hf(byte_level)
    for data in vocab.token_bytes:
        if data is not None:
            assert vocab.token_bytes[vocab.id_of(data)] == data


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        ("hello", b"hello"),
        (" the", b" the"),
        ("bytes:\\xe6\\x97", b"\xe6\x97"),
        ("", None),
        ("\ufffd", None),
        ("日本", "日本".encode()),
    ],
)
def test_api_token_strings(token, expected):
    assert bytes_of_token_string(token) == expected
