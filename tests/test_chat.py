"""Chat prompts: checked, rendered per side (base and anti-expert: the base's template or plain
text; expert: its own template; the response prefix after the generation prompt), and decoded
exactly as the paper's formula does with those prompts."""

from __future__ import annotations

import re

import pytest
from local_base import LocalBase
from reference import assert_same_tokens, proxy_tuned_greedy

from proxyclient import GenerationConfig, ProxyTuner
from proxyclient.chat import check_messages, plain_text
from proxyclient.errors import ConfigError

MESSAGES = [
    {"role": "system", "content": "You write Python."},
    {"role": "user", "content": "A function that adds two numbers."},
]


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([], "non-empty list"),
        ("hi", "non-empty list"),
        ([{"role": "system", "content": "x"}], "at least one user turn"),
        ([{"role": "robot", "content": "x"}], "messages[0].role must be one of"),
        ([{"role": "user", "content": 3}], "messages[0].content must be a string"),
        ([{"role": "user"}], "messages[0].content must be a string"),
        (["user: hi"], "messages[0] must be an object"),
    ],
)
def test_bad_messages_name_the_fault(messages, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_messages(messages)


def test_text_parts_are_joined_and_plain_text_reads_like_a_transcript():
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]
    assert check_messages([{"role": "user", "content": parts}])[0]["content"] == "Hello there"
    turns = [
        *MESSAGES,
        {"role": "assistant", "content": "Sure."},
        {"role": "user", "content": "Go"},
    ]
    assert plain_text(turns, " def") == (
        "You write Python.\n\nUser: A function that adds two numbers.\nAssistant: Sure.\n"
        "User: Go\nAssistant: def"
    )


@pytest.fixture(scope="module")
def tuner(tiny_models, hf_models):
    base = LocalBase(hf_models["base"])
    with ProxyTuner(base, tiny_models["expert"], tiny_models["anti_expert"], device="cpu") as t:
        yield t


def _ids(tokenizer, text: str) -> list[int]:
    """Built without the code under test: exactly one BOS in front."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    bos = tokenizer.bos_token_id
    return ids if ids[:1] == [bos] else [bos, *ids]


@pytest.mark.parametrize("base_chat_template", [None, False])
def test_chat_decodes_as_the_formula_with_each_side_s_rendering(
    tuner, hf_models, base_chat_template
):
    prefix = " def add("
    config = GenerationConfig(
        max_new_tokens=8, base_k=-1, unseen="restrict", response_prefix=prefix,
        base_chat_template=base_chat_template,
    )  # fmt: skip
    got = tuner.generate(MESSAGES, config)
    tokenizer = hf_models["tokenizer"]
    templated = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    base_text = templated + prefix if base_chat_template is None else plain_text(MESSAGES, prefix)
    expected = proxy_tuned_greedy(
        hf_models["base"],
        hf_models["expert"],
        hf_models["anti_expert"],
        _ids(tokenizer, base_text),
        expert_prompt_ids=_ids(tuner.expert_tokenizer, templated + prefix),
        alpha=1.0,
        max_new_tokens=8,
        eos_ids=tuner.tokens.eos_ids,
    )
    assert_same_tokens(got.token_ids, expected, tuner.tokens.eos_ids)


def test_a_chat_prompt_streams_and_bad_messages_fail_before_any_request(tuner):
    pieces = list(tuner.stream(MESSAGES, max_new_tokens=4))
    assert "".join(pieces) == tuner.generate(MESSAGES, max_new_tokens=4).text
    requests = len(tuner.base.requests)
    with pytest.raises(ConfigError, match="at least one user turn"):
        tuner.generate([{"role": "system", "content": "x"}])
    assert len(tuner.base.requests) == requests
