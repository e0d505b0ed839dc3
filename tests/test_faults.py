"""Faults: nothing generated is lost, and a failed generation resumes where it stopped.

Unit tests run the loop against an in-process base that fails on cue (tests/support/local_base.py).
The integration tests put tests/support/fault_proxy.py between the client and a real vLLM server and
inject each fault there (drops, resets, hangs, error statuses, broken 200s), or kill the server
itself; each asserts the outcome (recovered, or a clean error carrying the partial result) and that
a recovered or resumed greedy generation equals the fault-free one, token for token.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from proxyclient import GenerationConfig, ProxyTuner, connect
from proxyclient.errors import (
    APIConnectionError,
    APITimeoutError,
    BadRequestError,
    ConfigError,
    RateLimitError,
    ResponseFormatError,
    ServerError,
)
from proxyclient.result import Generation
from tests.support.constants import BASE_NAME
from tests.support.fault_proxy import PASS, Fault, FaultProxy

PROMPT = "def main():"
N = 12


def fail_at(tuner: ProxyTuner, request: int | None) -> None:
    tuner.base.requests = []
    tuner.base.fail_at_request = request


def failed(tuner: ProxyTuner, config: GenerationConfig, at: int) -> Generation:
    fail_at(tuner, at)
    with pytest.raises(ServerError, match="injected fault") as info:
        tuner.generate(PROMPT, config)
    partial = info.value.partial
    assert partial.finish_reason == "error" and "injected fault" in partial.error
    return partial


@pytest.mark.parametrize("speculate", ["off", "stream", "base", "expert"])
@pytest.mark.parametrize("at", [1, 2, 5])
def test_a_resumed_generation_equals_an_uninterrupted_one(local_tuner, speculate, at):
    config = GenerationConfig(max_new_tokens=N, base_k=20, speculate=speculate)
    fail_at(local_tuner, None)
    whole = local_tuner.generate(PROMPT, config)
    partial = failed(local_tuner, config, at)
    assert whole.token_ids[: len(partial.token_ids)] == partial.token_ids
    assert whole.text.startswith(partial.text)
    resumed = local_tuner.generate(PROMPT, config, resume=partial)
    assert resumed.token_ids == whole.token_ids
    assert resumed.text == whole.text
    assert resumed.finish_reason == whole.finish_reason
    assert resumed.error is None
    # The cost of both runs together: nothing the failed run paid for is forgotten.
    assert resumed.usage.requests == partial.usage.requests + len(local_tuner.base.requests) - at
    assert resumed.usage.completion_tokens == len(whole.token_ids)


def test_resume_twice_and_asynchronously(local_tuner):
    config = GenerationConfig(max_new_tokens=N, base_k=20, speculate="off")
    fail_at(local_tuner, None)
    whole = local_tuner.generate(PROMPT, config)
    first = failed(local_tuner, config, 3)
    fail_at(local_tuner, 4)
    with pytest.raises(ServerError) as info:
        local_tuner.generate(PROMPT, config, resume=first)
    second = info.value.partial
    assert len(first.token_ids) < len(second.token_ids) < N
    fail_at(local_tuner, None)

    async def run() -> tuple[Generation, list[str]]:
        stream = local_tuner.astream(PROMPT, config, resume=second)
        pieces = [piece async for piece in stream]
        return await local_tuner.agenerate(PROMPT, config, resume=second), pieces

    resumed, pieces = local_tuner._runner.run(run())
    assert resumed.token_ids == whole.token_ids
    assert second.text + "".join(pieces) == whole.text


def test_the_stream_yields_everything_before_it_raises(local_tuner):
    # A stop sequence that never completes makes the assembler hold text back: on the error the
    # stream hands it out, so what was streamed is the partial's text.
    config = GenerationConfig(max_new_tokens=N, base_k=20, speculate="off")
    fail_at(local_tuner, None)
    whole = local_tuner.generate(PROMPT, config)
    held = whole.text[len(local_tuner.generate(PROMPT, config, max_new_tokens=5).text) :][:1]
    stopping = GenerationConfig(max_new_tokens=N, base_k=20, speculate="off", stop=(held + "\x00",))
    for at in range(2, 9):
        fail_at(local_tuner, at)
        stream = local_tuner.stream(PROMPT, stopping)
        pieces = []
        with pytest.raises(ServerError) as info:
            for piece in stream:
                pieces.append(piece)
        assert "".join(pieces) == info.value.partial.text
        fail_at(local_tuner, None)
        rest = list(local_tuner.stream(PROMPT, stopping, resume=info.value.partial))
        assert info.value.partial.text + "".join(rest) == whole.text


def test_resume_refuses_what_it_cannot_continue(local_tuner):
    config = GenerationConfig(max_new_tokens=N, base_k=20)
    fail_at(local_tuner, None)
    done = local_tuner.generate(PROMPT, config)
    with pytest.raises(ConfigError, match="finished \\('length'\\) and has nothing left to do"):
        local_tuner.generate(PROMPT, config, resume=done)
    partial = failed(local_tuner, config, 3)
    edited = Generation(partial.text + "!", partial.token_ids, "error")
    with pytest.raises(ConfigError, match="do not spell its text after this prompt"):
        local_tuner.generate(PROMPT, config, resume=edited)
    with pytest.raises(ConfigError, match="takes the Generation a failed generation left"):
        local_tuner.generate(PROMPT, config, resume=partial.to_dict())
    bad = Generation("x", [-1], "error")
    with pytest.raises(ConfigError, match="token_ids are not all ids"):
        local_tuner.generate(PROMPT, config, resume=bad)


# -- against a real vLLM server, through the fault proxy ---------------------------------------

READ_TIMEOUT_S = 3.0
HANG_S = READ_TIMEOUT_S + 1.5


def retry_after_date(seconds: float) -> str:
    import email.utils

    return email.utils.formatdate(time.time() + seconds, usegmt=True)


@pytest.fixture(scope="module")
def proxy(servers):
    upstream = servers["full"].root_url.removeprefix("http://")
    with FaultProxy(upstream) as p:
        yield p


def tuner_via(url: str, tiny_models, **options) -> ProxyTuner:
    options = {"timeout": httpx.Timeout(READ_TIMEOUT_S, connect=2.0), "max_retries": 3} | options
    base = connect("vllm", url, BASE_NAME, **options)
    return ProxyTuner(base, tiny_models["expert"], tiny_models["anti_expert"], device="cpu")


@pytest.fixture(scope="module")
def faulty(proxy, tiny_models):
    """A tuner whose base is the vLLM server behind the fault proxy."""
    with tuner_via(f"{proxy.url}/v1", tiny_models) as t:
        yield t


SPECULATE = ["off", "base"]


@pytest.fixture(scope="module")
def clean(proxy, faulty):
    """The fault-free greedy generation, per speculation mode."""
    proxy.schedule()
    return {s: faulty.generate(PROMPT, config(s)) for s in SPECULATE}


def config(speculate: str) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=N, base_k=20, speculate=speculate)


def status(code: int, **headers: str) -> Fault:
    return Fault("status", status=code, headers=tuple(headers.items()))


# (name, fault, the least time the client must wait: what the server named)
TRANSIENT = [
    ("drop connection", Fault("drop"), 0),
    ("reset mid-response", Fault("reset"), 0),
    ("hang past the read timeout", Fault("hang", seconds=HANG_S), READ_TIMEOUT_S),
    ("500", status(500), 0),
    ("502", status(502), 0),
    ("503", status(503), 0),
    ("429, no Retry-After", status(429), 0),
    ("429, Retry-After 1 s", status(429, **{"Retry-After": "1"}), 1.0),
    ("503, retry-after-ms 1500", status(503, **{"retry-after-ms": "1500"}), 1.5),
    ("429, Retry-After HTTP date", "date", 0.9),
    ("truncated JSON", Fault("truncate"), 0),
    ("malformed JSON", Fault("malformed"), 0),
    ("NaN logprobs", Fault("nan"), 0),
    ("missing logprobs", Fault("missing"), 0),
]


@pytest.mark.integration
@pytest.mark.parametrize("speculate", SPECULATE)
@pytest.mark.parametrize(
    ("fault", "waits"), [r[1:] for r in TRANSIENT], ids=[r[0] for r in TRANSIENT]
)
def test_a_transient_fault_is_recovered_from(proxy, faulty, clean, fault, waits, speculate):
    if fault == "date":  # an HTTP date has whole seconds: 2 s from now is 1-2 s from now
        fault = status(429, **{"Retry-After": retry_after_date(2)})
    proxy.schedule([PASS, fault])  # the second request of the generation
    started = time.monotonic()
    got = faulty.generate(PROMPT, config(speculate))
    took = time.monotonic() - started
    assert got.token_ids == clean[speculate].token_ids
    assert got.text == clean[speculate].text
    assert got.finish_reason == clean[speculate].finish_reason and got.error is None
    assert proxy.counts()[str(fault)] == 1, proxy.counts()
    # Every request the generation made, and the one retried.
    assert len(proxy.records) == clean[speculate].usage.requests + 1
    assert took >= waits


# (name, the fault every request gets from the third on, the error, what its message says)
PERSISTENT = [
    ("503 forever", status(503), ServerError, "HTTP 503: injected 503 (after 4 attempts"),
    ("429 forever", status(429, **{"Retry-After": "0"}), RateLimitError, "HTTP 429"),
    ("drop forever", Fault("drop"), APIConnectionError, "could not connect after 4 attempts"),
    ("reset forever", Fault("reset"), APIConnectionError, "could not connect after 4 attempts"),
    ("truncated forever", Fault("truncate"), ResponseFormatError, "not JSON"),
    ("NaN forever", Fault("nan"), ResponseFormatError, "holds NaN where a number should be"),
    ("missing forever", Fault("missing"), ResponseFormatError, "returned no top logprobs"),
    ("400, not retried", status(400), BadRequestError, "HTTP 400: injected 400"),
    ("501, not retried", status(501), ServerError, "HTTP 501: injected 501"),
]


@pytest.mark.integration
@pytest.mark.parametrize(
    ("fault", "error", "message"), [r[1:] for r in PERSISTENT], ids=[r[0] for r in PERSISTENT]
)
def test_a_lasting_fault_fails_cleanly_and_the_generation_resumes(
    proxy, faulty, clean, fault, error, message
):
    want = clean["off"]
    proxy.schedule([PASS, PASS], then=fault)
    with pytest.raises(error) as info:
        faulty.generate(PROMPT, config("off"))
    assert message in str(info.value)
    partial = info.value.partial
    assert partial.finish_reason == "error" and partial.error == str(info.value)
    assert partial.token_ids == want.token_ids[:2]
    assert want.text.startswith(partial.text)
    retried = 1 if error in (BadRequestError,) or "501" in message else 4
    assert proxy.counts()[str(fault)] == retried
    proxy.schedule()
    resumed = faulty.generate(PROMPT, config("off"), resume=partial)
    assert resumed.token_ids == want.token_ids and resumed.text == want.text


@pytest.mark.integration
def test_a_hung_server_never_hangs_the_client(proxy, tiny_models, clean):
    hang = Fault("hang", seconds=60)
    # Bounded by attempts: 2 read timeouts and a backoff.
    with tuner_via(f"{proxy.url}/v1", tiny_models, max_retries=1) as t:
        proxy.schedule([PASS], then=hang)
        started = time.monotonic()
        with pytest.raises(APITimeoutError, match="no answer within the timeout after 2 attempts"):
            t.generate(PROMPT, config("off"))
        assert time.monotonic() - started < 2 * READ_TIMEOUT_S + 2
    # Bounded by time: max_retry_time cuts the third read timeout short.
    with tuner_via(f"{proxy.url}/v1", tiny_models, max_retries=10, max_retry_time=7.0) as t:
        proxy.schedule([PASS], then=hang)
        started = time.monotonic()
        with pytest.raises(APITimeoutError) as info:
            t.generate(PROMPT, config("off"))
        assert time.monotonic() - started < 7.0 + 1.5
        assert info.value.partial.token_ids == clean["off"].token_ids[:1]
    # A server that names a wait longer than the time left: given up at once, not slept on.
    with tuner_via(f"{proxy.url}/v1", tiny_models, max_retry_time=5.0) as t:
        proxy.schedule([PASS], then=status(503, **{"Retry-After": "30"}))
        started = time.monotonic()
        with pytest.raises(ServerError):
            t.generate(PROMPT, config("off"))
        assert time.monotonic() - started < 5.0 + 1.5
    proxy.schedule()


@pytest.mark.integration
def test_the_stream_yields_what_it_had_before_the_error(proxy, faulty, clean):
    proxy.schedule([PASS] * 4, then=status(503))
    stream = faulty.stream(PROMPT, config("off"))
    pieces = []
    with pytest.raises(ServerError) as info:
        for piece in stream:
            pieces.append(piece)
    assert "".join(pieces) == info.value.partial.text
    assert info.value.partial.token_ids == clean["off"].token_ids[:4]
    proxy.schedule()
    rest = "".join(faulty.stream(PROMPT, config("off"), resume=info.value.partial))
    assert "".join(pieces) + rest == clean["off"].text


def _kill(server) -> None:
    """SIGKILL the server's whole process group, as a crash would."""
    os.killpg(server.process.pid, signal.SIGKILL)
    server.process.wait(timeout=30)
    server.process = None


