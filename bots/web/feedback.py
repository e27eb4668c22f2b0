"""Thumbs up or down (and an optional comment) on a bot reply, kept per conversation.

Each record holds the reply it rates and the user message it answered, so a
conversation's records can be exported as preference data as they are. A second rating
of the same reply replaces the first. In Redis (``[memory] backend = "redis"``) under
``{p}:{bot}:web:feedback:{ref}`` (a hash: message id -> JSON record, no expiry), in
this process otherwise.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

from redis.asyncio import Redis

from bots.web.resume import StoreUnavailable
from core.config import MemorySection
from core.lifecycle import ServiceBase
from core.redis_client import connect, failures_as, key_part, redact

Rating = Literal["up", "down"]
MAX_COMMENT_CHARS = 2000


@dataclass(frozen=True, slots=True)
class Feedback:
    """One rating of one reply."""

    message_id: str  # the user message the rated reply answered
    rating: Rating
    comment: str
    prompt: str  # that user message
    reply: str  # the rated reply
    user_id: str
    at: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Feedback:
        """Inverse of :meth:`to_dict`."""
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})


class FeedbackStore(ServiceBase):
    """Feedback in this process's memory."""

    def __init__(self) -> None:
        self._records: dict[str, dict[str, Feedback]] = {}

    async def put(self, ref: str, feedback: Feedback) -> None:
        """Keep ``feedback`` for conversation ``ref`` (replacing an earlier rating)."""
        self._records.setdefault(ref, {})[feedback.message_id] = feedback

    async def list(self, ref: str) -> list[Feedback]:
        """The conversation's feedback, oldest first."""
        return sorted(self._records.get(ref, {}).values(), key=lambda f: f.at)


class RedisFeedbackStore(FeedbackStore):
    """Feedback in Redis; see the module docstring."""

    def __init__(self, section: MemorySection, bot: str, *, source: str = "<memory>") -> None:
        super().__init__()
        self.section = section
        self.source = source
        self._base = f"{section.key_prefix}:{key_part(bot)}:web:feedback:"
        self._client: Redis | None = None

    async def _start(self) -> None:
        self._client = connect(self.section.url, timeout=self.section.timeout,
                               where=f"{self.source}: memory.url")

    async def _stop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def _redis(self) -> Redis:
        if self._client is None:
            raise RuntimeError("RedisFeedbackStore is used before start() or after stop()")
        return self._client

    async def put(self, ref: str, feedback: Feedback) -> None:
        """Keep ``feedback`` for conversation ``ref`` (replacing an earlier rating)."""
        record = json.dumps(feedback.to_dict(), ensure_ascii=False)
        async with self._failures("feedback"), asyncio.timeout(self.section.timeout):
            await self._redis().hset(self._base + ref, feedback.message_id, record)

    async def list(self, ref: str) -> list[Feedback]:
        """The conversation's feedback, oldest first."""
        async with self._failures("feedback"), asyncio.timeout(self.section.timeout):
            raw = await self._redis().hvals(self._base + ref)
        return sorted((Feedback.from_dict(json.loads(r)) for r in raw), key=lambda f: f.at)

    def _failures(self, what: str) -> Any:
        return failures_as(StoreUnavailable, f"redis at {redact(self.section.url)}", what)


def new_feedback(message_id: str, rating: Rating, comment: str, prompt: str, reply: str,
                 user_id: str) -> Feedback:
    """A record stamped with the current time."""
    return Feedback(message_id, rating, comment[:MAX_COMMENT_CHARS], prompt, reply, user_id,
                    time.time())
