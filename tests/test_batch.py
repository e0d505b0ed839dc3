"""`proxyclient batch`: input validation, the output's resume rules, the bounded runner, and the CLI
end to end against an in-process OpenAI-dialect base (tests/support/dialect_servers.py) with the
tiny models: results equal `ProxyTuner.generate`, reruns skip what is done and retry what failed,
and a SIGKILL mid-run loses nothing.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from proxyclient import GenerationConfig, ProxyTuner, connect
from proxyclient.batch import (
    OUTPUT_FIELDS,
    BatchItem,
    BatchStats,
    Progress,
    ResultWriter,
    parse_input,
    plan_resume,
    resume,
    run_batch,
)
from proxyclient.cli import main
from proxyclient.errors import BaseModelError, ConfigError
from proxyclient.result import Generation, Usage
from tests.support.dialect_servers import DialectServer

KEY = "sk-batch-test-0123456789"
DEFAULTS = GenerationConfig(max_new_tokens=8)


def lines_of(*records: object) -> list[str]:
    return [r if isinstance(r, str) else json.dumps(r) for r in records]


def result(custom_id: object, error: str | None = None) -> bytes:
    line = {"custom_id": custom_id, "text": "t", "token_ids": [1], "finish_reason": "length"}
    return (json.dumps(line | {"usage": {}, "error": error}) + "\n").encode()


# -- input validation -------------------------------------------------------------------------


def test_valid_lines_carry_their_overrides():
    items, malformed = parse_input(
        lines_of(
            {"custom_id": "a", "prompt": "x"},
            "",  # blank lines are skipped, but still counted
            {"custom_id": 7, "prompt": "y", "max_new_tokens": 3, "stop": ["\n", "."]},
            {"custom_id": "c", "prompt": "z", "temperature": 1, "seed": None, "unseen": "floor"},
        ),
        DEFAULTS,
    )
    assert malformed == []
    assert [(i.line, i.custom_id) for i in items] == [(1, "a"), (3, 7), (4, "c")]
    assert items[0].config(DEFAULTS) == DEFAULTS
    assert items[1].config(DEFAULTS).max_new_tokens == 3
    assert items[1].config(DEFAULTS).stop == ("\n", ".")
    assert items[2].config(DEFAULTS).temperature == 1.0
    assert items[2].config(DEFAULTS).max_new_tokens == 8  # the command line's


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "a JSON list, not an object"),
        ('{"prompt": "x"}', "no custom_id"),
        (
            '{"custom_id": true, "prompt": "x"}',
            "custom_id must be a non-empty string or an integer",
        ),
        ('{"custom_id": 1.5, "prompt": "x"}', "custom_id must be"),
        ('{"custom_id": "", "prompt": "x"}', "custom_id must be"),
        ('{"custom_id": "a"}', "no prompt"),
        ('{"custom_id": "a", "prompt": 3}', "prompt must be a string, got 3"),
        ('{"custom_id": "a", "prompt": "x", "max_tokens": 3}', "unknown field 'max_tokens'"),
        ('{"custom_id": "a", "prompt": "x", "max_new_tokens": 0}', "max_new_tokens must be a posi"),
        ('{"custom_id": "a", "prompt": "x", "max_new_tokens": 2.0}', "must be an integer, got 2.0"),
        ('{"custom_id": "a", "prompt": "x", "temperature": "hot"}', 'be a number, got "hot"'),
        ('{"custom_id": "a", "prompt": "x", "seed": "1"}', "seed must be null or an integer"),
        ('{"custom_id": "a", "prompt": "x", "unseen": "all"}', "unseen must be one of"),
        ('{"custom_id": "a", "prompt": "x", "stop": [1]}', "a string or a list of strings"),
        ('{"custom_id": "a", "prompt": "x", "expert_chat_template": 1}', "true or false"),
    ],
)
def test_a_malformed_line_is_reported_with_its_number_and_skipped(line, message):
    items, malformed = parse_input(
        lines_of({"custom_id": "ok", "prompt": "fine"}, line, {"custom_id": "ok2", "prompt": "y"}),
        DEFAULTS,
    )
    assert [i.custom_id for i in items] == ["ok", "ok2"]
    (bad,) = malformed
    assert bad.line == 2
    assert message in bad.message, bad.message
    assert str(bad).startswith("line 2: ")


def test_a_repeated_id_names_the_first_line_and_bytes_must_be_utf8():
    items, malformed = parse_input(
        [
            b'\xef\xbb\xbf{"custom_id": 1, "prompt": "x"}',  # a BOM on line 1 is fine
            b'{"custom_id": "1", "prompt": "y"}',  # "1" is not 1
            b'{"custom_id": 1, "prompt": "z"}\r',
            b'{"custom_id": "b", "prompt": "\xff"}',
        ],
        DEFAULTS,
    )
    assert [i.custom_id for i in items] == [1, "1"]
    assert [m.line for m in malformed] == [3, 4]
    assert "custom_id 1 repeats line 1's" in malformed[0].message
    assert "not UTF-8" in malformed[1].message


# -- output and resume ------------------------------------------------------------------------


def test_plan_resume_skips_done_retries_errors_and_cuts_a_torn_line():
    data = (
        result("a")
        + result("b", error="HTTP 500")
        + result(3)
        + result("gone", error="x")  # not in this input: kept as it is
        + b"\n"
        + result("c", error="first try")
        + result("c")  # a later line supersedes an earlier one
        + b'{"custom_id": "d", "te'  # torn: the process died mid-write
    )
    plan = plan_resume(data, ["a", "b", 3, "c", "d"])
    assert plan.done == {"a", 3, "c"}
    assert plan.retry == {"b"}
    assert plan.lines == (result("a"), result(3), result("gone", error="x"), result("c"))
    assert plan.rewrite
    assert plan.torn_at == data.rfind(b"\n") + 1


def test_plan_resume_of_a_tidy_file_changes_nothing():
    data = result("a") + result("b")
    plan = plan_resume(data, ["a", "b", "c"])
    assert plan.done == {"a", "b"} and not plan.retry
    assert not plan.rewrite and plan.torn_at is None
    assert plan_resume(b"", ["a"]).done == frozenset()


@pytest.mark.parametrize("line", [b"garbage\n", b'{"custom_id": "a"}\n', b"[1]\n"])
def test_a_whole_line_we_did_not_write_stops_the_job(line):
    with pytest.raises(ConfigError, match=r"out\.jsonl line 2 is not a result line"):
        plan_resume(result("a") + line + result("b"), ["a"], name="out.jsonl")


def test_resume_truncates_a_torn_tail_and_rewrites_without_retried_errors(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(result("a") + b'{"custom_id": "b", "text": "hal')
    assert resume(out, ["a", "b"]).done == {"a"}
    assert out.read_bytes() == result("a")  # whole lines only: appends start on a boundary

    out.write_bytes(result("a") + result("b", error="boom") + b'{"cus')
    plan = resume(out, ["a", "b"])
    assert plan.retry == {"b"}
    assert out.read_bytes() == result("a")  # b's retry will be its only line
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # no temporary file left

    missing = tmp_path / "new.jsonl"
    assert resume(missing, ["a"]).done == frozenset()
    assert not missing.exists()


def test_each_line_is_on_disk_as_soon_as_it_is_written(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(result("a"))
    with ResultWriter(out) as writer:
        writer.write({"custom_id": "b", "text": "ü\ud800", "error": None})  # a lone surrogate
        assert (
            out.read_bytes().splitlines()[1]
            == b'{"custom_id": "b", "text": "\\u00fc\\ud800", "error": null}'
        )
        writer.write({"custom_id": "c", "text": "日本", "error": None})
        assert json.loads(out.read_bytes().splitlines()[2])["text"] == "日本"


# -- runner, progress, summary ----------------------------------------------------------------


class FakeTuner:
    """agenerate() that takes a little while, counts how many run at once, fails on "fail"."""

    def __init__(self) -> None:
        self.running = self.most = 0

    async def agenerate(self, prompt: str, config: GenerationConfig) -> Generation:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await asyncio.sleep(0.2 if prompt == "slow" else 0.01)
            n = config.max_new_tokens
            usage = Usage(requests=n, completion_tokens=n)
            if prompt == "fail":
                error = BaseModelError("the base went away")
                error.partial = Generation("par", [1, 2], "error", usage=usage)
                raise error
            if prompt == "bug":
                raise RuntimeError("oops")
            return Generation(prompt.upper(), list(range(n)), "length", usage=usage)
        finally:
            self.running -= 1


class Collect:
    def __init__(self) -> None:
        self.lines: list[dict] = []

    def write(self, line: dict) -> None:
        self.lines.append(line)


def test_run_batch_bounds_concurrency_and_a_failure_sinks_nothing():
    prompts = ["slow", "fail", "bug", *[f"p{i}" for i in range(9)]]
    items = [
        BatchItem(i + 1, i, p, {"max_new_tokens": 2} if p == "p0" else {})
        for i, p in enumerate(prompts)
    ]
    tuner, out = FakeTuner(), Collect()
    stats = asyncio.run(run_batch(tuner, items, DEFAULTS, concurrency=3, output=out))
    assert tuner.most == 3
    assert sorted(line["custom_id"] for line in out.lines) == list(range(len(prompts)))
    assert all(tuple(line) == OUTPUT_FIELDS for line in out.lines)
    assert out.lines[-1]["custom_id"] == 0  # completion order: "slow" finished last
    by_id = {line["custom_id"]: line for line in out.lines}
    assert by_id[1]["error"] == "the base went away"
    assert (by_id[1]["text"], by_id[1]["token_ids"], by_id[1]["finish_reason"]) == (
        "par",
        [1, 2],
        "error",
    )
    assert by_id[2]["error"] == "RuntimeError: oops" and by_id[2]["token_ids"] == []
    assert by_id[3]["token_ids"] == [0, 1] and by_id[3]["error"] is None  # its override
    assert by_id[4] == {
        "custom_id": 4,
        "text": "P1",
        "token_ids": list(range(8)),
        "finish_reason": "length",
        "usage": by_id[4]["usage"],
        "error": None,
    }
    assert (stats.done, stats.failed) == (10, 2)
    assert stats.tokens == 8 * 9 + 2 + 8  # the failed one's partial counts, the bug's nothing


def test_progress_draws_only_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stats = BatchStats(done=1, tokens=40, requests=10)
    for stream, drawn in [(Terminal(), True), (io.StringIO(), False)]:
        progress = Progress(2, file=stream)
        progress.update(stats)
        progress.close()
        text = stream.getvalue()
        assert ("tok/s" in text and "req/s" in text and "1/2" in text) == drawn, text
        assert bool(text) == drawn


def test_the_summary_line():
    stats = BatchStats(done=37, failed=2, skipped=3, malformed=1, tokens=2560, requests=1024)
    stats.seconds = 31.2
    assert stats.summary() == (
        "batch: 37 done, 2 failed, 3 skipped as already done, 1 malformed line; 2,560 tokens in "
        "31.2 s, 82.1 tokens/s, 0.40 requests/token; fix the malformed lines and rerun the same "
        "command to retry"
    )
    assert BatchStats(skipped=4).summary() == "batch: 0 done, 4 skipped as already done"


# -- the CLI without models: usage errors and nothing to run ----------------------------------


def cli_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "batch", "--api", "openai", "--base-url", "http://127.0.0.1:9/v1", "--base-model", "m",
        "--expert", str(tmp_path / "nowhere"), "--anti-expert", str(tmp_path / "nowhere"),
        "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"), *extra,
    ]  # fmt: skip


def test_usage_errors_exit_2(tmp_path, capsys):
    assert main(cli_args(tmp_path)) == 2  # no input file
    assert "cannot read the input file" in capsys.readouterr().err
    (tmp_path / "in.jsonl").write_text('{"custom_id": "a", "prompt": "x"}\n')
    assert main(cli_args(tmp_path, "--max-new-tokens", "0")) == 2
    assert "--max-new-tokens must be a positive integer" in capsys.readouterr().err
    (tmp_path / "out.jsonl").write_text("not a result\n")
    assert main(cli_args(tmp_path)) == 2
    assert "line 1 is not a result line" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(cli_args(tmp_path, "--concurrency", "0"))
    assert exit_.value.code == 2


def test_nothing_to_run_loads_no_model(tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text('{"custom_id": "a", "prompt": "x"}\n\n{"prompt": "y"}\n')
    (tmp_path / "out.jsonl").write_bytes(result("a"))
    assert main(cli_args(tmp_path)) == 1  # the expert folder does not exist: never loaded
    err = capsys.readouterr().err.splitlines()
    assert err[0].endswith(
        "in.jsonl line 3: no custom_id; give each line a unique string or integer id; skipped"
    )
    assert err[1:] == [
        "batch: 0 done, 1 skipped as already done, 1 malformed line; fix the malformed lines "
        "and rerun the same command to run them"
    ]


# -- the CLI end to end -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_models):
    server = DialectServer("openai", tiny_models["base"], api_key=KEY).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reference(server, tiny_models):
    """Greedy ids of `ProxyTuner.generate`, as the CLI's tuner makes them (same tokenizer)."""
    base = connect(
        "openai",
        server.base_url,
        "tiny-base",
        api_key=KEY,
        tokenizer=str(tiny_models["anti_expert"]),
    )
    tuner = ProxyTuner(base, tiny_models["expert"], tiny_models["anti_expert"], device="cpu")
    cache: dict[tuple[str, int], list[int]] = {}

    def ids(prompt: str, max_new_tokens: int) -> list[int]:
        if (prompt, max_new_tokens) not in cache:
            generation = tuner.generate(prompt, DEFAULTS, max_new_tokens=max_new_tokens)
            cache[prompt, max_new_tokens] = generation.token_ids
        return cache[prompt, max_new_tokens]

    yield ids
    tuner.close()


