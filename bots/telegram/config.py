"""``[adapters.telegram]``: the Telegram channel's settings, validated at start."""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator

from core.config import Section

_SECRET = re.compile(r"[A-Za-z0-9_-]{1,256}")


class TelegramLimits(Section):
    """``[adapters.telegram.limits]``: Telegram's rate limits and how streaming paces.

    The defaults are Telegram's published limits; tests use short ones.
    """

    chat_interval: float = Field(default=1.0, ge=0)  # seconds between calls to one chat
    group_interval: float = Field(default=3.0, ge=0)  # to one group (20 a minute)
    global_per_second: float = Field(default=30.0, gt=0)  # all chats together
    edit_interval: float = Field(default=1.0, ge=0)  # streaming updates, private chat
    group_edit_interval: float = Field(default=3.0, ge=0)  # streaming updates, group
    typing_interval: float = Field(default=4.0, gt=0)  # "typing..." lasts about 5 s
    max_retries: int = Field(default=5, ge=0)  # network errors and 5xx, per call
    retry_backoff: float = Field(default=0.5, ge=0)  # seconds, doubled per retry
    max_retry_after: float = Field(default=300.0, gt=0)  # a longer 429 wait is a failure


class TelegramSettings(Section):
    """``[adapters.telegram]``: see the README's Telegram section."""

    token: SecretStr  # from the environment: token = "${TELEGRAM_TOKEN}"
    mode: Literal["polling", "webhook"] = "polling"
    webhook_url: str | None = None  # the public https URL Telegram posts updates to
    webhook_path: str | None = None  # the path served (default: webhook_url's path)
    secret_token: SecretStr | None = None  # checked on every webhook request
    api_base_url: str = "https://api.telegram.org"  # a self-hosted Bot API server, a fake
    answer_in_groups: Literal["mention", "always", "commands"] = "mention"
    streaming: bool = True  # grow the reply by edits; false: one message at the end
    format: Literal["markdown", "plain"] = "markdown"  # markdown: sent as Telegram HTML
    start_message: str = "Hi! Send me a message and I'll answer. /help lists my commands."
    poll_timeout: float = Field(default=10.0, ge=0, le=50)  # long-polling, seconds
    webhook_timeout: float = Field(default=50.0, gt=0)  # a webhook request waits this long
    limits: TelegramLimits = TelegramLimits()

    @field_validator("token")
    @classmethod
    def _token(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().strip():
            raise ValueError("must not be empty (set it from the environment: ${TELEGRAM_TOKEN})")
        return value

    @field_validator("api_base_url")
    @classmethod
    def _api_base_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("must be an http(s) URL, e.g. https://api.telegram.org")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _webhook(self) -> TelegramSettings:
        # Checked here, not on the field, so that the error never repeats the secret.
        secret = self.secret_token
        if secret is not None and not _SECRET.fullmatch(secret.get_secret_value()):
            raise ValueError("secret_token must be 1-256 characters of A-Z, a-z, 0-9, _ and -")
        if self.mode != "webhook":
            return self
        if not self.webhook_url:
            raise ValueError('mode = "webhook" needs webhook_url (the public URL to post to)')
        parts = urlsplit(self.webhook_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("webhook_url must be an http(s) URL")
        if self.secret_token is None:
            raise ValueError('mode = "webhook" needs secret_token (from the environment)')
        if not self.path.startswith("/"):
            raise ValueError("webhook_path must start with /")
        return self

    @property
    def path(self) -> str:
        """The path the webhook is served on."""
        return self.webhook_path or urlsplit(self.webhook_url or "").path or "/telegram/webhook"
