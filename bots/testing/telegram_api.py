"""What the fake Bot API checks, as Telegram does: parameters, text, HTML, entities."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from html.parser import HTMLParser
from typing import Any

from aiohttp import web

MAX_TEXT_UNITS = 4096
_INT_FIELDS = frozenset({"chat_id", "message_id", "offset", "limit", "timeout",
                         "message_thread_id", "max_connections"})
_JSON_FIELDS = frozenset({"reply_markup", "commands", "allowed_updates", "scope",
                          "entities", "link_preview_options", "reply_parameters"})
_HTML_TAGS = frozenset({"b", "strong", "i", "em", "u", "ins", "s", "strike", "del", "a",
                        "code", "pre", "span", "tg-spoiler", "blockquote", "tg-emoji"})


class ApiError(Exception):
    """An error answer of the fake API (status, description, optional retry_after)."""

    def __init__(self, status: int, description: str, retry_after: float | None = None):
        super().__init__(description)
        self.status = status
        self.description = description
        self.retry_after = retry_after


async def params_of(request: web.Request) -> dict[str, Any]:
    """The call's parameters, whether sent as JSON, a form or multipart (as PTB does)."""
    if request.content_type == "application/json":
        with contextlib.suppress(ValueError):
            body = await request.json()
            if isinstance(body, dict):
                return body
        return {}
    raw: Mapping[str, Any] = await request.post() if request.can_read_body else {}
    params: dict[str, Any] = dict(request.query)
    for key, value in raw.items():
        params[key] = value if isinstance(value, str) else str(value)
    for key, value in list(params.items()):
        if key in _INT_FIELDS:
            with contextlib.suppress(ValueError):
                params[key] = int(value)
        elif key in _JSON_FIELDS or value in ("true", "false"):
            with contextlib.suppress(ValueError):
                params[key] = json.loads(value)
    return params


def int_param(params: Mapping[str, Any], name: str) -> int:
    """The integer parameter ``name``; a 400 as Telegram gives it if missing."""
    value = params.get(name)
    if not isinstance(value, int):
        raise ApiError(400, f"Bad Request: {name} is missing or not a number")
    return value


def visible_text(params: Mapping[str, Any]) -> str:
    """The text a message shows, after entity parsing; errors as Telegram gives them."""
    text = params.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ApiError(400, "Bad Request: message text is empty")
    if str(params.get("parse_mode", "")).upper() == "HTML":
        text = _parse_html(text)
    if not text.strip():
        raise ApiError(400, "Bad Request: message text is empty")
    units = len(text.encode("utf-16-le")) // 2
    if units > MAX_TEXT_UNITS:
        raise ApiError(400, "Bad Request: message is too long")
    return text


class _Html(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.text: list[str] = []
        self.open: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in _HTML_TAGS:
            raise ApiError(400, f"Bad Request: can't parse entities: unsupported start tag "
                                f"\"{tag}\"")
        self.open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.open or self.open[-1] != tag:
            raise ApiError(400, f"Bad Request: can't parse entities: can't find end tag "
                                f"corresponding to start tag \"{tag}\"")
        self.open.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse_html(text: str) -> str:
    if "<" in text.replace("&lt;", ""):
        # A bare "<" that does not open a tag is an error for Telegram, not text.
        for index, ch in enumerate(text):
            if ch == "<" and not (text[index + 1 : index + 2].isalpha()
                                  or text[index + 1 : index + 2] == "/"):
                raise ApiError(400, "Bad Request: can't parse entities: unexpected \"<\"")
    parser = _Html()
    parser.feed(text)
    parser.close()
    if parser.open:
        raise ApiError(400, f"Bad Request: can't parse entities: can't find end tag "
                            f"corresponding to start tag \"{parser.open[-1]}\"")
    return "".join(parser.text)


def entities_of(text: str) -> list[dict[str, Any]]:
    """The ``bot_command`` and ``mention`` entities Telegram would attach to ``text``."""
    entities: list[dict[str, Any]] = []
    offset = 0  # in UTF-16 units
    for word in text.split(" "):
        units = len(word.encode("utf-16-le")) // 2
        kind = ("bot_command" if word.startswith("/") and len(word) > 1 and offset == 0
                else "mention" if word.startswith("@") and len(word) > 1 else None)
        if kind is not None:
            entities.append({"type": kind, "offset": offset, "length": units})
        offset += units + 1
    return entities