@pytest.mark.integration
def test_the_server_killed_mid_generation_and_restarted(tiny_models, tmp_path):
    from scripts.vllm_server import VLLMServer

    log = tmp_path / "vllm.log"

    def serve(port=None):
        return VLLMServer(
            tiny_models["base"], BASE_NAME, port=port, max_logprobs=20, log_path=log
        ).start()

    server = serve()
    try:
        url, port = server.base_url, server.port
        with tuner_via(url, tiny_models, max_retries=2) as t:
            want = t.generate(PROMPT, config("off"))
            # Killed with nobody there to bring it back: a clean error with the partial.
            stream = t.stream(PROMPT, config("off"))
            for _ in zip(range(3), stream, strict=False):
                pass
            _kill(server)
            with pytest.raises(APIConnectionError, match="could not connect after 3 attempts") as e:
                list(stream)
            partial = e.value.partial
            assert partial.token_ids == want.token_ids[: len(partial.token_ids)]
            assert len(partial.token_ids) >= 3
            server = serve(port)
            resumed = t.generate(PROMPT, config("off"), resume=partial)
            assert resumed.token_ids == want.token_ids and resumed.text == want.text
        # Killed and brought back while the client retries: it never notices.
        with tuner_via(url, tiny_models, max_retries=60, max_retry_time=180.0) as t:
            stream = t.stream(PROMPT, config("off"))
            for _ in zip(range(3), stream, strict=False):
                pass
            _kill(server)
            # Launched from this thread (a server dies with the thread that launched it), not
            # waited for: the generation's retries wait for it.
            server = VLLMServer(
                tiny_models["base"], BASE_NAME, port=port, max_logprobs=20, log_path=log
            )
            server.launch()
            list(stream)
            assert server.poll_ready()
            assert stream.generation.token_ids == want.token_ids
            assert stream.generation.finish_reason == want.finish_reason
    finally:
        server.stop()


