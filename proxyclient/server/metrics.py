"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxyclient.result import Generation

# Seconds: a step costs a round trip to the base (tens of ms) and a generation many steps.
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """What /metrics reports. ``active`` and ``cancelled`` are also plain attributes, for tests."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "proxyclient_requests", "HTTP requests by route and status", ["route", "status"],
            registry=r,
        )  # fmt: skip
        self.generated_tokens = Counter(
            "proxyclient_generated_tokens", "tokens generated (proxy-tuned output)", registry=r
        )
        self.base_requests = Counter(
            "proxyclient_base_requests", "requests sent to the base model", registry=r
        )
        self.base_prompt_tokens = Counter(
            "proxyclient_base_prompt_tokens", "prompt tokens sent to the base (billed)", registry=r
        )
        self.generations = Counter(
            "proxyclient_generations",
            "generations by how they ended: finished, error, cancelled (client went away)",
            ["outcome"],
            registry=r,
        )
        self.active_generations = Gauge(
            "proxyclient_active_generations", "generations in flight", registry=r
        )
        self.latency = Histogram(
            "proxyclient_request_duration_seconds", "request latency (whole response)", ["route"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.first_token = Histogram(
            "proxyclient_time_to_first_token_seconds", "time to the first generated text",
            ["route"], buckets=_FIRST_TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.active = 0
        self.cancelled = 0

    def generation_started(self) -> None:
        self.active += 1
        self.active_generations.inc()

    def generation_ended(self, outcome: str, generation: Generation | None) -> None:
        self.active -= 1
        self.active_generations.dec()
        self.generations.labels(outcome).inc()
        if outcome == "cancelled":
            self.cancelled += 1
        if generation is not None:
            self.generated_tokens.inc(generation.usage.completion_tokens)
            self.base_requests.inc(generation.usage.requests)
            self.base_prompt_tokens.inc(generation.usage.prompt_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Requests by route and status, and their latency (to the last byte of a stream)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Iterable[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = frozenset(routes)  # others are counted as "other"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        route = path if path in self.routes else "other"
        started = time.perf_counter()
        status = {"code": 500}

        async def measured(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, measured)
        finally:
            self.metrics.requests.labels(route, str(status["code"])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
