"""Chat prompts: checked, rendered per side (base and anti-expert: the base's template or plain
text; expert: its own template; the response prefix after the generation prompt), and decoded
exactly as the paper's formula does with those prompts."""

from __future__ import annotations

import contextlib
import re

import pytest

from proxyclient import Chat, GenerationConfig, ProxyTuner, connect
from proxyclient.adapters.base import Prompt
from proxyclient.adapters.gemini import CONTINUATION_PROBE
from proxyclient.chat import check_messages, plain_text
from proxyclient.errors import ConfigError
from proxyclient.sequence import Sequence
from proxyclient.tokenizer import BaseTokenizer
from tests.support import (
    dialect_deepseek,  # noqa: F401  (registers the "deepseek" fixture dialect)
    dialect_gemini,  # noqa: F401  (registers the "gemini" fixture dialect)
)
from tests.support.dialect_servers import DialectServer
from tests.support.local_base import LocalBase
from tests.support.reference import (
    assert_same_tokens,
    chat_server_sees,
    not_utf8_alone,
    proxy_tuned_greedy,
)

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
    config = GenerationConfig(max_new_tokens=8, base_k=-1, unseen="restrict")
    got = tuner.generate(Chat(MESSAGES, prefix, base_chat_template), config)
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


# -- the conversation reaches a chat base with its roles ---------------------------------------

