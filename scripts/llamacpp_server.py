"""Start and stop a real llama.cpp server (`llama-server`, native /completion) on the CPU.

The binary comes from scripts/setup_llamacpp.sh (.cache/llama.cpp/bin/llama-server, or
$PROXYCLIENT_LLAMA_SERVER); the GGUF from scripts/make_gguf.py. Standard library only.

    python scripts/llamacpp_server.py MODEL.gguf --name NAME [--port P] [--ctx-size N]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

if not __package__:  # run as a file: `scripts.` and `tests.` import from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.managed_server import ManagedServer, serve_in_foreground, start_many

__all__ = ["LlamaCppServer", "default_binary", "start_many"]

REPO_ROOT = Path(__file__).resolve().parent.parent
BINARY_ENV_VAR = "PROXYCLIENT_LLAMA_SERVER"
INSTALL_HINT = (
    "Build it with `bash scripts/setup_llamacpp.sh` (several minutes on 2 cores), or point "
    f"{BINARY_ENV_VAR} at a llama-server binary."
)


def default_binary() -> Path:
    """$PROXYCLIENT_LLAMA_SERVER, else the repository's .cache/llama.cpp/bin/llama-server."""
    env = os.environ.get(BINARY_ENV_VAR)
    return Path(env) if env else REPO_ROOT / ".cache" / "llama.cpp" / "bin" / "llama-server"


class LlamaCppServer(ManagedServer):
    """One `llama-server` process serving `gguf_path` as `served_name` (its --alias).

    Same lifecycle as VLLMServer: context manager or start()/stop(), own process group, stopped
    at interpreter exit and when collected. `base_url` has no /v1: the native endpoints
    (/completion, /tokenize, /props, /health) live at the root. One thread (`-t 1`) and one slot
    by default, since tests run it beside a vLLM server on 2 cores; `n_probs` has no server-side
    limit (the server caps it at the vocabulary size). An f32 KV cache and flash attention off
    make logprobs match transformers to ~1e-5 (llama.cpp's defaults, an f16 KV cache and CPU
    flash attention on "auto", are off by up to ~7e-3 on the tiny model).
    """

    label = "llama-server"
    work_dir_prefix = "llamacpp-server-"

    def __init__(
        self,
        gguf_path: str | Path,
        served_name: str,
        *,
        port: int | None = None,
        ctx_size: int = 2048,
        threads: int = 1,
        parallel: int = 1,
        cache_type: str = "f32",
        flash_attn: str = "off",
        binary: str | Path | None = None,
        log_path: str | Path | None = None,
        startup_timeout: float = 60.0,
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
        self.gguf_path = Path(gguf_path)
        self.ctx_size = ctx_size
        self.threads = threads
        self.parallel = parallel
        self.cache_type = cache_type
        self.flash_attn = flash_attn
        self.binary = Path(binary) if binary is not None else default_binary()

    def command(self) -> list[str]:
        """The command line that start() runs."""
        cmd = [
            str(self.binary),
            "--model",
            str(self.gguf_path),
            "--alias",
            self.served_name,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--ctx-size",
            str(self.ctx_size),
            "--threads",
            str(self.threads),
            "--threads-batch",
            str(self.threads),
            "--parallel",
            str(self.parallel),
            "--cache-type-k",
            self.cache_type,
            "--cache-type-v",
            self.cache_type,
            "--flash-attn",
            self.flash_attn,
            "--no-webui",
        ]
        return cmd + list(self.extra_args)

    def _check_launchable(self) -> None:
        if not self.binary.is_file():
            raise FileNotFoundError(f"no llama-server at {self.binary}.\n{INSTALL_HINT}")
        if not self.gguf_path.is_file():
            raise FileNotFoundError(
                f"no GGUF at {self.gguf_path} (make one with scripts/make_gguf.py)"
            )

    def _subject(self) -> str:
        return f"model {self.gguf_path}"


def main(argv: list[str] | None = None) -> int:
    """Serve one GGUF in the foreground until Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(description="Serve a GGUF with llama-server until Ctrl-C.")
    parser.add_argument("gguf", type=Path)
    parser.add_argument("--name", required=True, help="served model name (--alias)")
    parser.add_argument("--port", type=int, default=None, help="default: a free port")
    parser.add_argument("--ctx-size", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--binary", type=Path, default=None, help="llama-server to run")
    parser.add_argument("--log", type=Path, default=None, help="server log file")
    args = parser.parse_args(argv)

    server = LlamaCppServer(
        args.gguf,
        args.name,
        port=args.port,
        ctx_size=args.ctx_size,
        threads=args.threads,
        binary=args.binary,
        log_path=args.log,
    )
    return serve_in_foreground(server)


if __name__ == "__main__":
    sys.exit(main())
