"""``proxyclient serve``: its own flags, and running the app on uvicorn.

Imported by cli.py only when the command runs, so the other commands never need the ``serve``
extra. This module itself imports nothing heavy at the top: ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from proxyclient.config import GenerationConfig
from proxyclient.errors import ConfigError

SERVER_API_KEY_ENV = "PROXYCLIENT_SERVER_API_KEY"
BASE_API_KEY_ENV = "PROXYCLIENT_API_KEY"


def add_server_options(parser: argparse.ArgumentParser) -> None:
    server = parser.add_argument_group("server (OpenAI-compatible HTTP API)")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument(
        "--served-model-name",
        default=None,
        metavar="NAME",
        help="the model name clients ask for (default: --base-model)",
    )
    server.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help=f"the key clients must send (Authorization: Bearer KEY), as in vllm serve; default: "
        f"${SERVER_API_KEY_ENV}, else none (any client is served). The base's own key is "
        f"--base-api-key",
    )
    server.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        metavar="N",
        help="context length requests are checked against (default: the local models')",
    )
    server.add_argument(
        "--max-body-bytes",
        type=int,
        default=None,
        metavar="N",
        help="larger request bodies get a 413 before they are parsed (default: 8 MiB)",
    )
    server.add_argument(
        "--no-playground",
        dest="playground",
        action="store_false",
        help="do not answer GET / with the playground page (it calls this server's API, with "
        "the --api-key the page asks for)",
    )
    server.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )


def serve(
    args: argparse.Namespace,
    make_tuner: Callable[[argparse.Namespace], Any],
    defaults: GenerationConfig,
) -> int:
    """Load the models, then serve until interrupted."""
    try:
        import uvicorn

        from proxyclient.server.app import create_app
    except ImportError as exc:
        raise ConfigError(
            f"proxyclient serve needs the serve extra ({exc.name} is missing): "
            f"pip install 'proxyclient[serve]'"
        ) from None
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port must be between 1 and 65535, got {args.port}")
    if args.max_body_bytes is not None and args.max_body_bytes < 1:
        raise ConfigError(f"--max-body-bytes must be >= 1, got {args.max_body_bytes}")
    if args.max_model_len is not None and args.max_model_len < 1:
        raise ConfigError(f"--max-model-len must be >= 1, got {args.max_model_len}")
    client_key = args.api_key or os.environ.get(SERVER_API_KEY_ENV) or None
    base_key = args.base_api_key or os.environ.get(BASE_API_KEY_ENV)
    name = args.served_model_name or args.base_model
    tuner = make_tuner(args)
    app = create_app(
        tuner,
        served_model_name=name,
        api_key=client_key,
        defaults=defaults,
        max_model_len=args.max_model_len,
        secrets=(base_key,),
        close_tuner=True,
        playground=args.playground,
        **({"max_body_bytes": args.max_body_bytes} if args.max_body_bytes else {}),
    )
    access = "clients must send the server API key" if client_key else (
        "no --api-key: any client is served"
    )  # fmt: skip
    playground = f"; playground: http://{args.host}:{args.port}/" if args.playground else ""
    print(
        f"proxyclient: serving {name!r} (base {args.base_model!r} via {args.api}, steered by "
        f"the local expert) on http://{args.host}:{args.port}/v1; {access}{playground}",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


class ServerThread:
    """The app on uvicorn in a background thread, on a free port of 127.0.0.1 (tests,
    benchmarks, notebooks): ``with ServerThread(app) as server: ... server.url ...``."""

    def __init__(self, app: Any, *, host: str = "127.0.0.1", log_level: str = "warning") -> None:
        import uvicorn

        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, 0))
        self.host, self.port = self._socket.getsockname()[:2]
        config = uvicorn.Config(app, log_level=log_level, lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )

    @property
    def url(self) -> str:
        """The root URL; the OpenAI API is under ``url + "/v1"``."""
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        self._socket.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
