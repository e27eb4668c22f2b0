"""What moderation remembers between messages: rates, violation scores, mutes, audit log.

Front ends serving one bot must share it, so :class:`ModerationState` has a Redis
backend (``state_redis.py``) and this in-process one, for a single process with no
services (the demo). Users are referred to as ``channel:user_id``; both backends take
care of encoding.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Admission:
    """A message counted against the rate limits: counts in their windows, mute left.

    ``repeated``: the message's id was in both windows already, so this call counted
    nothing (a redelivery, or a resend of an attempt that was abandoned).
    """

    user_count: int
    conversation_count: int
    muted_for: float  # seconds of mute left; 0 if not muted
    repeated: bool = False


@dataclass(frozen=True, slots=True)
class Limits:
    """Flood limits: at most ``*_rate`` messages per ``*_window`` seconds."""

    user_rate: int
    user_window: float
    conversation_rate: int
    conversation_window: float


class ModerationState(Protocol):
    """Shared moderation state; every method is one round trip to wherever it lives.

    A state that lives in this process may set ``in_process = True``: its calls then run
    without a timeout around them.
    """

    async def start(self) -> None:
        """Connect (idempotent)."""

    async def stop(self) -> None:
        """Disconnect (idempotent)."""

    async def admit(self, user: str, conversation: str, limits: Limits, *,
                    message: str | None = None) -> Admission:
        """Count a message of ``user`` in ``conversation`` and report rates and mute.

        ``message`` identifies the message (see :func:`message_member`): one counted
        already, in the windows now, is not counted again (a redelivery; the admission
        says it was ``repeated``); None counts every call.
        """
        ...

    async def add_points(self, user: str, points: float, half_life: float) -> float:
        """Add violation points to the user's decaying score and return the new score."""
        ...

    async def record(
        self, entry: Mapping[str, str], *, mute_user: str | None = None,
        mute_seconds: float = 0.0, escalate: bool = False,
    ) -> None:
        """Append ``entry`` to the audit log; mute a user and/or hand the case to people."""
        ...

    async def read_audit(self, count: int) -> list[dict[str, str]]:
        """The newest ``count`` audit entries, newest first."""
        ...

    async def unmute(self, user: str) -> bool:
        """Lift ``user``'s mute now; whether they were muted."""
        ...

    async def read_escalations(self, count: int) -> list[dict[str, str]]:
        """The newest ``count`` escalated cases, newest first."""
        ...


