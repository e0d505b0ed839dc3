"""An OpenAI-compatible HTTP server in front of one ProxyTuner (``proxyclient serve``).

Needs the ``serve`` extra: ``pip install 'proxyclient[serve]'`` (FastAPI, uvicorn, sse-starlette,
prometheus-client). ``create_app`` is imported on first use, so that ``proxyclient.server.main``
(the command's flags, which every ``proxyclient`` invocation builds) needs none of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from proxyclient.server.app import create_app

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from proxyclient.server.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
