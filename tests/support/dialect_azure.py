"""An Azure OpenAI chat deployment for tests: ``DialectServer("azure-openai-chat", ...)`` once
this module is imported. OpenAI's chat shapes (``dialect_servers._OpenAIChat``) at Azure OpenAI's
v1 path (``/openai/v1/chat/completions``), with what Azure deployments are reported to do
(issue 24, 2026-12-03): ``top_logprobs`` up to 20 is accepted, but at most 5 entries come back
per position, without an error or a warning."""

from __future__ import annotations

from typing import Any

from tests.support.dialect_servers import _Core, _OpenAIChat, register_dialect

AZURE_TOP_LOGPROBS = 5  # what a deployment answers, whatever top_logprobs asked for


class _AzureChat(_OpenAIChat):
    def __init__(self, core: _Core) -> None:
        super().__init__(core)
        self.routes = {
            ("GET", "/openai/v1/models"): self.models,
            ("POST", "/openai/v1/chat/completions"): self.chat,
        }
        self.generation_paths = frozenset({"/openai/v1/chat/completions"})

    def top(self, logprobs: Any, k: int) -> list[tuple[int, float]]:
        return super().top(logprobs, min(k, AZURE_TOP_LOGPROBS))


register_dialect("azure-openai-chat", _AzureChat, max_k=20, url_suffix="/openai/v1")
