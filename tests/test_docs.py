"""Every block the READMEs mark runnable runs, as written, from the repository root.

A code block is runnable when the line right before it is the HTML comment ``<!-- runnable -->``
(invisible on GitHub), or ``<!-- runnable: background -->`` for a block that starts a server and
keeps it in the foreground. The block is a fenced block (```` ```python ```` runs with this
test's python; any other info string, or none, with bash) or an indented block (bash).

The runnable blocks of all the READMEs (DOCS, in that order) run in one bash session with
``set -euo pipefail``, the venv's ``bin`` first on ``PATH``, so a block sees what earlier ones
defined (the README's ``MODELS`` array) and the servers earlier ones started. A background block
runs in a process group of its own and must answer ``GET /health`` on the ``--port`` it names
within SERVER_START_S; the servers are stopped when the session ends. The only changes made to
the text before it runs are ``substitutions()``: the documented ports become free ones (another test
session may hold 8000), and the scripts README's placeholders ``URL`` and ``NAME`` become the
README's base server. A block that fails fails the test with its place, its text and its output.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from scripts.managed_server import free_port
from tests.support.constants import REPO

DOCS = ("README.md", "adapters/README.md", "scripts/README.md", "tests/README.md")
MARKER = re.compile(r"^<!-- runnable(?:: (?P<mode>background))? -->$")
FENCE = re.compile(r"^(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
SERVER_START_S = 300
SESSION_TIMEOUT_S = 1800
BLOCK_START = "@@docs-block "


def substitutions(port_base: int, port_serve: int) -> list[tuple[str, str]]:
    """(documented text, what the test runs instead), applied in order to runnable blocks only."""
    base_url = f"http://127.0.0.1:{port_base}/v1"
    return [
        ("http://127.0.0.1:8000/v1", base_url),  # README: the base server's URL
        ("--port 8000", f"--port {port_base}"),  # README: the base server (vllm_server.py)
        ("http://127.0.0.1:8001/v1", f"http://127.0.0.1:{port_serve}/v1"),  # proxyclient serve
        ("--port 8001", f"--port {port_serve}"),
        # scripts/README: the demo on a running server, the README's (started above)
        ("--base-url URL --base-model NAME", f"--base-url {base_url} --base-model base-large"),
    ]


@dataclass(frozen=True)
class Block:
    doc: str
    line: int  # 1-based line of the block's first line of code
    language: str  # "python" or "bash"
    background: bool
    text: str

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def runnable_blocks(doc: str) -> list[Block]:
    """The blocks of ``doc`` (relative to the repository root) that follow a runnable marker."""
    lines = (REPO / doc).read_text().splitlines()
    blocks = []
    for i, line in enumerate(lines):
        marker = MARKER.match(line.strip())
        if not marker:
            continue
        background = marker["mode"] == "background"
        where = f"{doc}:{i + 1}"
        start = i + 1
        assert start < len(lines), f"{where}: a runnable marker at the end of the file"
        fence = FENCE.match(lines[start])
        if fence:
            end = next(
                (j for j in range(start + 1, len(lines)) if lines[j].strip() == fence["fence"]),
                None,
            )
            assert end is not None, f"{where}: the fenced block is never closed"
            info = fence["info"].strip().split()
            language = "python" if info[:1] == ["python"] else "bash"
            body = lines[start + 1 : end]
            first = start + 2
        else:
            assert lines[start].startswith("    "), (
                f"{where}: a runnable marker must be right before a fenced or indented code block"
            )
            end = start
            while end < len(lines) and (lines[end].startswith("    ") or not lines[end].strip()):
                end += 1
            while not lines[end - 1].strip():
                end -= 1
            language = "bash"
            body = lines[start:end]
            first = start + 1
        text = textwrap.dedent("\n".join(body)).strip("\n") + "\n"
        blocks.append(Block(doc, first, language, background, text))
    return blocks


def _port_of(block: Block, text: str) -> int:
    ports = re.findall(r"--port (\d+)", text)
    assert len(ports) == 1, f"{block.where}: a background block names exactly one --port"
    return int(ports[0])


_PRELUDE = r"""
set -euo pipefail
set -m  # job control: each background block gets a process group of its own
cd "$DOCS_REPO"
export PATH="$DOCS_BIN:$PATH"
_docs_groups=()
_docs_stop() {
  for group in "${_docs_groups[@]}"; do kill -TERM -- "-$group" 2>/dev/null || true; done
  for group in "${_docs_groups[@]}"; do wait "$group" 2>/dev/null || true; done
}
trap _docs_stop EXIT
_docs_wait() {  # _docs_wait GROUP PORT LOG: until GET /health answers 200, or fail with LOG
  "$DOCS_PYTHON" - "$@" <<'__DOCS_WAIT__'
import os, sys, time, urllib.request
group, port, log = int(sys.argv[1]), sys.argv[2], sys.argv[3]
deadline = time.monotonic() + float(os.environ["DOCS_SERVER_START_S"])
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
            if answer.status == 200:
                sys.exit(0)
    except OSError:
        pass
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        sys.exit(f"the server exited before it answered /health:\n{open(log).read()[-6000:]}")
    time.sleep(1)
sys.exit(f"no answer on /health of port {port} in time:\n{open(log).read()[-6000:]}")
__DOCS_WAIT__
}
"""


def session_script(blocks: list[Block], subs: list[tuple[str, str]], logs: Path) -> str:
    """One bash script running ``blocks`` in order, each announced by a BLOCK_START line."""
    parts = [_PRELUDE]
    for n, block in enumerate(blocks):
        text = block.text
        for documented, replacement in subs:
            text = text.replace(documented, replacement)
        heredoc = f"__DOCS_BLOCK_{n}__"
        parts.append(f"echo '{BLOCK_START}{n}'")
        if block.language == "python":
            parts.append(f"\"$DOCS_PYTHON\" - <<'{heredoc}'\n{text}{heredoc}")
        elif block.background:
            log = logs / f"background-{n}.log"
            parts.append(f"( {text.rstrip()}\n) > '{log}' 2>&1 &")
            parts.append(f"_docs_groups+=($!)\n_docs_wait $! {_port_of(block, text)} '{log}'")
        else:
            parts.append(text)
    parts.append(f"echo '{BLOCK_START}done'")
    return "\n".join(parts) + "\n"


def test_every_runnable_marker_sits_on_a_code_block_and_every_substitution_is_used():
    blocks = [block for doc in DOCS for block in runnable_blocks(doc)]
    assert blocks, "no runnable block in the docs"
    for block in blocks:
        if block.background:
            _port_of(block, block.text)
    text = "".join(block.text for block in blocks)
    for documented, _ in substitutions(1, 2):
        assert documented in text, f"substitution {documented!r} matches no runnable block"


@pytest.mark.integration
def test_every_runnable_block_in_the_docs_runs(tmp_path):
    blocks = [block for doc in DOCS for block in runnable_blocks(doc)]
    port_base = free_port()
    port_serve = free_port()
    while port_serve == port_base:
        port_serve = free_port()
    script = session_script(blocks, substitutions(port_base, port_serve), tmp_path)
    env = dict(
        os.environ,
        DOCS_REPO=str(REPO),
        DOCS_BIN=str(Path(sys.executable).parent),
        DOCS_PYTHON=sys.executable,
        DOCS_SERVER_START_S=str(SERVER_START_S),
    )
    process = subprocess.Popen(
        ["bash", "-c", script],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=SESSION_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)
        output, _ = process.communicate()
        output += f"\n[the session ran past {SESSION_TIMEOUT_S} s]"
    # The output of each block follows its BLOCK_START line; the last one started is the culprit.
    pieces = re.split(rf"^{re.escape(BLOCK_START)}(\S+)$", output, flags=re.MULTILINE)
    started = pieces[1::2]
    if process.returncode == 0 and started[-1:] == ["done"]:
        return
    failed = blocks[int(started[-1])] if started and started[-1] != "done" else None
    if failed is None:
        pytest.fail(f"the docs session failed (exit {process.returncode}):\n{output[-8000:]}")
    pytest.fail(
        f"{failed.where}: this {failed.language} block failed (exit {process.returncode})\n"
        f"--- the block ---\n{failed.text}--- its output ---\n{pieces[-1][-8000:]}",
        pytrace=False,
    )