def batch_command(server, tiny_models, tmp_path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "proxyclient", "batch", "--api", "openai",
        "--base-url", server.base_url, "--base-model", "tiny-base", "--base-api-key", KEY,
        "--expert", str(tiny_models["expert"]), "--anti-expert", str(tiny_models["anti_expert"]),
        "--threads", "1", "--device", "cpu", "--input", str(tmp_path / "in.jsonl"),
        "--output", str(tmp_path / "out.jsonl"), *extra,
    ]  # fmt: skip


def run_cli(command: list[str]) -> subprocess.CompletedProcess:
    run = subprocess.run(command, capture_output=True, text=True, timeout=120, env=dict(os.environ))
    # stderr is a pipe here: no progress bar, one summary line.
    assert "\r" not in run.stderr and "it/s" not in run.stderr and "tok/s" not in run.stderr
    assert [line for line in run.stderr.splitlines() if line.startswith("batch:")] == [
        run.stderr.splitlines()[-1]
    ], run.stderr
    return run


def outputs(tmp_path: Path) -> dict:
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    by_id = {line["custom_id"]: line for line in lines}
    assert len(by_id) == len(lines), "more than one line for an id"
    assert all(tuple(line) == OUTPUT_FIELDS for line in lines)
    return by_id


def requested_prompts(server, tokenizer) -> list[str]:
    texts = []
    for path, _headers, body in server.requests:
        if path == "/v1/completions":
            texts.append(tokenizer.decode(body["prompt"], skip_special_tokens=True))
    return texts