# -- the CLI: a failed run's --json output resumes ---------------------------------------------


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "proxyclient.cli", "generate", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.integration
def test_the_cli_resumes_a_failed_run_from_its_json(proxy, tiny_models, tmp_path):
    args = [
        "--api", "vllm", "--base-url", f"{proxy.url}/v1", "--base-model", BASE_NAME,
        "--expert", str(tiny_models["expert"]), "--anti-expert", str(tiny_models["anti_expert"]),
        "--max-new-tokens", str(N), "--base-k", "20", "--threads", "1",
        "--speculate", "off", "--max-retries", "1", "--timeout", str(READ_TIMEOUT_S),
    ]  # fmt: skip
    proxy.schedule()
    whole = cli(*args, "--prompt", PROMPT, "--json")
    assert whole.returncode == 0, whole.stderr
    want = json.loads(whole.stdout)

    proxy.schedule([PASS] * 5, then=status(503))
    failed = cli(*args, "--prompt", PROMPT, "--json")
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert "HTTP 503: injected 503 (after 2 attempts" in failed.stderr
    record = json.loads(failed.stdout)
    assert record["finish_reason"] == "error" and record["token_ids"] == want["token_ids"][:5]
    assert (
        record["resume"]["prompt"] == PROMPT and record["resume"]["config"]["max_new_tokens"] == N
    )
    saved = tmp_path / "failed.json"
    saved.write_text(failed.stdout)

    proxy.schedule()
    resumed = cli(*args, "--resume", str(saved), "--json")
    assert resumed.returncode == 0, resumed.stderr
    got = json.loads(resumed.stdout)
    assert got["token_ids"] == want["token_ids"] and got["text"] == want["text"]
    assert got["usage"]["requests"] == record["usage"]["requests"] + N - 5
    printed = cli(*args, "--resume", str(saved))  # as text: the whole text, as if never failed
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == want["text"] + ("" if want["text"].endswith("\n") else "\n")
