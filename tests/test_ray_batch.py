"""`proxyclient batch --ray`: the same job on Ray actors — same lines, same resume rules.

End to end on a local Ray instance (2 CPU workers) against the real vLLM server: the output
equals the single-process run's for greedy decoding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxyclient.batch import OUTPUT_FIELDS, BatchItem
from proxyclient.cli import main
from proxyclient.errors import ConfigError
from proxyclient.ray_batch import _decode_item, _encode_item, import_ray
from tests.support.constants import BASE_NAME


def test_items_cross_to_the_actors_unchanged():
    for item in (
        BatchItem(3, "q1", "def f():", {"stop": ("\n\n", "#"), "max_new_tokens": 4}),
        BatchItem(9, 17, "x = [", {}),
    ):
        assert _decode_item(_encode_item(item)) == item


def test_ray_flags_need_ray(tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text('{"custom_id": "a", "prompt": "x"}\n')
    command = [
        "batch", "--base-url", "http://127.0.0.1:9/v1", "--base-model", "m",
        "--expert", "e", "--anti-expert", "a", "--input", str(tmp_path / "in.jsonl"),
        "--output", str(tmp_path / "out.jsonl"),
    ]  # fmt: skip
    assert main([*command, "--workers", "2", "--gpus-per-worker", "1"]) == 2
    assert "--workers, --gpus-per-worker only work with --ray" in capsys.readouterr().err
    assert main([*command, "--ray", "--gpus-per-worker", "-1"]) == 2
    assert "--gpus-per-worker must be >= 0, got -1.0" in capsys.readouterr().err


def test_without_ray_installed_the_error_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r"pip install 'proxyclient\[ray\]'"):
        import_ray()


PROMPTS = {
    "p0": "def main():",
    1: "import os\n",
    "p2": "class Foo:",
    "p3": "x = [",
    "p4": "# a",
    "p5": "for i in range(",
    "p6": "return",
}


def _run(command: list[str]) -> subprocess.CompletedProcess:
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    # Quiet in a pipe: Ray's own progress and logs stay out of stderr.
    assert "logging_progress" not in run.stderr and "Running Dataset" not in run.stderr
    assert run.stderr.splitlines()[-1].startswith("batch: "), run.stderr
    return run


def _lines(path: Path) -> dict:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    by_id = {line["custom_id"]: line for line in lines}
    assert len(by_id) == len(lines), "more than one line for an id"
    assert all(tuple(line) == OUTPUT_FIELDS for line in lines)
    return by_id


@pytest.mark.integration
def test_two_ray_workers_write_what_one_process_writes(servers, tiny_models, tmp_path):
    records = [{"custom_id": i, "prompt": p} for i, p in PROMPTS.items()]
    records[2]["max_new_tokens"] = 3  # a per-line override travels to the actor
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    def command(output: Path, *extra: str) -> list[str]:
        return [
            sys.executable, "-m", "proxyclient", "batch",
            "--base-url", servers["full"].base_url, "--base-model", BASE_NAME,
            "--expert", str(tiny_models["expert"]),
            "--anti-expert", str(tiny_models["anti_expert"]),
            "--threads", "1", "--device", "cpu", "--max-new-tokens", "10",
            "--input", str(tmp_path / "in.jsonl"), "--output", str(output), *extra,
        ]  # fmt: skip

    single = _run(command(tmp_path / "single.jsonl"))
    assert single.returncode == 0, single.stderr
    expected = _lines(tmp_path / "single.jsonl")
    assert set(expected) == set(PROMPTS) and all(v["error"] is None for v in expected.values())

    # The Ray run starts from an output that holds one finished line (kept as it is, not rerun)
    # and one failed line (retried): the resume rules are the single-process run's.
    kept = {**expected["p0"], "text": "kept as written"}
    failed = {**expected["p3"], "token_ids": [], "text": "", "error": "HTTP 503: try again"}
    ray_out = tmp_path / "ray.jsonl"
    ray_out.write_text(json.dumps(kept) + "\n" + json.dumps(failed) + "\n")
    run = _run(command(ray_out, "--ray", "--workers", "2", "--concurrency", "2"))
    assert run.returncode == 0, run.stderr
    assert f"batch: {len(PROMPTS) - 1} done, 1 skipped as already done;" in run.stderr
    got = _lines(ray_out)
    assert set(got) == set(PROMPTS)
    assert got["p0"] == kept
    for custom_id in PROMPTS:
        if custom_id == "p0":
            continue
        for field in ("text", "token_ids", "finish_reason", "error"):
            assert got[custom_id][field] == expected[custom_id][field], (custom_id, field)
    assert len(got["p2"]["token_ids"]) == 3
