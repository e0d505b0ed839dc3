"""The synchronous API where Jupyter users live: a real notebook run by a real ipykernel.

ipykernel runs every cell inside its own asyncio event loop, so ``generate``, ``stream`` and
``choose`` must work while a loop is running. The notebook is built in memory (nbformat), executed
by nbclient with a kernel of this very interpreter, and talks to an "openai" dialect fixture
server running in this process; its results must equal the async API's outside the notebook.
Also here: ``python -m proxyclient`` is the ``proxyclient`` command.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from transformers import AutoTokenizer

from proxyclient import ProxyTuner, connect
from proxyclient.tokenizer import BaseTokenizer
from tests.support.dialect_servers import DialectServer

REPO = Path(__file__).resolve().parents[1]
KERNEL = "proxyclient-test-python"
KEY = "sk-notebook-test-0123456789"
PROMPT = "def main():"
N_TOKENS = 8
OPTIONS = ["(", ":", " return", "def"]
SETTINGS = {"base_k": 5, "unseen": "restrict"}
# Under "residual" every option gets a probability, even outside the base's top 5.
CHOOSE_SETTINGS = {"base_k": 5, "unseen": "residual"}
# Each test starts a Jupyter kernel or the CLI in another process.
pytestmark = pytest.mark.subprocess


@pytest.fixture(scope="module")
def kernels(tmp_path_factory) -> Path:
    """A folder of kernelspecs holding one: ipykernel on this interpreter (sys.executable)."""
    root = tmp_path_factory.mktemp("kernels")
    path = [str(REPO)]  # a cell may import tests.support or scripts, as the tests do
    if os.environ.get("PYTHONPATH"):
        path.append(os.environ["PYTHONPATH"])
    env = {
        "PYTHONPATH": os.pathsep.join(path),
        "HF_HUB_OFFLINE": "1",
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",  # debugpy's frozen-modules warning
    }
    write_kernel_spec(root / KERNEL, overrides={"display_name": "proxyclient tests", "env": env})
    return root


@pytest.fixture
def run_notebook(kernels, tmp_path, monkeypatch):
    """Execute code cells in a fresh kernel; returns each cell's stdout."""
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")

    def run(*cells: str) -> list[str]:
        notebook = nbformat.v4.new_notebook(
            cells=[nbformat.v4.new_code_cell(textwrap.dedent(cell).strip()) for cell in cells]
        )
        manager = KernelManager(
            kernel_name=KERNEL, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)])
        )
        client = NotebookClient(
            notebook,
            km=manager,
            timeout=180,
            startup_timeout=120,
            resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
        )
        client.execute()
        nbformat.write(notebook, tmp_path / "executed.ipynb")  # for a look after a failure
        return [
            "".join(
                out["text"]
                for out in cell.outputs
                if out["output_type"] == "stream" and out["name"] == "stdout"
            )
            for cell in notebook.cells
        ]

    return run


def test_the_kernel_runs_cells_inside_a_running_event_loop(run_notebook):
    # The situation the sync API must survive; if ipykernel ever stops doing this, the test below
    # no longer tests it.
    (out,) = run_notebook(
        """
        import asyncio, sys
        loop = asyncio.get_running_loop()
        print(loop.is_running(), sys.executable)
        """
    )
    running, executable = out.split()
    assert running == "True"
    assert executable == sys.executable


@pytest.fixture(scope="module")
def openai_server(tiny_models):
    server = DialectServer("openai", tiny_models["base"], api_key=KEY)
    server.start()
    yield server
    server.stop()


