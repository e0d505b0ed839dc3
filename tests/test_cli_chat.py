"""The generate CLI's chat flags (--system, --messages, --response-prefix, --base-chat-template)
and --trace FILE, against the OpenAI-dialect fixture, equal to the Python API."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from proxyclient import Chat, ProxyTuner, connect
from tests.support.dialect_servers import DialectServer

KEY = "sk-cli-chat-test-0123456789"
MESSAGES = [
    {"role": "system", "content": "You write Python."},
    {"role": "user", "content": "def add(a, b):"},
]


@pytest.fixture(scope="module")
def server(tiny_models):
    with DialectServer("openai", tiny_models["base"], api_key=KEY) as running:
        yield running


def cli(server, tiny_models, *extra: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "proxyclient", "generate", "--api", "openai",
        "--base-url", server.base_url, "--base-model", "tiny-base", "--base-api-key", KEY,
        "--expert", str(tiny_models["expert"]), "--anti-expert", str(tiny_models["anti_expert"]),
        "--device", "cpu", "--threads", "1", "--max-new-tokens", "6", *extra,
    ]  # fmt: skip
    env = dict(os.environ)
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture(scope="module")
def expected(server, tiny_models):
    base = connect(
        "openai", server.base_url, "tiny-base", api_key=KEY, tokenizer=str(tiny_models["base"])
    )
    with ProxyTuner(base, tiny_models["expert"], tiny_models["anti_expert"], device="cpu") as t:
        yield {
            "chat": t.generate(MESSAGES, max_new_tokens=6, trace=2),
            "plain": t.generate(Chat(MESSAGES, "  ", base_template=False), max_new_tokens=6),
        }


@pytest.mark.subprocess
def test_system_and_prompt_make_a_chat_and_trace_writes_a_line_per_token(
    server, tiny_models, expected, tmp_path
):
    trace = tmp_path / "trace.jsonl"
    run = cli(
        server, tiny_models, "--system", MESSAGES[0]["content"], "--prompt",
        MESSAGES[1]["content"], "--json", "--trace", str(trace), "--trace-top", "2",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    want = expected["chat"]
    assert result["token_ids"] == want.token_ids and result["text"] == want.text
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    assert [line["token_id"] for line in lines] == want.token_ids
    for line, step in zip(lines, want.steps, strict=True):
        assert line["logprob"] == pytest.approx(step.logprob, abs=1e-6)
        assert len(line["top"]) == 2
        assert set(line) == {
            "token_id", "text", "logprob", "base_logprob", "expert_logprob", "anti_logprob", "top",
            "token_bytes", "base_top",
        }  # fmt: skip
        assert line["token_bytes"] == step.token_bytes


@pytest.mark.subprocess
def test_messages_file_with_plain_base_text(server, tiny_models, expected, tmp_path):
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(MESSAGES))
    run = cli(
        server, tiny_models, "--messages", str(path), "--base-chat-template", "off",
        "--response-prefix", "  ", "--json",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["token_ids"] == expected["plain"].token_ids


@pytest.mark.subprocess
@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "cannot read a JSON array of messages"),
        ('[{"role": "system", "content": "x"}]', "at least one user turn"),
    ],
)
def test_bad_messages_exit_2_with_one_line(server, tiny_models, tmp_path, content, message):
    path = tmp_path / "chat.json"
    path.write_text(content)
    run = cli(server, tiny_models, "--messages", str(path))
    assert run.returncode == 2
    assert message in run.stderr and "Traceback" not in run.stderr
