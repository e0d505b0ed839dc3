"""The API key never shows: not in logs (any level, retry warnings included), exception messages,
error bodies, reprs, partial results or the CLI's --json output — while faults are injected and
the server echoes the Authorization header back in its error bodies."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import warnings

import httpx
import pytest

from proxyclient import GenerationConfig, ProxyTuner, connect
from proxyclient.adapters import http as http_module
from proxyclient.adapters.http import HTTPTransport
from proxyclient.errors import AuthenticationError, ProxyClientError, ServerError
from tests.support.constants import API_KEY, BASE_NAME
from tests.support.fault_proxy import PASS, Fault, FaultProxy

ECHO = "Bearer ***"  # what the echoed header must read after redaction
CONFIG = GenerationConfig(max_new_tokens=8, base_k=20, speculate="off")


def everything_said_about(exc: ProxyClientError) -> str:
    """Every way an error can be shown or stored."""
    parts = [str(exc), repr(exc), repr(exc.args)]
    body = getattr(exc, "body", None)
    parts.append(json.dumps(body) if body is not None else "")
    if exc.partial is not None:
        parts += [repr(exc.partial), json.dumps(exc.partial.to_dict())]
    return "\n".join(parts)


def echo(status: int) -> Fault:
    return Fault("echo_auth", status=status)


# -- without a server: the transport alone ------------------------------------------------------


def test_a_key_echoed_in_a_broken_200_and_in_retry_warnings_is_redacted(caplog):
    secret = "sk-unit-0123456789"
    answers = [
        httpx.Response(500, json={"error": {"message": f"bad key {secret}"}}),
        httpx.Response(200, text=f"<html>key {secret}</html>"),
        httpx.Response(200, text=f'{{"echo": "{secret}", "logprob": NaN}}'),
    ]

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == f"Bearer {secret}"
        return answers.pop(0)

    client = HTTPTransport(
        "http://server/v1", api_key=secret, transport=httpx.MockTransport(handler), max_retries=2
    )
    http_module.INITIAL_BACKOFF_S, saved = 0.001, http_module.INITIAL_BACKOFF_S
    try:
        with caplog.at_level(logging.DEBUG), pytest.raises(ProxyClientError) as info:
            asyncio.run(client.request_json("POST", "/completions", {}))
    finally:
        http_module.INITIAL_BACKOFF_S = saved
    said = everything_said_about(info.value) + caplog.text + repr(client)
    assert secret not in said
    assert "bad key ***" in caplog.text and "<html>key ***</html>" in caplog.text


# -- through the fault proxy, against the vLLM server that wants the key ------------------------


@pytest.fixture(scope="module")
def proxy(servers):
    upstream = servers["capped"].root_url.removeprefix("http://")
    with FaultProxy(upstream) as p:
        yield p


@pytest.fixture(scope="module")
def tuner(proxy, tiny_models):
    base = connect("vllm", f"{proxy.url}/v1", BASE_NAME, api_key=API_KEY, timeout=3.0)
    with ProxyTuner(base, tiny_models["expert"], tiny_models["anti_expert"], device="cpu") as t:
        yield t


@pytest.mark.integration
def test_the_key_never_shows_while_faults_are_injected(proxy, tuner, caplog):
    said: list[str] = []
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        # Recovered faults: the retry warnings name what went wrong, the key not.
        proxy.schedule(
            [
                PASS,
                echo(500),
                Fault("drop"),
                PASS,
                echo(502),
                Fault("reset"),
                PASS,
                Fault("truncate"),
                echo(503),
                PASS,
                Fault("nan"),
            ]
        )
        got = tuner.generate("def main():", CONFIG)
        assert got.error is None and len(got.token_ids) == 8
        said.append(json.dumps(got.to_dict()))
        # A lasting fault whose every answer echoes the key.
        proxy.schedule([PASS, PASS], then=echo(500))
        with pytest.raises(ServerError) as info:
            tuner.generate("def main():", CONFIG)
        said.append(everything_said_about(info.value))
        assert ECHO in str(info.value)
        # A wrong-key answer, not retried, echoing it.
        proxy.schedule([echo(401)])
        with pytest.raises(AuthenticationError) as info:
            tuner.generate("def main():", CONFIG)
        said.append(everything_said_about(info.value))
        assert ECHO in str(info.value)
    proxy.schedule()
    assert "retrying POST" in caplog.text and f"bad key: {ECHO}" in caplog.text
    logged = [caplog.text] + [r.getMessage() + repr(r.args) for r in caplog.records]
    said += logged + [str(w.message) for w in warned]
    said += [repr(tuner), repr(tuner.base), repr(tuner.base.transport)]
    assert not [text for text in said if API_KEY in text]


@pytest.mark.integration
def test_the_cli_never_shows_the_key_even_with_debug(proxy, tiny_models):
    args = [
        "--api", "vllm", "--base-url", f"{proxy.url}/v1", "--base-model", BASE_NAME,
        "--expert", str(tiny_models["expert"]), "--anti-expert", str(tiny_models["anti_expert"]),
        "--prompt", "def main():", "--max-new-tokens", "6", "--threads", "1", "--speculate", "off",
        "--timeout", "3", "--json", "--debug",
    ]  # fmt: skip
    proxy.schedule([PASS, echo(500), Fault("reset"), PASS], then=echo(503))
    run = subprocess.run(
        [sys.executable, "-m", "proxyclient.cli", "generate", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PROXYCLIENT_API_KEY": API_KEY},
    )
    proxy.schedule()
    assert run.returncode == 2, run.stderr
    record = json.loads(run.stdout)
    assert record["finish_reason"] == "error" and ECHO in record["error"]
    assert "DEBUG" in run.stderr and "Traceback" in run.stderr  # --debug: everything, still no key
    assert API_KEY not in run.stdout and API_KEY not in run.stderr
