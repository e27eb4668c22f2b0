"""The widget's part of ``[adapters.web]``: sessions, origins, limits, resume and theme.

:class:`WidgetFields` is mixed into :class:`WebSettings` (the whole table), so every key below is
set in the same table::

    [adapters.web]
    public_url = "https://bot.example"        # where pages load widget.js from
    allowed_origins = ["https://shop.example"] # sites that may embed the widget
    secret = "${PARLEY_WEB_SECRET}"            # signs session tokens; from the environment
    session_ttl = 86400

    [adapters.web.theme]
    mode = "auto"                              # light | dark | auto (the visitor's choice)
    accent = "#2563eb"
"""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, field_validator

from core.config import ApiKeySection, Section, unique_keys

_COLOUR = r"^#(?:[0-9a-fA-F]{3}|[0-9a-fA-F]{6})$"


def origin_of(url: str) -> str:
    """The ``scheme://host[:port]`` of ``url``, as browsers send it in ``Origin``."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    default = {"http": 80, "https": 443}[parts.scheme]
    port = "" if parts.port in (None, default) else f":{parts.port}"
    return f"{parts.scheme}://{host}{port}"


class Theme(Section):
    """``[adapters.web.theme]``: how the widget looks. Colours are ``#rgb`` / ``#rrggbb``
    (nothing else reaches the page's CSS)."""

    mode: Literal["light", "dark", "auto"] = "auto"
    accent: str = Field(default="#2563eb", pattern=_COLOUR)
    accent_text: str = Field(default="#ffffff", pattern=_COLOUR)
    title: str = Field(default="Chat with us", min_length=1, max_length=80)
    greeting: str = Field(default="Hi! How can I help?", max_length=500)
    placeholder: str = Field(default="Type a message", max_length=80)
    position: Literal["right", "left"] = "right"
    open: bool = False  # open the panel when the page loads


class WidgetFields(Section):
    """The widget's keys of ``[adapters.web]``; see the module docstring."""

    # The server's own address as pages reach it (behind a proxy: the public one). The
    # widget learns it from its script's URL; this one is allowed as an origin too.
    public_url: str | None = None
    # Origins ("https://shop.example") whose pages may open sessions and WebSockets;
    # "*" for any. Pages Parley serves itself are always allowed.
    allowed_origins: list[str] = []
    # Signs session tokens; set it from ${ENV}. Without it a random key is made at start:
    # tokens then die with the process and do not work across front ends.
    secret: str | None = Field(default=None, min_length=16)
    # Verifies site-signed identities (HMAC-SHA256 of the site's user id, hex); default:
    # ``secret``.
    identity_secret: str | None = Field(default=None, min_length=16)
    session_ttl: int = Field(default=24 * 3600, ge=60, le=90 * 86400)
    # Reply events kept for resuming: how long, and how many per conversation.
    resume_ttl: int = Field(default=3600, ge=10)
    resume_events: int = Field(default=2000, ge=16, le=100_000)
    # WebSocket limits: the biggest frame taken (a bigger one closes the socket with
    # 1009), the heartbeat that reaps dead sockets, and token-bucket rates (messages per
    # ``rate_window`` seconds) per session and per client address.
    max_frame_bytes: int = Field(default=16 * 1024, ge=1024, le=1024 * 1024)
    heartbeat: float = Field(default=20.0, ge=1.0, le=600.0)
    session_rate: int = Field(default=10, ge=1)
    ip_rate: int = Field(default=60, ge=1)
    rate_window: float = Field(default=10.0, gt=0.0)
    max_sockets_per_ip: int = Field(default=32, ge=1)
    # The SSE stream's keep-alive comment interval while a request waits in the queue.
    keepalive: float = Field(default=15.0, gt=0.0)
    theme: Theme = Theme()

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        if value is not None:
            origin_of(value)
        return value.rstrip("/") if value else value

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        return [v if v == "*" else origin_of(v) for v in value]


class WebSettings(WidgetFields):
    """``[adapters.web]``: where to listen and what to accept (and the widget's keys,
    :class:`WidgetFields`)."""

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)  # 0: any free port
    # SO_REUSEPORT: several processes listen on the port and the kernel spreads the
    # connections (``parley run --processes N`` sets it for its children).
    reuse_port: bool = False
    max_body_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    cors_origins: list[str] = []  # origins whose pages may call the API; "*" for any
    # Server-to-server callers of /api/v1/chat: with keys, every call needs one, and user
    # and conversation ids live in the key's tenant (two tenants' "u1" are two users).
    api_keys: Annotated[list[ApiKeySection], AfterValidator(unique_keys)] = []
    # One line per HTTP request on the ``aiohttp.access`` logger (at INFO). On by default:
    # it is the only record of requests refused before the engine (docs/http-api.md).
    # Off saves the line's making and writing (~100K instructions, 7-10 µs a request)
    # where a proxy in front logs anyway; WebSocket messages never had lines.
    access_log: bool = True