def notebook_cells(server: DialectServer, tiny_models: dict[str, Path]) -> list[str]:
    setup = f"""
    import asyncio, json
    import torch
    from transformers import AutoTokenizer
    from proxyclient import ProxyTuner, connect
    from proxyclient.tokenizer import BaseTokenizer

    torch.set_num_threads(1)  # as in the test process, so the floats add up the same way
    asyncio.get_running_loop()  # raises unless this cell runs inside the kernel's loop
    tokenizer = AutoTokenizer.from_pretrained({str(tiny_models["anti_expert"])!r})
    base_tokenizer = BaseTokenizer(tokenizer)
    base = connect("openai", {server.base_url!r}, "tiny-base", api_key={KEY!r},
                   tokenizer=base_tokenizer)
    tuner = ProxyTuner(base, {str(tiny_models["expert"])!r}, {str(tiny_models["anti_expert"])!r},
                       device="cpu")
    PROMPT, OPTIONS = {PROMPT!r}, {OPTIONS!r}
    SETTINGS, CHOOSE_SETTINGS = {SETTINGS!r}, {CHOOSE_SETTINGS!r}
    """
    generate = f"""
    generated = tuner.generate(PROMPT, max_new_tokens={N_TOKENS}, **SETTINGS)
    print(json.dumps({{"ids": generated.token_ids, "text": generated.text}}))
    """
    stream = f"""
    stream = tuner.stream(PROMPT, max_new_tokens={N_TOKENS}, **SETTINGS)
    text = "".join(stream)
    print(json.dumps({{"ids": stream.generation.token_ids, "text": text}}))
    """
    choose = """
    choice = tuner.choose(PROMPT, OPTIONS, **CHOOSE_SETTINGS)
    print(json.dumps({"option": choice.option, "probabilities": choice.probabilities}))
    """
    close = """
    tuner.close()
    print("closed")
    """
    return [setup, generate, stream, choose, close]


def outside_the_notebook(server: DialectServer, tiny_models: dict[str, Path]) -> dict:
    """The same three calls through the async API, in this process."""

    async def calls() -> dict:
        base = connect(
            "openai",
            server.base_url,
            "tiny-base",
            api_key=KEY,
            tokenizer=BaseTokenizer(AutoTokenizer.from_pretrained(tiny_models["anti_expert"])),
        )
        tuner = ProxyTuner(base, tiny_models["expert"], tiny_models["anti_expert"], device="cpu")
        try:
            generated = await tuner.agenerate(PROMPT, max_new_tokens=N_TOKENS, **SETTINGS)
            stream = tuner.astream(PROMPT, max_new_tokens=N_TOKENS, **SETTINGS)
            text = "".join([piece async for piece in stream])
            choice = await tuner.achoose(PROMPT, OPTIONS, **CHOOSE_SETTINGS)
        finally:
            await tuner.aclose()
        return {
            "generate": {"ids": generated.token_ids, "text": generated.text},
            "stream": {"ids": stream.generation.token_ids, "text": text},
            "choose": {"option": choice.option, "probabilities": choice.probabilities},
        }

    return asyncio.run(calls())


def test_generate_stream_and_choose_work_in_a_notebook(run_notebook, openai_server, tiny_models):
    asked_before = len(openai_server.requests)
    outputs = run_notebook(*notebook_cells(openai_server, tiny_models))
    assert outputs[-1].strip() == "closed"
    generated, streamed, chosen = (json.loads(out) for out in outputs[1:4])
    # The notebook really asked the fixture server: one request per token, plus one to choose.
    assert len(openai_server.requests) - asked_before >= len(generated["ids"]) + 1

    expected = outside_the_notebook(openai_server, tiny_models)
    assert len(generated["ids"]) > 0
    assert generated == expected["generate"]
    assert streamed == expected["stream"]
    assert streamed["ids"] == generated["ids"]

    assert chosen["option"] in OPTIONS
    assert chosen["option"] == expected["choose"]["option"]
    probabilities = chosen["probabilities"]
    assert set(probabilities) == set(OPTIONS)
    assert None not in probabilities.values()
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-6)
    assert probabilities[chosen["option"]] == max(probabilities.values())
    assert chosen["probabilities"] == pytest.approx(expected["choose"]["probabilities"], abs=1e-6)


def test_python_dash_m_proxyclient_is_the_proxyclient_command():
    command = Path(sys.executable).with_name("proxyclient")  # the installed console script
    runs = {
        "help": [sys.executable, "-m", "proxyclient", "--help"],
        "bad": [sys.executable, "-m", "proxyclient", "no-such-command"],
    }
    if command.exists():
        runs["script"] = [str(command), "--help"]
    started = {
        name: subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, argv in runs.items()
    }  # together: each one imports torch
    done = {name: (p.communicate(timeout=120), p.returncode) for name, p in started.items()}

    (out, err), code = done["help"]
    assert code == 0, err
    assert out.startswith("usage: proxyclient ")
    assert "generate" in out
    (_, err), code = done["bad"]
    assert code == 2
    assert "invalid choice" in err
    if "script" in done:
        (script_out, _), script_code = done["script"]
        assert script_code == 0
        assert script_out == out
