"""JSON on the hot path: orjson where it can, the standard library where it cannot.

Every message is JSON several times over (the HTTP body or WebSocket frame, the turns
and reply kept in memory, the widget's resume log); orjson does each in a tenth of the
time. Anything orjson refuses falls back to :mod:`json`, so behaviour stays the
standard library's: a body orjson cannot parse (an escaped lone surrogate, say) is
judged by ``json.loads``, and a value it cannot write (a lone surrogate, an integer
beyond 64 bits) is written by ``json.dumps`` with ASCII escapes.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def dumpb(value: Any) -> bytes:
    """``value`` as compact UTF-8 JSON bytes."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, separators=(",", ":")).encode("ascii")


def dumps(value: Any) -> str:
    """``value`` as compact JSON text."""
    return dumpb(value).decode("utf-8")


def loads(data: str | bytes) -> Any:
    """The value of the JSON text ``data``; raises ``ValueError`` (or ``RecursionError``)
    as :func:`json.loads` does."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)
