"""What every request of one app reads: the tuner, the request defaults, the served name, the
client key, the metrics, the base tokenizer, the redactor and the body limit (``ServerState``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio

from proxyclient.config import GenerationConfig
from proxyclient.server.errors import Redact
from proxyclient.server.metrics import Metrics
from proxyclient.server.prompts import PromptTokens
from proxyclient.server.served import ServedTuner

# The largest request body read: larger ones get a 413 before anything is parsed.
DEFAULT_MAX_BODY_BYTES = 8 * 2**20
TOKENIZER_THREADS = 4


@dataclass
class ServerState:
    """What every request reads: the tuner, the request defaults, names, keys and metrics."""

    tuner: ServedTuner
    served_model_name: str
    defaults: GenerationConfig
    api_key: str | None
    context_length: int | None
    metrics: Metrics
    tokens: PromptTokens
    redact: Redact
    created: int
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # Tokenizing runs off the event loop, in a few threads, so that a long prompt holds up no
    # stream (nor, while a thread is free, another prompt).
    tokenizing: anyio.CapacityLimiter = dataclasses.field(
        default_factory=lambda: anyio.CapacityLimiter(TOKENIZER_THREADS)
    )

    async def off_loop(self, work: Callable[..., Any], *args: Any) -> Any:
        return await anyio.to_thread.run_sync(work, *args, limiter=self.tokenizing)
