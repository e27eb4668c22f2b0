"""Order and back-pressure for conversations: in this process, and across front ends.

Messages of one conversation are answered one at a time, in arrival order:

- in this process, a FIFO lane per conversation (a lock of its own): the fast path,
  which costs no round trip;
- across processes, the head of each lane claims the conversation in memory
  (:meth:`MemoryStore.begin`: a lease renewed while the reply is made, and a queue in
  arrival order), so two front ends on one Redis never answer one conversation from the
  same history. A crashed holder blocks its conversation for at most one lease.

Before a message waits it is admitted: a lane holds at most ``max_queued`` waiting
messages, a user at most ``max_in_flight`` messages in flight; beyond either the caller
is refused at once (:class:`SlowDown`) instead of holding a connection in a queue.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType

from core.errors import GeneratorBusy, MemoryUnavailable, ParleyError
from core.memory.base import Begun, MemoryStore
from core.types import ConversationKey, IncomingMessage

log = logging.getLogger(__name__)

# How often a queued message asks memory again whether its turn has come: starting
# fast for a short wait, backing off to the cap for a long one.
POLL_FIRST = 0.002
POLL_CAP = 0.05


class SlowDown(ParleyError):
    """A message refused before it waited: too many queued in its conversation or in
    flight for its user, or over a rate limit (``reply`` then says which)."""

    def __init__(self, reason: str, reply: str | None = None, action: str = "allow",
                 *, notice: bool = False) -> None:
        super().__init__(reason)
        self.reply = reply
        self.action = action  # what moderation did, when it refused
        self.notice = notice  # answered as moderation's refusal, not "slow down"


# Asked once a message holds its place in the lane: a refusal to raise, or None.
Admit = Callable[[IncomingMessage], Awaitable[SlowDown | None]]


class _Lane:
    """A FIFO lock for one conversation, counted so idle lanes can be dropped.

    Its own, not an ``asyncio.Lock``: most messages find their lane free (it is made for
    them), and one queued behind another takes its place at once, with a future, where a
    lock's ``acquire`` would need a task of its own to queue while admission is asked.
    """

    __slots__ = ("held", "key", "users", "waiters")

    def __init__(self, key: ConversationKey) -> None:
        self.key = key
        self.users = 0
        self.held = False
        self.waiters: deque[asyncio.Future[None]] = deque()

    def take(self) -> asyncio.Future[None] | None:
        """Hold the lane now (None), or queue for it: a future done once it is held."""
        if not self.held:
            self.held = True
            return None
        waiting = asyncio.get_running_loop().create_future()
        self.waiters.append(waiting)
        return waiting

    def release(self) -> None:
        """Pass the lane to the first still waiting, in arrival order, or free it."""
        while self.waiters:
            waiting = self.waiters.popleft()
            if not waiting.done():
                waiting.set_result(None)
                return
        self.held = False

    def give_up(self, waiting: asyncio.Future[None]) -> None:
        """A queued message leaves (refused, cancelled): its turn, if it came, passes on."""
        if waiting.done() and not waiting.cancelled():
            self.release()
        else:
            waiting.cancel()  # skipped when the lane passes on


class _Entry:
    """What :meth:`Lanes.enter` returns: a plain class, not an ``@asynccontextmanager``
    generator (an async generator of its own for every message)."""

    __slots__ = ("_admit", "_lane", "_lanes", "_message")

    def __init__(self, lanes: Lanes, message: IncomingMessage, admit: Admit | None) -> None:
        self._lanes = lanes
        self._message = message
        self._admit = admit
        self._lane: _Lane | None = None

    async def __aenter__(self) -> None:
        self._lane = await self._lanes.hold(self._message, self._admit)

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        traceback: TracebackType | None) -> None:
        lane, self._lane = self._lane, None
        if lane is not None:
            self._lanes.leave(lane, self._message)


class Lanes:
    """The in-process lanes of one engine, with admission before the wait."""

    def __init__(self, *, max_queued: int, max_in_flight: int) -> None:
        self.max_queued = max_queued
        self.max_in_flight = max_in_flight
        self._lanes: dict[ConversationKey, _Lane] = {}
        self._in_flight: dict[tuple[str, str], int] = {}

    def __len__(self) -> int:
        """How many conversations have a message queued or being answered here."""
        return len(self._lanes)

    def enter(self, message: IncomingMessage, admit: Admit | None = None) -> _Entry:
        """Hold ``message``'s lane (``async with``); raises :class:`SlowDown` at once,
        before waiting, when its lane or its user has too many messages already, or when
        ``admit`` (rate limits) refuses it; ``admit`` is asked while the message keeps
        its place in the lane, so arrival order holds however long it takes to answer."""
        return _Entry(self, message, admit)

    async def hold(self, message: IncomingMessage, admit: Admit | None = None) -> _Lane:
        """:meth:`enter` without the context manager, for the engine (whose every
        message would pay for its object and its two coroutines): the lane, held once
        this returns, to hand back to :meth:`leave` whatever happens after."""
        lane = self._join(message)
        # Queued first and asked while queued: a refusal comes at once, not after the
        # messages ahead are answered.
        waiting = lane.take()
        try:
            if admit is not None:
                refusal = await admit(message)
                if refusal is not None:
                    raise refusal
            if waiting is not None:
                await waiting
        except BaseException:
            try:
                if waiting is None:
                    lane.release()
                else:
                    lane.give_up(waiting)
            finally:
                self._leave(lane, message)
            raise
        return lane

    def leave(self, lane: _Lane, message: IncomingMessage) -> None:
        """Let go of ``lane``, which :meth:`hold` gave ``message``."""
        try:
            lane.release()
        finally:
            self._leave(lane, message)

    def _join(self, message: IncomingMessage) -> _Lane:
        key, who = message.key, (message.channel, message.user_id)
        lane = self._lanes.get(key)
        if lane is not None and lane.users > self.max_queued:
            raise SlowDown(f"{key}: {lane.users - 1} messages already queued")
        flying = self._in_flight.get(who, 0)
        if flying >= self.max_in_flight:
            raise SlowDown(f"{key}: user has {flying} messages in flight")
        if lane is None:
            lane = self._lanes[key] = _Lane(key)
        lane.users += 1
        self._in_flight[who] = flying + 1
        return lane

    def _leave(self, lane: _Lane, message: IncomingMessage) -> None:
        lane.users -= 1
        if lane.users == 0:
            del self._lanes[lane.key]
        who = (message.channel, message.user_id)
        left = self._in_flight[who] - 1
        if left:
            self._in_flight[who] = left
        else:
            del self._in_flight[who]


class Renewals:
    """When the claims of one process renew their leases: one timer for all of them,
    every sixth of a lease, instead of one per message. A claim starts renewing a third
    to a half of a lease after it was made, then every third of a lease."""

    def __init__(self, lease: float) -> None:
        self.lease = lease
        self._held: dict[Claim, float] = {}  # claim -> when it was made (loop time)
        self._timer: asyncio.TimerHandle | None = None

    def add(self, claim: Claim) -> None:
        """Renew ``claim`` from a third of a lease on."""
        loop = asyncio.get_running_loop()
        self._held[claim] = loop.time()
        if self._timer is None:
            self._timer = loop.call_later(self.lease / 6, self._tick)

    def discard(self, claim: Claim) -> None:
        """``claim`` no longer needs renewing (or renews on its own now)."""
        self._held.pop(claim, None)

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() - self.lease / 3
        for claim, since in list(self._held.items()):
            if since <= due:
                del self._held[claim]
                claim.renew_from_now()
        self._timer = loop.call_later(self.lease / 6, self._tick) if self._held else None


@dataclass(slots=True, eq=False)
class Claim:
    """A message's hold on its conversation in memory, from ``begin`` to ``finish`` or
    ``abort``; renewed in the background while held (by ``renewals``' timer, shared by
    the claims of an engine; a claim made without one gets its own)."""

    memory: MemoryStore
    message: IncomingMessage
    token: str
    lease: float
    renewals: Renewals | None = None
    settled: bool = False
    _renewing: asyncio.Task[None] | None = None

    async def begin(self, deadline: float) -> Begun:
        """Claim the conversation, waiting in its queue until ``deadline`` (monotonic);
        raises :class:`GeneratorBusy` if the turn does not come by then."""
        msg = self.message
        pause = POLL_FIRST
        while True:
            begun = await self.memory.begin(msg.key, msg.message_id, msg.user_id, self.token)
            if not begun.waiting:
                if begun.snapshot is not None:
                    if self.renewals is None:
                        self.renewals = Renewals(self.lease)
                    self.renewals.add(self)
                else:
                    self.settled = True  # a replay: nothing was claimed
                return begun
            if time.monotonic() + pause > deadline:
                raise GeneratorBusy(f"{msg.key}: waited too long for the conversation")
            await asyncio.sleep(pause)
            pause = min(pause * 2, POLL_CAP)

    def renew_from_now(self) -> None:
        """Renew the lease now and every third of a lease until stopped."""
        if not self.settled and self._renewing is None:
            self._renewing = asyncio.get_running_loop().create_task(self._renew())

    async def _renew(self) -> None:
        msg = self.message
        while True:
            try:
                if not await self.memory.renew(msg.key, msg.message_id, self.token):
                    log.warning("lanes: %s lost its lease (message %s took longer than the "
                                "lease and another front end took over)", msg.key,
                                msg.message_id)
                    return
            except MemoryUnavailable as exc:
                log.warning("lanes: renewing the lease of %s failed: %s", msg.key, exc)
            await asyncio.sleep(self.lease / 3)

    def stop_renewing(self) -> None:
        """Stop the background renewal (before the claim is settled)."""
        if self.renewals is not None:
            self.renewals.discard(self)
        if self._renewing is not None:
            self._renewing.cancel()

    async def release(self) -> None:
        """Abort the claim unless it was settled: a redelivery will be answered. Never
        raises for memory; a release that fails expires with the lease."""
        self.stop_renewing()
        if self.settled:
            return
        self.settled = True
        msg = self.message
        try:
            await self.memory.abort(msg.key, msg.message_id, self.token)
        except MemoryUnavailable as exc:
            log.warning("lanes: releasing %s failed (it expires with its lease): %s",
                        msg.key, exc)
