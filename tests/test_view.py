"""The per-token view (proxyclient/view.py), `generate --html` and `view` (in-process, against the
OpenAI-dialect fixture: its page holds the Python API's trace) and the server's `GET /` playground
page. That the pages draw and react in a browser: test_browser.py (slow)."""

from __future__ import annotations

import asyncio
import html
import json
import math
import re

import httpx
import pytest

from proxyclient import GenerationConfig, ProxyTuner, connect, view
from proxyclient.cli import _parser, main
from proxyclient.result import Alternative, Generation, TokenTrace, Usage
from proxyclient.server import create_app
from tests.support.dialect_servers import DialectServer
from tests.support.local_base import LocalBase

KEY = "sk-view-test-0123456789"
CLIENT_KEY = "sk-client-view-0123456789"
PROMPT = "def main():"


def trace(text: str, logprob: float, base: float | None, **extra) -> TokenTrace:
    return TokenTrace(
        token_id=extra.pop("token_id", 7),
        text=text,
        logprob=logprob,
        base_logprob=base,
        expert_logprob=extra.pop("expert", -0.5),
        anti_logprob=extra.pop("anti", -1.5),
        top=extra.pop("top", [Alternative(7, text, logprob)]),
        token_bytes=list(text.encode()),
    )


def page_data(page: str) -> dict:
    """The JSON a page draws (its proxyview-data script)."""
    found = re.search(r'<script type="application/json" id="proxyview-data">(.*?)</script>', page)
    assert found, "no data script in the page"
    return json.loads(found.group(1))


# -- the data and the rules ---------------------------------------------------------------------


def test_changed_is_known_from_the_base_top1_or_from_what_the_logprob_proves():
    assert view.changed({"token_id": 3, "base_top": {"token_id": 4, "text": "x"}}) is True
    assert view.changed({"token_id": 3, "base_top": {"token_id": 3, "text": "x"}}) is False
    assert view.changed({"text": "a", "base_top": {"text": "a", "token_id": None}}) is False
    assert view.changed({"base": None}) is True  # outside the base's top-k
    assert view.changed({"base": -9999.0}) is True  # the server's stand-in for -inf
    assert view.changed({"base": math.log(0.6)}) is False  # over half the mass: its top-1
    assert view.changed({"base": math.log(0.4)}) is None  # another token may rank above it


def test_shift_is_tuned_minus_base():
    assert view.shift({"logprob": -0.25, "base": -2.0}) == pytest.approx(1.75)
    assert view.shift({"logprob": -3.0, "base": -0.5}) == pytest.approx(-2.5)
    assert view.shift({"logprob": -0.25, "base": None}) is None


def test_view_data_summary_counts_tokens_changes_requests_and_billed_tokens():
    steps = [
        trace(" Paris", -0.1, math.log(0.3)),  # unknown
        trace("\n", -0.05, math.log(0.9)),  # the base's own top-1
        trace(" x", -1.0, None),  # outside the base's top-k: changed
        trace(" y", -float("inf"), -float("inf")),
    ]
    usage = Usage(requests=3, prompt_tokens=30, completion_tokens=4, base_completion_tokens=5)
    data = view.view_data(steps, usage=usage, settings={"alpha": 1.5})
    assert data["summary"] == {
        "tokens": 4,
        "changed": 2,
        "unknown": 1,
        "share_changed": pytest.approx(2 / 3),
        "requests": 3,
        "billed_tokens": 35,
    }
    assert view.summary_line(data) == (
        "4 tokens · 2 changed (67%) · 1 undetermined (no base top-1 in the trace) · 3 requests · "
        "35 billed tokens"
    )
    first = data["tokens"][0]
    assert first["text"] == " Paris" and first["expert"] == -0.5 and first["anti"] == -1.5
    assert first["top"] == [[" Paris", -0.1]]
    assert data["tokens"][3]["logprob"] == view.NEG_INF  # -inf kept JSON-able
    json.dumps(data, allow_nan=False)  # no inf or nan left anywhere


def test_summary_without_usage_says_nothing_of_requests():
    data = view.view_data([trace("a", -0.1, math.log(0.2))])
    assert view.summary_line(data) == (
        "1 tokens · changed: unknown · 1 undetermined (no base top-1 in the trace)"
    )


def test_the_page_is_self_contained_and_its_data_cannot_close_the_script():
    nasty = "</script><script>alert(1)</script><!--"
    data = view.view_data(
        [trace(nasty, -0.5, -1.0), trace(" &amp;", -0.2, None)],
        prompt=f"Q: {nasty}",
        usage=Usage(requests=2),
    )
    page = view.render(data)
    assert page.startswith("<!DOCTYPE html>")
    for external in ("http://", "https://", "<link", " src=", "@import", "url("):
        assert external not in page
    assert page.count("</script>") == 3  # the data, the view's code, the call: nothing injected
    assert "ProxyView.render" in page and view.stylesheet() in page
    assert page_data(page) == json.loads(json.dumps(data))
    assert html.escape(f"Q: {nasty}") in page  # the prompt, escaped
    assert html.escape(view.summary_line(data)) in page  # readable without scripts too


# -- the CLI ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_models):
    with DialectServer("openai", tiny_models["base"], api_key=KEY) as running:
        yield running


def generate_cli(server, tiny_models, *extra: str) -> int:
    return main([
        "generate", "--api", "openai", "--base-url", server.base_url, "--base-model", "tiny-base",
        "--base-api-key", KEY, "--expert", str(tiny_models["expert"]),
        "--anti-expert", str(tiny_models["anti_expert"]), "--device", "cpu", "--threads", "1",
        "--max-new-tokens", "8", "--prompt", PROMPT, "--alpha", "1.5", *extra,
    ])  # fmt: skip