CONVERSATION = [
    {"role": "system", "content": "You write Python."},
    {"role": "user", "content": "A function that adds two numbers."},
    {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
    {"role": "user", "content": "Now one that multiplies them."},
]
CHAT_KEY = "sk-chat-roles-test-0123456789"
CHAT_K = 20
CHAT_TOKENS = 8


def test_the_checked_conversation_travels_with_the_prompt_and_a_text_prompt_has_none(tuner):
    config = GenerationConfig(max_new_tokens=2)
    seq = Sequence.start(Chat(CONVERSATION, response_prefix=" def"), config, tuner.tokens)
    prompt = seq.base_prompt
    assert prompt.messages == tuple(CONVERSATION) and prompt.response_prefix == " def"
    assert prompt.ids == tuple(seq.prompt_ids.base) and prompt.prompt_len == len(prompt.ids)
    seq.append([5])
    assert seq.base_prompt.generated == (5,) and seq.base_prompt.messages == tuple(CONVERSATION)
    text = Sequence.start("def main():", config, tuner.tokens).base_prompt
    assert text.messages is None and text.response_prefix == ""


def _conversation_prompt(tokenizer, answer: str = "", prefix: str = "") -> Prompt:
    """A chat prompt whose ids are not the conversation: a chat dialect must not decode them."""
    generated = tuple(tokenizer.encode(answer, add_special_tokens=False)) if answer else ()
    ids = (7, 8, 9)
    return Prompt(ids + generated, len(ids), tuple(CONVERSATION), prefix)


def test_openai_chat_sends_the_messages_and_continues_the_answer_as_an_assistant_turn(hf_models):
    tokenizer = BaseTokenizer(hf_models["tokenizer"])
    plain = connect("openai-chat", "http://chat.test/v1", "m", tokenizer=tokenizer)
    _, first = plain.build_request(_conversation_prompt(tokenizer), 20)
    assert first["messages"] == CONVERSATION
    assert "continue_final_message" not in first and "add_generation_prompt" not in first
    with pytest.raises(ConfigError, match="continue_final_message=True"):
        plain.build_request(_conversation_prompt(tokenizer, prefix=" def"), 20)
    vllm = connect(
        "openai-chat", "http://chat.test/v1", "m", tokenizer=tokenizer, continue_final_message=True
    )
    _, later = vllm.build_request(_conversation_prompt(tokenizer, " mul", prefix=" def"), 20)
    assert later["messages"] == [*CONVERSATION, {"role": "assistant", "content": " def mul"}]
    assert later["continue_final_message"] is True and later["add_generation_prompt"] is False
    _, prefixed = vllm.build_request(_conversation_prompt(tokenizer, prefix=" def"), 20)
    assert prefixed["messages"][-1] == {"role": "assistant", "content": " def"}


@pytest.fixture(scope="module")
def chat_servers(tiny_models):
    """A continuing (vLLM-style) OpenAI chat server, DeepSeek and Gemini, on the tiny base."""
    servers = {
        "openai-chat": DialectServer(
            "openai-chat", tiny_models["base"], api_key=CHAT_KEY, continue_final_message=True
        ),
        "deepseek": DialectServer("deepseek", tiny_models["base"], api_key=CHAT_KEY),
        "gemini": DialectServer("gemini", tiny_models["base"], api_key=CHAT_KEY),
    }
    with contextlib.ExitStack() as stack:
        yield {api: stack.enter_context(server) for api, server in servers.items()}


# Gemini's question whether a model turn is continued, as the fixture renders it.
PROBE_CONVERSATION = [
    {"role": "assistant" if c["role"] == "model" else "user", "content": c["parts"][0]["text"]}
    for c in CONTINUATION_PROBE
]


def _received(api: str, body: dict) -> dict:
    """What a chat request carried of the conversation, in its dialect's terms."""
    if api == "gemini":
        return {"systemInstruction": body.get("systemInstruction"), "contents": body["contents"]}
    return {"messages": body["messages"]}


def _expected_first(api: str) -> dict:
    """What the first request of a generation of CONVERSATION carries (no response prefix)."""
    if api == "gemini":
        contents = [
            {"role": role, "parts": [{"text": m["content"]}]}
            for m, role in zip(CONVERSATION[1:], ["user", "model", "user"], strict=True)
        ]
        system = {"parts": [{"text": CONVERSATION[0]["content"]}]}
        return {"systemInstruction": system, "contents": contents}
    return {"messages": CONVERSATION}


@pytest.mark.parametrize("prefix", ["", " def"])
@pytest.mark.parametrize("api", ["openai-chat", "deepseek", "gemini"])
def test_a_conversation_reaches_each_chat_base_with_its_roles_and_decodes_as_the_formula(
    chat_servers, tiny_models, hf_models, api, prefix
):
    server = chat_servers[api]
    tokenizer = BaseTokenizer(hf_models["tokenizer"])
    options = {"continue_final_message": True} if api == "openai-chat" else {}
    base = connect(
        api, server.base_url, "tiny-base", tokenizer=tokenizer, api_key=CHAT_KEY, **options
    )
    server.requests.clear()
    server.conversations.clear()
    with ProxyTuner(base, tiny_models["expert"], tiny_models["anti_expert"], device="cpu") as t:
        got = t.generate(
            Chat(CONVERSATION, response_prefix=prefix),
            max_new_tokens=CHAT_TOKENS, base_k=CHAT_K, unseen="restrict",
        )  # fmt: skip
        expert_tokenizer = t.expert_tokenizer
    # Every request carried the conversation with its roles, then the answer so far (the prefix,
    # the tokens chosen), and the server rendered it with those roles.
    bodies = [
        body
        for _, _, body in server.requests
        if body and ("messages" in body or "contents" in body)
        and body.get("contents") != CONTINUATION_PROBE  # Gemini's one question, first
    ]  # fmt: skip
    conversations = [c for c in server.conversations if c != PROBE_CONVERSATION]
    assert bodies and len(conversations) == len(bodies)
    if not prefix:
        assert _received(api, bodies[0]) == _expected_first(api)
    for index, conversation in enumerate(conversations):
        assert conversation[: len(CONVERSATION)] == CONVERSATION
        answer = conversation[len(CONVERSATION) :]
        assert [m["role"] for m in answer] == ([] if index == 0 and not prefix else ["assistant"])
        assert not answer or answer[0]["content"].startswith(prefix)
    # The tokens are the formula's for a base that conditions on the rendered conversation.
    hf_tokenizer = hf_models["tokenizer"]
    templated = hf_tokenizer.apply_chat_template(
        CONVERSATION, add_generation_prompt=True, tokenize=False
    )
    eos = frozenset({hf_tokenizer.eos_token_id})
    reference = proxy_tuned_greedy(
        hf_models["base"], hf_models["expert"], hf_models["anti_expert"],
        _ids(hf_tokenizer, templated + prefix),
        expert_prompt_ids=_ids(expert_tokenizer, templated + prefix),
        alpha=1.0, max_new_tokens=CHAT_TOKENS, eos_ids=eos, restrict_to_top_k=CHAT_K,
        base_ids_for=chat_server_sees(hf_tokenizer, CONVERSATION, prefix),
        unidentifiable=not_utf8_alone(tokenizer) if api == "gemini" else frozenset(),
    )  # fmt: skip
    assert_same_tokens(got.token_ids, reference, eos)
    assert got.token_ids


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"messages": []}, "messages must be a non-empty list"),
        ({"messages": CONVERSATION, "response_prefix": 3}, "response_prefix must be a string"),
        ({"messages": CONVERSATION, "base_template": "yes"}, "base_template must be None (auto)"),
    ],
)
def test_a_chat_names_what_is_wrong_with_it(kwargs, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        Chat(**kwargs)


def test_a_chat_prompt_and_its_messages_alone_read_the_same(tuner):
    config = GenerationConfig(max_new_tokens=2)
    alone = tuner.tokens.encode(CONVERSATION, config)
    assert tuner.tokens.encode(Chat(CONVERSATION), config) == alone
    prefixed = tuner.tokens.encode(Chat(CONVERSATION, response_prefix=" x"), config)
    assert prefixed[0] == alone[0] + " x"
