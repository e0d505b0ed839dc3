"""How a failed request is answered: every failure as an OpenAI-shaped error with its status,
secrets redacted, unforeseen ones logged without their details reaching the client; and the
app's exception handlers."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from proxyclient.errors import ProxyClientError
from proxyclient.server import protocol
from proxyclient.server.errors import to_api_error
from proxyclient.server.protocol import APIError
from proxyclient.server.runs import Disconnected
from proxyclient.server.state import ServerState

logger = logging.getLogger("proxyclient.server")


async def guarded(state: ServerState, handle: Callable[[], Awaitable[Response]]) -> Response:
    """Every failure as an OpenAI-shaped error; unforeseen ones logged, without their details
    reaching the client."""
    try:
        return await handle()
    except Disconnected:
        return Response(status_code=499)  # nobody reads it: the client has gone
    except APIError:
        raise
    except Exception as exc:
        raise client_error(state, exc) from None


def client_error(state: ServerState, exc: BaseException) -> APIError:
    """What the client is told; a failure proxyclient did not foresee is logged (redacted, no
    traceback: its frames could hold secrets) and reported as a 500 without its details."""
    if not isinstance(exc, ProxyClientError | APIError):
        logger.error("request failed: %s", state.redact(f"{type(exc).__name__}: {exc}"))
    return to_api_error(exc, state.redact)


def add_error_handlers(app: FastAPI, state: ServerState) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        exc.message = state.redact(exc.message)
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        body = protocol.error_body(str(exc.detail), "invalid_request_error", None, kind)
        return JSONResponse(body, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unexpected error: %s", state.redact(f"{type(exc).__name__}: {exc}"))
        body = protocol.error_body("internal server error", "server_error")
        return JSONResponse(body, status_code=500)
