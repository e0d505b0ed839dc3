"""Names the test session's fixtures and the tests share."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The model name the session's vLLM servers (conftest's ``servers``) serve the tiny base under.
BASE_NAME = "tiny-base"
# The API key of the ``capped`` server.
API_KEY = "sk-integration-test-key"