PROMPTS = {"p0": "def main():", 1: "import os\n", "p2": "class Foo:", "p3": "x = [", "p4": "# a"}


@pytest.mark.subprocess
def test_a_batch_runs_every_line_then_a_rerun_retries_only_the_failed(
    server, tiny_models, tmp_path, reference
):
    records = [{"custom_id": i, "prompt": p} for i, p in PROMPTS.items()]
    records[2]["max_new_tokens"] = 2  # a per-line override
    lines = lines_of(
        records[0], "{oops", *records[1:3], '{"custom_id": "p0", "prompt": "again"}', *records[3:]
    )
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    command = batch_command(server, tiny_models, tmp_path, "--max-new-tokens", "6")

    server.fail_next(400)  # one generation's first request fails (400: not retried)
    first = run_cli(command)
    assert first.returncode == 1, first.stderr
    assert "in.jsonl line 2: not JSON" in first.stderr
    assert 'in.jsonl line 5: custom_id "p0" repeats line 1\'s' in first.stderr
    assert "batch: 4 done, 1 failed, 2 malformed lines;" in first.stderr
    got = outputs(tmp_path)
    assert set(got) == set(PROMPTS)
    (failed,) = [i for i, line in got.items() if line["error"] is not None]
    assert "HTTP 400" in got[failed]["error"] and got[failed]["finish_reason"] == "error"
    for custom_id, line in got.items():
        if custom_id != failed:
            n = 2 if custom_id == "p2" else 6
            assert line["token_ids"] == reference(PROMPTS[custom_id], n), custom_id
            assert line["usage"]["completion_tokens"] == len(line["token_ids"])

    server.requests.clear()
    second = run_cli(command)
    assert second.returncode == 1, second.stderr  # the malformed lines are still there
    assert "batch: 1 done, 4 skipped as already done, 2 malformed lines;" in second.stderr
    decoded = requested_prompts(server, AutoTokenizer.from_pretrained(tiny_models["anti_expert"]))
    assert decoded and all(text.startswith(PROMPTS[failed]) for text in decoded)
    again = outputs(tmp_path)
    assert set(again) == set(PROMPTS) and all(line["error"] is None for line in again.values())
    n = 2 if failed == "p2" else 6
    assert again[failed]["token_ids"] == reference(PROMPTS[failed], n)
    assert {i: again[i] for i in got if i != failed} == {i: got[i] for i in got if i != failed}


