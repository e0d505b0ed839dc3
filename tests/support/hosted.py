"""Helpers the tests of hosted dialects share (test_deepseek.py, test_gemini.py)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys


def ids_of(tokenizer, *texts: str) -> list[int]:
    """Ids from the HF tokenizer's own token strings (byte-level: a space is "Ġ")."""
    ids = [tokenizer.inner.convert_tokens_to_ids(t) for t in texts]
    assert None not in ids and tokenizer.inner.unk_token_id not in ids, texts
    return ids


def run_step(base, prompt, k: int = 5):
    """One ``top_logprobs`` step of adapter ``base``, which is closed afterwards."""
    import asyncio

    async def go():
        try:
            return await base.top_logprobs(prompt, k)
        finally:
            await base.aclose()

    return asyncio.run(go())


@contextlib.contextmanager
def connected(api: str, server, tokenizer, model: str, **options):
    """An adapter of dialect ``api`` on ``server`` (a DialectServer), closed on leaving."""
    import asyncio

    from proxyclient import connect

    base = connect(api, server.base_url, model, tokenizer=tokenizer, **options)
    try:
        yield base
    finally:
        asyncio.run(base.aclose())


def dialect_tuner(api: str, server, tiny_models, tokenizer, model: str, **options):
    """A CPU ProxyTuner, the tiny expert and anti-expert steering dialect ``api`` on ``server``."""
    from proxyclient import ProxyTuner, connect

    base = connect(api, server.base_url, model, tokenizer=tokenizer, **options)
    return ProxyTuner(base, tiny_models["expert"], tiny_models["anti_expert"], device="cpu")


def dialect_cli(api: str, key_env: str, key: str, tiny_models, *args: str):
    """``python -m proxyclient.cli ARGS --api API`` (the tiny base's tokenizer) with only the
    key in ``key_env``."""
    env = dict(os.environ, **{key_env: key})
    env.pop("PROXYCLIENT_API_KEY", None)
    return subprocess.run(
        [sys.executable, "-m", "proxyclient.cli", *args, "--api", api,
         "--base-tokenizer", str(tiny_models["base"])],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip


def assert_one_clear_error(run, expected: str) -> str:
    """The CLI run exited 2 with one ``proxyclient: error:`` line, holding ``expected``, and no
    traceback; returns that line."""
    assert run.returncode == 2, run.stdout
    lines = [line for line in run.stderr.splitlines() if line.startswith("proxyclient: error:")]
    assert len(lines) == 1 and expected in lines[0], run.stderr
    assert "Traceback" not in run.stderr
    return lines[0]


def alpha_0_text(tuner, prompt: str, n: int, k: int, speculate: str) -> str:
    """What ``tuner`` (closed afterwards) generates greedily at alpha 0, the base alone, with
    top-k ``k`` and `restrict`."""
    with tuner:
        return tuner.generate(
            prompt, max_new_tokens=n, alpha=0.0, unseen="restrict", base_k=k,
            speculate=speculate,
        ).text  # fmt: skip


def headers_sent(server, tuner, prompt: str, k: int) -> list[dict]:
    """The headers of each request ``server`` (a DialectServer) gets while ``tuner`` (closed
    afterwards) generates two tokens."""
    server.requests.clear()
    with tuner:
        tuner.generate(prompt, max_new_tokens=2, base_k=k)
    return [h for _, h, _ in server.requests]
