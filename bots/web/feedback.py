"""Thumbs up or down (and an optional comment) on a bot reply, kept per conversation.

Each record holds the reply it rates and the user message it answered, so a
conversation's records can be exported as preference data as they are. A second rating
of the same reply replaces the first. In Redis (``[memory] backend = "redis"``) under
``{p}:{bot}:web:feedback:{ref}`` (a hash: message id -> JSON record, no expiry), with
``{p}:{bot}:web:feedback-by:{user}`` (a set of the refs a user rated in, for
forgetting them), in this process otherwise.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from redis.asyncio import Redis

from bots.web.resume import StoreUnavailable
from core.config import MemorySection
from core.lifecycle import ServiceBase
from core.redis_client import connect, failures_as, key_part, redact, reply_text

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

    async def everything(self, since: float | None = None) -> Sequence[tuple[str, Feedback]]:
        """Every conversation's feedback (given at ``since`` or later): (ref, record)."""
        return [(ref, f) for ref, records in self._records.items()
                for f in records.values() if since is None or f.at >= since]

    async def forget(self, user_id: str, refs: Sequence[str]) -> int:
        """Delete the feedback of conversations ``refs`` and whatever ``user_id`` gave
        anywhere else; how many records went."""
        count = 0
        for ref in list(self._records):
            records = self._records[ref]
            gone = [m for m, f in records.items() if ref in refs or f.user_id == user_id]
            for message_id in gone:
                del records[message_id]
            count += len(gone)
            if not records:
                del self._records[ref]
        return count


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

    def _by_user(self, user_id: str) -> str:
        return f"{self._base[:-1]}-by:{key_part(user_id)}"

    async def put(self, ref: str, feedback: Feedback) -> None:
        """Keep ``feedback`` for conversation ``ref`` (replacing an earlier rating)."""
        record = json.dumps(feedback.to_dict(), ensure_ascii=False)
        async with self._failures("feedback"), asyncio.timeout(self.section.timeout):
            async with self._redis().pipeline(transaction=True) as pipe:
                pipe.hset(self._base + ref, feedback.message_id, record)
                # Which conversations the user rated in, for forgetting them: feedback
                # has no expiry, so it outlives memory's record of the conversation.
                pipe.sadd(self._by_user(feedback.user_id), ref)
                await pipe.execute()

    async def everything(self, since: float | None = None) -> Sequence[tuple[str, Feedback]]:
        """Every conversation's feedback (given at ``since`` or later): (ref, record)."""
        client = self._redis()
        found: list[tuple[str, Feedback]] = []
        async with self._failures("feedback"):
            async for raw_key in client.scan_iter(match=_glob_escape(self._base) + "*",
                                                  count=1000):
                key = reply_text(raw_key)
                async with asyncio.timeout(self.section.timeout):
                    raw = await client.hvals(key)
                for record in (Feedback.from_dict(json.loads(r)) for r in raw):
                    if since is None or record.at >= since:
                        found.append((key[len(self._base):], record))
        return found

    async def forget(self, user_id: str, refs: Sequence[str]) -> int:
        """Delete the feedback of conversations ``refs`` and of those ``user_id`` rated
        in; how many conversations' feedback went."""
        client = self._redis()
        index = self._by_user(user_id)
        async with self._failures("feedback"), asyncio.timeout(self.section.timeout):
            rated = {reply_text(r) for r in await client.smembers(index)}
            keys = [self._base + ref for ref in sorted(rated | set(refs))]
            async with client.pipeline(transaction=True) as pipe:
                if keys:
                    pipe.delete(*keys)
                pipe.delete(index)
                result = await pipe.execute()
        return int(result[0]) if keys else 0

    async def list(self, ref: str) -> list[Feedback]:
        """The conversation's feedback, oldest first."""
        async with self._failures("feedback"), asyncio.timeout(self.section.timeout):
            raw = await self._redis().hvals(self._base + ref)
        return sorted((Feedback.from_dict(json.loads(r)) for r in raw), key=lambda f: f.at)

    def _failures(self, what: str) -> Any:
        return failures_as(StoreUnavailable, f"redis at {redact(self.section.url)}", what)


def _glob_escape(text: str) -> str:
    """``text`` matched literally in a SCAN pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def new_feedback(message_id: str, rating: Rating, comment: str, prompt: str, reply: str,
                 user_id: str) -> Feedback:
    """A record stamped with the current time."""
    return Feedback(message_id, rating, comment[:MAX_COMMENT_CHARS], prompt, reply, user_id,
                    time.time())