@pytest.fixture(scope="module")
def expected(server, tiny_models):
    base = connect(
        "openai", server.base_url, "tiny-base", api_key=KEY, tokenizer=str(tiny_models["base"])
    )
    with ProxyTuner(base, tiny_models["expert"], tiny_models["anti_expert"], device="cpu") as t:
        return t.generate(PROMPT, max_new_tokens=8, alpha=1.5, trace=3)


def test_generate_html_writes_the_traced_generation(
    server, tiny_models, expected, tmp_path, capsys
):
    page, trace_file = tmp_path / "view.html", tmp_path / "trace.jsonl"
    code = generate_cli(
        server, tiny_models, "--html", str(page), "--trace", str(trace_file), "--trace-top", "3"
    )
    assert code == 0, capsys.readouterr().err
    assert capsys.readouterr().out == expected.text + ("" if expected.text.endswith("\n") else "\n")
    data = page_data(page.read_text(encoding="utf-8"))
    assert "".join(t["text"] for t in data["tokens"]) == expected.text
    assert len(data["tokens"]) == len(expected.steps)
    for token, step in zip(data["tokens"], expected.steps, strict=True):
        assert token["logprob"] == pytest.approx(step.logprob, abs=1e-5)
        assert token["base"] == pytest.approx(step.base_logprob, abs=1e-5)
        assert token["expert"] == pytest.approx(step.expert_logprob, abs=1e-5)
        assert [a[0] for a in token["top"]] == [a.text for a in step.top]
    assert data["usage"]["requests"] == expected.usage.requests
    billed = expected.usage.prompt_tokens + expected.usage.base_completion_tokens
    assert data["summary"]["billed_tokens"] == billed
    assert data["settings"] == {"alpha": 1.5, "k": "default", "unseen": "residual"}
    assert PROMPT in data["prompt"]

    # The same tokens from the --trace file, by `proxyclient view`.
    out = tmp_path / "from-trace.html"
    assert main(["view", str(trace_file), "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().err
    again = page_data(out.read_text(encoding="utf-8"))
    assert again["tokens"] == data["tokens"]
    assert again["usage"] is None  # a --trace file holds no usage


def test_view_reads_json_output_with_its_usage(tmp_path, capsys):
    generation = Generation(
        "ab",
        [1, 2],
        "length",
        usage=Usage(requests=2, prompt_tokens=10, completion_tokens=2, base_completion_tokens=2),
        steps=[trace("a", -0.1, None), trace("b", -0.2, -0.01)],
    )
    source = tmp_path / "run.json"
    source.write_text(json.dumps(generation.to_dict()) + "\n")
    assert main(["view", str(source)]) == 0  # default: beside it, .html
    data = page_data((tmp_path / "run.html").read_text(encoding="utf-8"))
    assert view.summary_line(data) == "2 tokens · 1 changed (50%) · 2 requests · 12 billed tokens"
    assert main(["view", str(source), "-o", "-"]) == 0
    assert capsys.readouterr().out.startswith("<!DOCTYPE html>")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json\n", "not JSON lines"),
        ('{"text": "ab", "steps": null}\n', "has no per-token trace"),
        ('{"a": 1}\n{"b": 2}\n', "neither a --trace file nor"),
    ],
)
def test_view_refuses_what_is_no_trace_in_one_line(tmp_path, capsys, content, message):
    source = tmp_path / "bad.jsonl"
    source.write_text(content)
    assert main(["view", str(source)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "bad.html").exists()


# -- the server's playground --------------------------------------------------------------------


def call(app, method: str, path: str, **options) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, timeout=60, **options)

    return asyncio.run(go())


@pytest.fixture(scope="module")
def tuner(tiny_models, hf_models):
    base = LocalBase(hf_models["base"], drafts=True)
    with ProxyTuner(base, tiny_models["expert"], tiny_models["anti_expert"], device="cpu") as t:
        yield t


def test_get_root_is_the_playground_and_its_key_stays_with_the_api(tuner):
    defaults = GenerationConfig(max_new_tokens=12, alpha=0.75, base_k=20)
    app = create_app(tuner, served_model_name="tiny-proxy", api_key=CLIENT_KEY, defaults=defaults)
    page = call(app, "GET", "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "connect-src 'self'" in page.headers["content-security-policy"]
    text = page.text
    assert CLIENT_KEY not in text
    assert view.script() in text and view.stylesheet() in text  # the same view as --html
    settings = json.loads(re.search(r'id="pg-settings">(.*?)</script>', text).group(1))
    assert settings["model"] == "tiny-proxy" and settings["needs_key"] is True
    assert (settings["alpha"], settings["base_k"], settings["max_tokens"]) == (0.75, 20, 12)
    assert 'id="pg-key"' in text and "sessionStorage" in text and "localStorage" not in text
    for external in ("http://", "https://", " src="):
        assert external not in text
    body = {"model": "tiny-proxy", "prompt": PROMPT, "max_tokens": 2}
    assert call(app, "POST", "/v1/completions", json=body).status_code == 401


def test_no_playground_leaves_get_root_unanswered(tuner):
    app = create_app(tuner, served_model_name="tiny-proxy", playground=False)
    assert call(app, "GET", "/").status_code == 404
    assert call(app, "GET", "/health").status_code == 200


def test_serve_flag_no_playground():
    common = ["serve", "--base-model", "m", "--expert", "e", "--anti-expert", "a"]
    assert _parser().parse_args(common).playground is True
    assert _parser().parse_args([*common, "--no-playground"]).playground is False
