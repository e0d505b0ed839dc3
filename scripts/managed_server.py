"""Process management shared by the real-server launchers (vllm_server.py, llamacpp_server.py).

A ManagedServer spawns one server command in its own process group, polls a health URL until
it answers 200, and stops the whole group on stop(), at interpreter exit, when collected, and
(Linux) when the thread that launched it dies. Standard library only.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import re
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
from typing import Self, TypeVar

STOP_TIMEOUT_S = 20.0
POLL_INTERVAL_S = 0.25
LOG_TAIL_LINES = 40

_live_servers: weakref.WeakSet[ManagedServer] = weakref.WeakSet()
_S = TypeVar("_S", bound="ManagedServer")


def metric_value(metrics_text: str, name: str) -> float | None:
    """The value of sample ``name`` (labelled or not: the first) in a Prometheus text page, as
    vLLM's and llama-server's ``/metrics`` give it; None when the page has none."""
    found = re.search(
        rf"^{re.escape(name)}(?:\{{[^}}]*\}})? ([0-9.e+-]+)$", metrics_text, re.MULTILINE
    )
    return None if found is None else float(found.group(1))


def fetch_metric(root_url: str, name: str) -> float:
    """Sample ``name`` of the server's ``/metrics`` at ``root_url`` (no ``/v1``); RuntimeError
    naming it when the page has none."""
    with urllib.request.urlopen(f"{root_url.rstrip('/')}/metrics", timeout=5) as page:
        value = metric_value(page.read().decode(), name)
    if value is None:
        raise RuntimeError(f"{name} is not in {root_url}/metrics")
    return value


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    # Runs in the child before exec: SIGTERM it when the thread that started it dies, so a
    # SIGKILLed test run does not leave a server behind. Linux only; best effort.
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ManagedServer:
    """One server process in its own process group; subclasses say what to run.

    Subclasses implement command() and may override _environment(), _check_launchable(),
    _startup_hint() and _cleanup(). `label` names the server in error messages.
    """

    label = "server"
    work_dir_prefix = "server-"

    def __init__(
        self,
        served_name: str,
        *,
        port: int | None = None,
        log_path: str | Path | None = None,
        startup_timeout: float = 240.0,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.served_name = served_name
        self.port = port if port is not None else free_port()
        self.startup_timeout = startup_timeout
        self.extra_args = tuple(extra_args)
        self.extra_env = dict(env or {})
        self._work_dir = Path(tempfile.mkdtemp(prefix=self.work_dir_prefix))
        self.log_path = Path(log_path) if log_path is not None else self._work_dir / "server.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_seconds: float | None = None
        self._launched_at = 0.0

    # --- what subclasses provide ---------------------------------------------------------

    @property
    def root_url(self) -> str:
        """http://127.0.0.1:PORT, without any API prefix."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """The URL clients are given; subclasses may add an API prefix."""
        return self.root_url

    @property
    def health_url(self) -> str:
        return f"{self.root_url}/health"

    def command(self) -> list[str]:
        """The command line that start() runs."""
        raise NotImplementedError

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.extra_env)
        return env

    def _check_launchable(self) -> None:
        """Raise FileNotFoundError when the program or its inputs are missing."""

    def _startup_hint(self, log_tail: str) -> str:
        """Extra text for a startup error, given the log's tail ("" for none)."""
        return ""

    def _cleanup(self) -> None:
        """Remove what the process left behind; runs after every stop()."""

    def _subject(self) -> str:
        """What is served, for error messages."""
        return repr(self.served_name)

    # --- lifecycle ---------------------------------------------------------------------

    def launch(self) -> None:
        """Spawn the server process without waiting for it to become healthy."""
        if self.process is not None:
            raise RuntimeError(f"server for {self.served_name!r} was already started")
        self._check_launchable()
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
        """True once the health URL answers 200; raises RuntimeError if the process has exited."""
        if self.process is None:
            raise RuntimeError("server not launched")
        if self.process.poll() is not None:
            raise self._startup_error(f"{self.label} exited with code {self.process.returncode}")
        try:
            with urllib.request.urlopen(self.health_url, timeout=2.0) as resp:
                ready = resp.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False
        if ready and self.startup_seconds is None:
            self.startup_seconds = time.monotonic() - self._launched_at
        return ready

    def _timed_out(self) -> bool:
        return time.monotonic() > self._launched_at + self.startup_timeout

    def _timeout_error(self) -> RuntimeError:
        return self._startup_error(f"{self.label} not healthy after {self.startup_timeout:.0f} s")

    def wait_ready(self) -> None:
        """Block until healthy; on exit or timeout, stop the server and raise RuntimeError."""
        try:
            while not self.poll_ready():
                if self._timed_out():
                    raise self._timeout_error()
                time.sleep(POLL_INTERVAL_S)
        except BaseException:
            self.stop()
            raise

    def start(self) -> Self:
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
        # Children (e.g. vLLM's engine core) may outlive the leader by a moment.
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5.0)
        self.process = None
        _live_servers.discard(self)
        self._cleanup()

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
        hint = self._startup_hint(tail)
        return RuntimeError(
            f"{what} ({self._subject()}, port {self.port}).\n"
            f"command: {shlex.join(self.command())}\n"
            f"log: {self.log_path}\n"
            f"--- last {LOG_TAIL_LINES} log lines ---\n{tail}{hint}"
        )

    def _remove_work_dir(self, sub: str = "") -> None:
        shutil.rmtree(self._work_dir / sub if sub else self._work_dir, ignore_errors=True)

    def __enter__(self) -> Self:
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
        return f"{type(self).__name__}({self.served_name!r}, {self.base_url}, {state})"


def start_many(servers: Iterable[_S]) -> list[_S]:
    """Launch all servers at once, then wait for all; if one fails, stop all and raise."""
    servers = list(servers)
    try:
        for server in servers:
            server.launch()
        pending = list(servers)
        while pending:
            pending = [s for s in pending if not s.poll_ready()]
            for server in pending:
                if server._timed_out():
                    raise server._timeout_error()
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


def raise_keyboard_interrupt(signum: int, frame: object) -> None:
    """A SIGTERM handler that unwinds like Ctrl-C, so `finally: server.stop()` runs."""
    raise KeyboardInterrupt


def serve_in_foreground(server: ManagedServer) -> int:
    """Start ``server``, print its base URL, and keep it until Ctrl-C or SIGTERM (CLI use)."""
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    try:
        print(f"starting {server.label} (log: {server.log_path}) ...", file=sys.stderr)
        server.start()
        print(f"serving {server.served_name!r} at {server.base_url}", file=sys.stderr)
        print(server.base_url, flush=True)
        while server.running:
            time.sleep(0.5)
        print(f"{server.label} exited unexpectedly:\n{server.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    except (RuntimeError, FileNotFoundError) as err:
        print(err, file=sys.stderr)
        return 1
    finally:
        server.stop()
    return 0