@pytest.mark.subprocess
def test_sigkill_mid_run_then_rerun_loses_nothing(server, tiny_models, tmp_path, reference):
    prompts = {f"k{i}": f"def f{i}(x):" for i in range(8)}
    records = [{"custom_id": i, "prompt": p} for i, p in prompts.items()]
    (tmp_path / "in.jsonl").write_text("\n".join(lines_of(*records)) + "\n")
    command = batch_command(
        server, tiny_models, tmp_path, "--max-new-tokens", "16", "--concurrency", "2"
    )
    out = tmp_path / "out.jsonl"
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (out.exists() and out.read_bytes().count(b"\n") >= 1):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.005)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    written = out.read_bytes().count(b"\n")
    assert 1 <= written < len(prompts)  # killed mid-run
    with out.open("ab") as file:  # and as if mid-write, too
        file.write(b'{"custom_id": "k7", "text": "half a li')

    rerun = run_cli(command)
    assert rerun.returncode == 0, rerun.stderr
    assert "skipped as already done" in rerun.stderr
    assert out.read_bytes().endswith(b"}\n")
    got = outputs(tmp_path)
    assert set(got) == set(prompts)
    for custom_id, prompt in prompts.items():
        assert got[custom_id]["error"] is None
        assert got[custom_id]["token_ids"] == reference(prompt, 16), custom_id
