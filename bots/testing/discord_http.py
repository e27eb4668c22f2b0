"""The REST half's pieces of :class:`bots.testing.discord.FakeDiscord`: responses as
discord.py expects them, injected faults, and Discord's per-route rate-limit buckets
(:class:`Limits`)."""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

MAX_CONTENT = 2000
MENTION = re.compile(r"<@!?(\d+)>")
EVERYONE = re.compile(r"@(everyone|here)\b")
ROLE = re.compile(r"<@&(\d+)>")


@dataclass(frozen=True)
class Fault:
    """An injected error: a 429 (with Discord's headers) or another status."""

    path: str
    status: int
    retry_after: float = 0.0
    is_global: bool = False

    def response(self) -> web.Response:
        """The response Discord would give."""
        if self.status != 429:
            body = {"message": f"injected {self.status}", "code": 50013}
            return json_response(body, self.status)
        response = json_response({"message": "You are being rate limited.",
                                  "retry_after": self.retry_after, "global": self.is_global},
                                 429)
        response.headers.update({
            # Without Via, discord.py takes a 429 for a Cloudflare ban and gives up.
            "Via": "1.1 google", "Retry-After": str(self.retry_after),
            "X-RateLimit-Limit": "5", "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset-After": str(self.retry_after),
            "X-RateLimit-Bucket": "fake-bucket",
            "X-RateLimit-Scope": "global" if self.is_global else "shared",
        })
        return response


@dataclass
class Bucket:
    """A fixed-window rate limit: ``limit`` requests per ``window`` seconds."""

    name: str
    limit: int
    window: float
    used: int = 0
    reset_at: float = 0.0

    def take(self) -> bool:
        """Count one request; False if it is over the limit of the current window."""
        now = time.monotonic()
        if now >= self.reset_at:
            self.used, self.reset_at = 0, now + self.window
        self.used += 1
        return self.used <= self.limit

    def reset_after(self) -> float:
        """Seconds until the window starts again, rounded up to the millisecond (a client
        that waits what the header says must not arrive a fraction early)."""
        return math.ceil(max(0.0, self.reset_at - time.monotonic()) * 1000) / 1000

    def headers(self) -> dict[str, str]:
        """Discord's ``X-RateLimit-*`` headers for the bucket's state."""
        return {"X-RateLimit-Limit": str(self.limit),
                "X-RateLimit-Remaining": str(max(0, self.limit - self.used)),
                "X-RateLimit-Reset-After": f"{self.reset_after():.3f}",
                "X-RateLimit-Reset": f"{time.time() + self.reset_after():.3f}",
                "X-RateLimit-Bucket": self.name}


class Limits:
    """What the fake answers instead of a REST handler: injected faults, then Discord's
    rate-limit buckets (with ``bucket`` = (requests, seconds), each channel's message
    routes allow that many per window, announced in X-RateLimit-* headers as Discord
    does; more is a 429)."""

    def __init__(self, bucket: tuple[int, float] | None) -> None:
        self.bucket = bucket
        self.faults: list[Fault] = []
        self._buckets: dict[str, Bucket] = {}

    def take_fault(self, path: str) -> Fault | None:
        """The first injected fault for ``path``, now used up, or None."""
        for i, fault in enumerate(self.faults):
            if fault.path in path:
                del self.faults[i]
                return fault
        return None

    def bucket_of(self, method: str, path: str) -> Bucket | None:
        """The bucket a request counts against (None: not limited)."""
        if self.bucket is None or "/channels/" not in path:
            return None
        # One bucket per method, route and channel (Discord's "major parameter").
        parts = path.split("/")
        route = "/".join(p if not p.isdigit() or i == 4 else "{id}" for i, p in enumerate(parts))
        key = f"{method} {route}"
        if key not in self._buckets:
            limit, window = self.bucket
            self._buckets[key] = Bucket(f"bucket-{len(self._buckets)}", limit, window)
        return self._buckets[key]


def would_ping(payload: Mapping[str, Any]) -> bool:
    """Whether Discord would notify anyone for a message sent with this request body.

    Without ``allowed_mentions`` Discord parses every mention in the content.
    """
    content = str(payload.get("content") or "")
    if not (EVERYONE.search(content) or MENTION.search(content) or ROLE.search(content)):
        return False
    allowed = payload.get("allowed_mentions")
    if allowed is None:
        return True
    return bool(allowed.get("parse") or allowed.get("users") or allowed.get("roles")
                or allowed.get("replied_user"))


def check_content(body: Mapping[str, Any]) -> str | None:
    """Why Discord would refuse the content of ``body``, or None."""
    content = body.get("content")
    if content is not None and len(content) > MAX_CONTENT:
        return f"Invalid Form Body: content: Must be {MAX_CONTENT} or fewer in length."
    return None


def now() -> str:
    """A timestamp as Discord writes them."""
    return datetime.now(UTC).isoformat()


def json_response(data: Any, status: int = 200) -> web.Response:
    """``data`` as JSON, with the Content-Type discord.py insists on."""
    # discord.py decodes a body as JSON only if Content-Type is exactly this (no charset).
    return web.Response(body=json.dumps(data).encode(), status=status,
                        headers={"Content-Type": "application/json"})


def ok(data: Any) -> web.Response:
    """A 200 with ``data`` as JSON."""
    return json_response(data)


def no_content() -> web.Response:
    """A 204."""
    return web.Response(status=204)
