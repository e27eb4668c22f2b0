"""Small helpers for the URLs in a bot's settings."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def redact(url: str) -> str:
    """``url`` without its password, fit for logs and error messages."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        user = f"{parts.username}:***@" if parts.username else "***@"
        return urlunsplit(parts._replace(netloc=user + host))
    except ValueError:
        return "<unparsable url>"