class MemoryState:
    """:class:`ModerationState` in this process, bounded; ``clock`` is injectable."""

    in_process = True  # never waits on I/O, so callers need no timeout around it

    def __init__(
        self, *, audit_max_entries: int = 100_000, audit_retention: float = 30 * 86400.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.clock = clock
        self.retention = audit_retention
        self._hits: dict[str, _Window] = {}
        # user -> (score, at, gone): gone once decayed below a hundredth, as in Redis
        self._scores: dict[str, tuple[float, float, float]] = {}
        self._mutes: dict[str, float] = {}  # user -> until
        self._audit: deque[dict[str, str]] = deque(maxlen=audit_max_entries)
        self._escalations: deque[dict[str, str]] = deque(maxlen=audit_max_entries)
        self._seq = itertools.count()

    async def start(self) -> None:
        """Nothing to connect to."""

    async def stop(self) -> None:
        """Nothing to release."""

    def _window(self, key: str) -> _Window:
        hits = self._hits.get(key)
        if hits is None:
            hits = self._hits[key] = _Window()
        return hits

    async def admit(self, user: str, conversation: str, limits: Limits, *,
                    message: str | None = None) -> Admission:
        """See :class:`ModerationState`."""
        now = self.clock()
        if len(self._hits) > 100_000:
            self._sweep(now, max(limits.user_window, limits.conversation_window))
        until = self._mutes.get(user, 0.0)
        users = self._window(f"u:{user}")
        convs = self._window(f"c:{conversation}")
        added = (users.count(now - limits.user_window, now, message)
                 + convs.count(now - limits.conversation_window, now, message))
        return Admission(len(users.stamps), len(convs.stamps), max(0.0, until - now),
                         repeated=added == 0)

    def _sweep(self, now: float, window: float) -> None:
        for key in [k for k, hits in self._hits.items()
                    if not hits.stamps or hits.stamps[-1][0] <= now - window]:
            del self._hits[key]
        for user in [u for u, until in self._mutes.items() if until <= now]:
            del self._mutes[user]
        for user in [u for u, (_, _, gone) in self._scores.items() if gone <= now]:
            del self._scores[user]

    async def add_points(self, user: str, points: float, half_life: float) -> float:
        """See :class:`ModerationState`."""
        now = self.clock()
        score, at, gone = self._scores.get(user, (0.0, now, now))
        score = (decayed(score, now - at, half_life) if gone > now else 0.0) + points
        self._scores[user] = (score, now, now + score_life(score, half_life))
        return score

    async def record(
        self, entry: Mapping[str, str], *, mute_user: str | None = None,
        mute_seconds: float = 0.0, escalate: bool = False,
    ) -> None:
        """See :class:`ModerationState`."""
        now = self.clock()
        stamped = {"id": f"{int(now * 1000)}-{next(self._seq)}", **entry}
        while self._audit and float(self._audit[0]["id"].split("-")[0]) / 1000 < (
            now - self.retention
        ):
            self._audit.popleft()
        self._audit.append(stamped)
        if mute_user is not None and mute_seconds > 0:
            self._mutes[mute_user] = max(self._mutes.get(mute_user, 0.0), now + mute_seconds)
        if escalate:
            self._escalations.append(stamped)

    async def unmute(self, user: str) -> bool:
        """See :class:`ModerationState`."""
        return self._mutes.pop(user, 0.0) > self.clock()

    async def forget_user(self, user: str, conversations: Sequence[str] = ()) -> int:
        """Delete ``user``'s audit and escalation entries; how many went. The mute, the
        score and the flood windows are kept, as the Redis state keeps them (see
        :meth:`~core.moderation.state_redis.RedisState.forget_user`)."""
        now = self.clock()
        # What has run its course goes now rather than at the next sweep.
        if self._mutes.get(user, now) <= now:
            self._mutes.pop(user, None)
        if self._scores.get(user, (0.0, now, now))[2] <= now:
            self._scores.pop(user, None)
        channel, _, user_id = user.partition(":")
        count = 0
        for log in (self._audit, self._escalations):
            kept = [e for e in log if e.get("user") != user_id or e.get("channel") != channel]
            count += len(log) - len(kept)
            log.clear()
            log.extend(kept)
        return count

    async def read_audit(self, count: int) -> list[dict[str, str]]:
        """See :class:`ModerationState`."""
        return list(reversed(self._audit))[:count]

    async def read_escalations(self, count: int) -> list[dict[str, str]]:
        """See :class:`ModerationState`."""
        return list(reversed(self._escalations))[:count]

    def dump(self) -> str:
        """Everything held, as text (for tests that look for leaks)."""
        return json.dumps(
            [list(self._audit), list(self._escalations), list(self._hits), list(self._scores),
             list(self._mutes)],
            ensure_ascii=False,
        )


class _Window:
    """The messages counted in one flood window: (stamp, message) oldest first, and the
    messages' ids (a redelivered one is not counted again while it is in the window)."""

    __slots__ = ("messages", "stamps")

    def __init__(self) -> None:
        self.stamps: deque[tuple[float, str | None]] = deque()
        self.messages: set[str | None] = set()

    def count(self, expired: float, now: float, message: str | None) -> int:
        """Drop what has left the window and count ``message``: 1 if it was, else 0."""
        stamps = self.stamps
        while stamps and stamps[0][0] <= expired:
            self.messages.discard(stamps.popleft()[1])
        if message is None or message not in self.messages:
            self.messages.add(message)
            stamps.append((now, message))
            return 1
        return 0


def message_member(conversation_id: str, message_id: str) -> str | None:
    """How a flood window knows a message again: its id within its conversation (ids
    need only be unique there); None if it has no id."""
    return f"{len(conversation_id)}:{conversation_id}:{message_id}" if message_id else None


def score_life(score: float, half_life: float) -> float:
    """Seconds until ``score`` decays below a hundredth of a point (at least one half
    life): when the Redis state lets its key expire."""
    return half_life * max(1.0, math.log2(max(score, 1.0) * 100))


def decayed(score: float, elapsed: float, half_life: float) -> float:
    """``score`` after ``elapsed`` seconds of halving every ``half_life`` seconds."""
    if elapsed <= 0:
        return score
    return score * math.pow(0.5, elapsed / half_life)
