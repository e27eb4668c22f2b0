"""Conversation memory inside the process: the default, so a bot runs with nothing installed.

Everything lives in this process's memory: it is lost when the process stops and is not
shared with other processes (run several front ends with the ``redis`` backend instead).
Its semantics are those of :mod:`core.memory.redis`: a window of turns per conversation
whose time to live is refreshed on load and append, dedupe of message ids (pending while
answered, then the stored reply for the redelivery window), facts per user of a channel
without expiry, and ``forget_user``. One process needs no lease: the engine's
in-process lane already orders a conversation. Expired entries are dropped when touched
and by a sweep of everything every ``sweep_interval`` seconds, so memory stays bounded
by what was active within the TTL.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from core.config import BotSettings, MemorySection
from core.lifecycle import ServiceBase
from core.memory.base import WAIT, Begun, MemorySnapshot, StoredReply, UserRef
from core.types import ConversationKey, Turn

Clock = Callable[[], float]


@dataclass(slots=True)
class _Conversation:
    turns: deque[Turn]
    expires_at: float


@dataclass(slots=True)
class _Seen:
    """The dedupe record of one conversation."""

    # message id -> (expiry, "p:{token}" while pending, or the stored reply). Insertion
    # order is nearly expiry order (an id is re-inserted when done), so expiring stops
    # at the first live id and a lookup checks the expiry of what it finds.
    ids: dict[str, tuple[float, str | StoredReply]] = field(default_factory=dict)
    by_user: dict[str, float] = field(default_factory=dict)  # user -> newest expiry
    expires_at: float = 0.0

    def expire(self, now: float) -> None:
        """Drop the oldest ids whose window ended."""
        while self.ids:
            oldest = next(iter(self.ids))
            if self.ids[oldest][0] > now:
                return
            del self.ids[oldest]

    def state(self, message_id: str, now: float) -> str | StoredReply | None:
        """The live state of ``message_id``, if any."""
        entry = self.ids.get(message_id)
        return entry[1] if entry is not None and entry[0] > now else None


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
        self._facts: dict[UserRef, dict[str, str]] = {}

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

    def _record(self, key: ConversationKey, now: float) -> _Seen:
        seen = self._seen.get(key)
        if seen is None or seen.expires_at <= now:
            seen = self._seen[key] = _Seen()
        seen.expire(now)
        return seen

    async def begin(
        self, key: ConversationKey, message_id: str, user_id: str, token: str
    ) -> Begun:
        """Mark ``message_id`` pending and load; or its stored reply; or :data:`WAIT`."""
        now = self._now()
        seen = self._record(key, now)
        state = seen.state(message_id, now)
        if isinstance(state, StoredReply):
            return Begun(replay=state)
        if state is not None and state != f"p:{token}":
            return WAIT
        lease = self.section.lease
        seen.ids[message_id] = (now + lease, f"p:{token}")
        seen.expires_at = max(seen.expires_at, now + lease)
        return Begun(snapshot=await self.load(key, user_id))

    async def finish(
        self, key: ConversationKey, message_id: str, user_id: str, token: str,
        turns: Sequence[Turn], reply: StoredReply,
    ) -> None:
        """Append ``turns`` and keep ``reply`` for the redelivery window."""
        now = self._now()
        seen = self._record(key, now)
        if isinstance(seen.state(message_id, now), StoredReply):
            return
        await self.append(key, turns)
        until = now + self.section.dedupe_window
        seen.ids.pop(message_id, None)  # re-inserted last: dict order is age order
        seen.ids[message_id] = (until, reply)
        while len(seen.ids) > self.section.dedupe_max:
            del seen.ids[next(iter(seen.ids))]
        seen.by_user[user_id] = until
        seen.expires_at = until

    async def abort(self, key: ConversationKey, message_id: str, token: str) -> None:
        """Forget the pending mark ``token`` holds on ``message_id``."""
        seen = self._seen.get(key)
        if seen is not None and seen.ids.get(message_id, (0.0, ""))[1] == f"p:{token}":
            del seen.ids[message_id]

    async def renew(self, key: ConversationKey, message_id: str, token: str) -> bool:
        """Extend the pending mark ``token`` holds; False if it is gone."""
        now = self._now()
        seen = self._seen.get(key)
        if seen is None or seen.ids.get(message_id, (0.0, ""))[1] != f"p:{token}":
            return False
        seen.ids[message_id] = (now + self.section.lease, f"p:{token}")
        seen.expires_at = max(seen.expires_at, now + self.section.lease)
        return True

    async def load(self, key: ConversationKey, user_id: str) -> MemorySnapshot:
        """The last ``window`` turns and the user's facts; refreshes the TTL."""
        now = self._now()
        conv = self._live(key, now)
        turns: tuple[Turn, ...] = ()
        if conv is not None:
            conv.expires_at = now + self.section.ttl
            turns = tuple(conv.turns)[-self.section.window :]
        facts = dict(self._facts.get(UserRef(key.bot, key.channel, user_id), {}))
        return MemorySnapshot(turns, facts)

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

    async def set_fact(self, user: UserRef, name: str, value: str) -> None:
        """Store ``name = value`` in the user's facts."""
        self._facts.setdefault(user, {})[name] = value

    def _mine(self, user: UserRef, now: float) -> tuple[set[ConversationKey], set[ConversationKey]]:
        """The user's conversations with turns kept, and those with only a dedupe record."""
        seen = {
            key for key, record in self._seen.items()
            if key.bot == user.bot and key.channel == user.channel
            and record.by_user.get(user.user_id, 0.0) > now
        }
        kept = set()
        for key in list(self._conversations):
            if key.bot != user.bot or key.channel != user.channel:
                continue
            conv = self._live(key, now)
            if conv is not None and (key in seen or any(
                turn.user_id == user.user_id for turn in conv.turns
            )):
                kept.add(key)
        return kept, seen - kept

    async def conversations(self, user: UserRef) -> list[ConversationKey]:
        """See :meth:`MemoryStore.conversations`."""
        kept, seen = self._mine(user, self._now())
        return sorted(kept | seen, key=str)

    async def forget_user(self, user: UserRef) -> int:
        """Delete the user's facts and every conversation holding their turns or replies.

        Returns the number of conversations plus the number of facts deleted.
        """
        kept, seen = self._mine(user, self._now())
        for key in kept:
            del self._conversations[key]
        for key in kept | seen:
            self._seen.pop(key, None)
        facts = self._facts.pop(user, {})
        return len(kept) + len(facts)


def create(settings: BotSettings) -> EmbeddedMemory:
    """The ``embedded`` memory backend for ``settings`` (entry point ``parley.memory``)."""
    return EmbeddedMemory(settings.memory)
