"""Conversation memory inside the process: the default, so a bot runs with nothing installed.

Everything lives in this process's memory: it is lost when the process stops and is not
shared with other processes (run several front ends with the ``redis`` backend instead).
Its semantics are those of :mod:`core.memory.redis`: a window of turns per conversation
whose time to live is refreshed on load and append, dedupe of message ids with expiry,
facts per user without expiry, and ``forget_user``. Expired entries are dropped when
touched and by a sweep of everything every ``sweep_interval`` seconds, so memory stays
bounded by what was active within the TTL.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from core.config import BotSettings, MemorySection
from core.lifecycle import ServiceBase
from core.memory.base import MemorySnapshot
from core.types import ConversationKey, Turn

SEEN_TTL_CAP = 24 * 3600  # seconds a message id is remembered for dedupe, at most
SEEN_PER_CONVERSATION = 10_000  # message ids kept per conversation, at most

Clock = Callable[[], float]


@dataclass(slots=True)
class _Conversation:
    turns: deque[Turn]
    expires_at: float


@dataclass(slots=True)
class _Seen:
    # message id -> expiry; dicts keep insertion order, which is also expiry order
    # because every id gets the same TTL.
    ids: dict[str, float] = field(default_factory=dict)
    expires_at: float = 0.0


class EmbeddedMemory(ServiceBase):
    """A :class:`~core.memory.base.MemoryStore` in this process's memory.

    ``clock`` returns seconds (``time.monotonic`` by default); tests pass their own to
    move time forward. Stopping does not forget: memory lasts as long as the object.
    """

    def __init__(
        self,
        section: MemorySection,
        *,
        clock: Clock = time.monotonic,
        sweep_interval: float = 60.0,
    ) -> None:
        self.section = section
        self._clock = clock
        self._sweep_interval = sweep_interval
        self._next_sweep = clock() + sweep_interval
        self._conversations: dict[ConversationKey, _Conversation] = {}
        self._seen: dict[ConversationKey, _Seen] = {}
        self._facts: dict[tuple[str, str], dict[str, str]] = {}

    def _now(self) -> float:
        now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)
        return now

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + self._sweep_interval
        for key in [k for k, c in self._conversations.items() if c.expires_at <= now]:
            del self._conversations[key]
        for key in [k for k, s in self._seen.items() if s.expires_at <= now]:
            del self._seen[key]

    def _live(self, key: ConversationKey, now: float) -> _Conversation | None:
        conv = self._conversations.get(key)
        if conv is not None and conv.expires_at <= now:
            del self._conversations[key]
            return None
        return conv

    @property
    def conversation_count(self) -> int:
        """How many conversations are held (expired ones included until swept)."""
        return len(self._conversations)

    async def mark_seen(self, key: ConversationKey, message_id: str) -> bool:
        """Record ``message_id``; False if it was recorded within the dedupe TTL."""
        now = self._now()
        ttl = min(self.section.ttl, SEEN_TTL_CAP)
        seen = self._seen.get(key)
        if seen is None or seen.expires_at <= now:
            seen = self._seen[key] = _Seen()
        while seen.ids:
            oldest = next(iter(seen.ids))
            if seen.ids[oldest] > now:
                break
            del seen.ids[oldest]
        if message_id in seen.ids:
            return False
        seen.ids[message_id] = now + ttl
        while len(seen.ids) > SEEN_PER_CONVERSATION:
            del seen.ids[next(iter(seen.ids))]
        seen.expires_at = now + ttl
        return True

    async def load(self, key: ConversationKey, user_id: str) -> MemorySnapshot:
        """The last ``window`` turns and the user's facts; refreshes the TTL."""
        now = self._now()
        conv = self._live(key, now)
        turns: tuple[Turn, ...] = ()
        if conv is not None:
            conv.expires_at = now + self.section.ttl
            turns = tuple(conv.turns)[-self.section.window :]
        facts = dict(self._facts.get((key.bot, user_id), {}))
        return MemorySnapshot(turns, facts)

    async def load_unseen(
        self, key: ConversationKey, message_id: str, user_id: str
    ) -> MemorySnapshot | None:
        """:meth:`mark_seen`, then :meth:`load`; None for a duplicate."""
        if not await self.mark_seen(key, message_id):
            return None
        return await self.load(key, user_id)

    async def append(self, key: ConversationKey, turns: Sequence[Turn]) -> None:
        """Add ``turns`` and trim to the window."""
        if not turns:
            return
        now = self._now()
        conv = self._live(key, now)
        if conv is None:
            conv = _Conversation(deque(maxlen=self.section.window), 0.0)
            self._conversations[key] = conv
        conv.turns.extend(turns)
        conv.expires_at = now + self.section.ttl

    async def reset(self, key: ConversationKey) -> None:
        """Delete the conversation's turns (its dedupe record stays)."""
        self._now()
        self._conversations.pop(key, None)

    async def set_fact(self, bot: str, user_id: str, name: str, value: str) -> None:
        """Store ``name = value`` in the user's facts."""
        self._facts.setdefault((bot, user_id), {})[name] = value

    async def forget_user(self, bot: str, user_id: str) -> int:
        """Delete the user's facts and every conversation holding their turns.

        Returns the number of conversations plus the number of facts deleted.
        """
        now = self._now()
        gone = [
            key
            for key in list(self._conversations)
            if key.bot == bot
            and (conv := self._live(key, now)) is not None
            and any(turn.user_id == user_id for turn in conv.turns)
        ]
        for key in gone:
            del self._conversations[key]
            self._seen.pop(key, None)
        facts = self._facts.pop((bot, user_id), {})
        return len(gone) + len(facts)


def create(settings: BotSettings) -> EmbeddedMemory:
    """The ``embedded`` memory backend for ``settings`` (entry point ``parley.memory``)."""
    return EmbeddedMemory(settings.memory)
