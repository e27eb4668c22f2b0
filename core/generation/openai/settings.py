"""The openai backend's own keys of ``[generation]``."""

from __future__ import annotations

from pydantic import Field

from core.config import Section


class OpenAISettings(Section):
    """The server to call, and how hard to try."""

    url: str | None = None  # the server's base URL, e.g. http://127.0.0.1:8000/v1
    api_key: str | None = None
    max_retries: int = Field(default=2, ge=0, le=10)  # for 429/5xx/connection errors
