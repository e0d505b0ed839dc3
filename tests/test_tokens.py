"""TokenSpace: one owner of tokenization. The base's tokenizer comes from the adapter, so the
Python API bridges an OpenAI model's encoding to other proxies without being told twice."""

import httpx
import pytest
import tiktoken

from proxyclient import ConfigError, ProxyTuner, connect
from proxyclient.tokenizer import BaseTokenizer
from proxyclient.tokens import TokenSpace
from tests.support.dialect_servers import DialectServer
from tests.support.other_tokenizers import metaspace_tokenizer_special_bytes, tiktoken_twin

OPENAI_MODEL = "gpt-3.5-turbo-instruct"  # its name implies tiktoken's cl100k_base
PROMPT = "def main():"
N = 10


@pytest.fixture
def openai_server(tiny_models, hf_models, monkeypatch):
    """The OpenAI dialect serving the tiny base under an OpenAI model name, tokenized by a
    tiktoken encoding that stands in for cl100k_base (which cannot be downloaded here)."""
    encoding = tiktoken_twin(hf_models["tokenizer"])
    monkeypatch.setitem(tiktoken.registry.ENCODINGS, "cl100k_base", encoding)
    with DialectServer(
        "openai", tiny_models["base"], served_name=OPENAI_MODEL, tokenizer=encoding
    ) as server:
        yield server, encoding


def test_python_api_adopts_the_adapters_tokenizer(openai_server, tiny_models):
    server, encoding = openai_server
    base = connect("openai", server.base_url, OPENAI_MODEL)  # no tokenizer named anywhere
    assert base.tokenizer.is_tiktoken
    options = dict(max_new_tokens=N, unseen="restrict", base_k=5)
    with ProxyTuner(base, tiny_models["expert_sp"], tiny_models["anti_expert_sp"]) as tuner:
        assert tuner.tokens.bridged  # SentencePiece-style proxies, a tiktoken base
        plain = tuner.generate(PROMPT, alpha=0.0, **options)
        steered = tuner.generate(PROMPT, alpha=2.0, **options)
    explicit_base = connect("openai", server.base_url, OPENAI_MODEL)
    with ProxyTuner(
        explicit_base, tiny_models["expert_sp"], tiny_models["anti_expert_sp"],
        base_tokenizer=encoding,
    ) as explicit:  # fmt: skip
        assert explicit.generate(PROMPT, alpha=2.0, **options).token_ids == steered.token_ids
    greedy = httpx.post(
        f"{server.base_url}/completions",
        json={"model": OPENAI_MODEL, "prompt": PROMPT, "max_tokens": N, "temperature": 0},
        timeout=60,
    ).json()["choices"][0]["text"]
    assert plain.text == greedy  # alpha 0 through the bridge: the base's own output
    assert plain.usage.dropped_candidates == 0
    assert steered.token_ids != plain.token_ids


def test_a_conflicting_base_tokenizer_is_refused(openai_server, tiny_models):
    server, _encoding = openai_server
    base = connect("openai", server.base_url, OPENAI_MODEL)
    with pytest.raises(ConfigError, match=r"differs from the tokenizer the 'gpt-3\.5-turbo"):
        ProxyTuner(
            base, tiny_models["expert"], tiny_models["anti_expert"],
            base_tokenizer=tiny_models["anti_expert_sp"],
        )  # fmt: skip


class TokenizerOnly:
    name = "tokenizer-only"

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer


def test_the_proxies_own_tokenizer_under_another_name_shares_ids(hf_models):
    tokenizer = hf_models["tokenizer"]
    space = TokenSpace(
        TokenizerOnly(BaseTokenizer(tokenizer)), tokenizer, tokenizer,
        vocab_size=len(tokenizer), proxy_eos=frozenset({tokenizer.eos_token_id}),
    )  # fmt: skip
    assert not space.bridged and space.realigner() is None
    assert space.encode_prompt(PROMPT).base == space.encode_prompt(PROMPT).proxy


def test_special_flagged_byte_tokens_still_decode_to_text():
    tokenizer = metaspace_tokenizer_special_bytes()
    space = TokenSpace(
        TokenizerOnly(), tokenizer, tokenizer,
        vocab_size=len(tokenizer), proxy_eos=frozenset({tokenizer.eos_token_id}),
    )  # fmt: skip
    text = "héllo 日本 🙂"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) != text  # what the fix avoids
    assert space.decode(ids).strip() == text
