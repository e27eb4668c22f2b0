"""Reply events kept for a while, numbered per conversation, so a widget can resume.

The events of a web conversation (the user's message, typing, deltas, reset, final,
notice, error) are appended to the conversation's log in batches
(:class:`bots.web.writer.ReplyWriter`), each entry under the next sequence
number. A socket forwards what is appended while it is open; a widget that reconnects
asks for everything after the last number it saw, and gets exactly that.

Two backends, chosen like memory: in Redis when ``[memory] backend = "redis"`` (so any
front end can resume any conversation, with a pub/sub poke telling the others that a
log grew), in this process otherwise. Key layout (``{p}`` is ``memory.key_prefix``,
``{ref}`` is ``{channel}:{conversation_id}``, every part percent-encoded)::

    {p}:{bot}:web:seq:{ref}     string  the last sequence number given out
    {p}:{bot}:web:log:{ref}     list    "{seq}\\n{json}", oldest first, capped
    {p}:{bot}:web:events        channel "{origin}\\n{ref}\\n{seq}" on every append, when
                                another front end listens (PUBSUB NUMSUB in the script)

Numbers start at the current time in microseconds when a log is new (or expired), so
they keep growing even across an expiry: a widget's old number is then a gap, never a
number that means something else.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from core import jsoncodec
from core.config import MemorySection
from core.errors import ParleyError
from core.lifecycle import ServiceBase
from core.redis_client import RedisHub, RedisService, key_part, redact, reply_text

log = logging.getLogger(__name__)

Entry = dict[str, Any]  # one event as the widget gets it, with its "seq"
# The kinds that end a reply; "message": what a plugin sent into the conversation on its
# own (the outbox).
TERMINAL = frozenset({"final", "notice", "error", "message"})
class StoreUnavailable(ParleyError):
    """The widget's store (reply-event log, feedback) could not be read or written."""


@dataclass(frozen=True, slots=True)
class Backlog:
    """Entries after a sequence number; ``gap`` if some of them are no longer kept."""

    entries: list[Entry]
    gap: bool
    last: int  # the newest number given out in the conversation (0: none)


class Subscription:
    """Events appended to one conversation while the subscription is open.

    ``get`` returns an entry appended in this process, or ``None`` when another
    process appended something (read it with :meth:`ReplyLog.since`).
    """

    def __init__(self, ref: str) -> None:
        self.ref = ref
        # A list and one waiter rather than an asyncio.Queue: one reader, which takes
        # everything waiting at once.
        self._waiting: list[Entry | None] = []
        self._waiter: asyncio.Future[None] | None = None

    def put(self, entry: Entry | None) -> None:
        """Hand an entry (or a poke) to the subscriber."""
        self._waiting.append(entry)
        self._wake()

    def put_all(self, entries: list[Entry]) -> None:
        """Hand the entries of one append to the subscriber (one wake-up for them all)."""
        self._waiting.extend(entries)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        while not self._waiting:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def get(self) -> Entry | None:
        """The next entry or poke; waits for one."""
        await self._wait()
        return self._waiting.pop(0)

    async def batch(self) -> list[Entry | None]:
        """Every entry and poke waiting (at least one); waits for one."""
        await self._wait()
        waiting, self._waiting = self._waiting, []
        return waiting

    def ready(self) -> list[Entry | None]:
        """The entries and pokes already waiting, without waiting."""
        waiting, self._waiting = self._waiting, []
        return waiting


class ReplyLog(ServiceBase):
    """The shared part of both backends: local subscribers and fan-out."""

    def __init__(self, *, ttl: int, cap: int) -> None:
        self.ttl = ttl
        self.cap = cap
        self._subscribers: dict[str, set[Subscription]] = {}

    @contextmanager
    def subscribe(self, ref: str) -> Iterator[Subscription]:
        """Receive what is appended to ``ref`` until the block ends."""
        sub = Subscription(ref)
        self._subscribers.setdefault(ref, set()).add(sub)
        try:
            yield sub
        finally:
            subs = self._subscribers.get(ref)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subscribers[ref]

    def _fan_out(self, ref: str, entry: Entry | None) -> None:
        for sub in self._subscribers.get(ref, ()):
            sub.put(entry)

    def tell(self, ref: str, entry: Entry) -> None:
        """Hand an unnumbered entry (a failure of the log itself) to this process's
        subscribers of ``ref``; it is not kept."""
        self._fan_out(ref, entry)

    async def append(self, ref: str, events: list[Entry]) -> list[Entry]:
        """Number ``events`` (consecutively), keep them, hand them to subscribers; the
        numbered entries. One call whatever their number."""
        first = await self._append(ref, events)
        entries = [{"seq": first + i, **event} for i, event in enumerate(events)]
        for sub in self._subscribers.get(ref, ()):
            sub.put_all(entries)
        return entries

    async def _append(self, ref: str, events: list[Entry]) -> int:
        """Keep ``events`` under the next numbers; the first of them."""
        raise NotImplementedError

    async def since(self, ref: str, after: int) -> Backlog:
        """The kept entries numbered above ``after``, oldest first."""
        raise NotImplementedError

    async def drop(self, refs: list[str]) -> int:
        """Delete the logs of ``refs`` (a user is forgotten); how many there were."""
        raise NotImplementedError


def _backlog(numbered: list[tuple[int, Entry]], after: int, last: int) -> Backlog:
    entries = [{"seq": seq, **event} for seq, event in numbered if seq > after]
    oldest = numbered[0][0] if numbered else last + 1
    # A gap: the widget saw something before, and what came right after it is gone.
    gap = after > 0 and (oldest > after + 1 or after > last)
    return Backlog(entries, gap, last)


@dataclass(slots=True)
class _Kept:
    entries: deque[tuple[int, Entry]]
    last: int
    expires_at: float = field(default=0.0)


class MemoryReplyLog(ReplyLog):
    """The log in this process's memory (with ``[memory] backend = "embedded"``)."""

    def __init__(self, *, ttl: int, cap: int, sweep_interval: float = 60.0) -> None:
        super().__init__(ttl=ttl, cap=cap)
        self._logs: dict[str, _Kept] = {}
        self._sweep_interval = sweep_interval
        self._next_sweep = 0.0

    def _live(self, ref: str, now: float) -> _Kept | None:
        if now >= self._next_sweep:
            self._next_sweep = now + self._sweep_interval
            for key in [k for k, kept in self._logs.items() if kept.expires_at <= now]:
                del self._logs[key]
        kept = self._logs.get(ref)
        if kept is not None and kept.expires_at <= now:
            del self._logs[ref]
            return None
        return kept

    async def _append(self, ref: str, events: list[Entry]) -> int:
        now = time.time()
        kept = self._live(ref, now)
        if kept is None:
            kept = self._logs[ref] = _Kept(deque(maxlen=self.cap), int(now * 1_000_000))
        first = kept.last + 1
        for event in events:
            kept.last += 1
            kept.entries.append((kept.last, event))
        kept.expires_at = now + self.ttl
        return first

    async def since(self, ref: str, after: int) -> Backlog:
        """The kept entries numbered above ``after``, oldest first."""
        kept = self._live(ref, time.time())
        if kept is None:
            return _backlog([], after, 0)
        return _backlog(list(kept.entries), after, kept.last)

    async def drop(self, refs: list[str]) -> int:
        """Delete the logs of ``refs``; how many there were."""
        return sum(self._logs.pop(ref, None) is not None for ref in refs)


# KEYS: seq, log. ARGV: channel, origin, ref, listeners ('0' or '1'), entries (JSON)...
# Written with the log's cap and TTL (:func:`_append_source`): numbers go to Redis as
# strings (a Lua number is printed with %.17g, thousands of instructions), none is
# parsed per call, and the usual append of one or two entries builds no table.
_APPEND = """
local n = #ARGV - 4
local last = redis.call('INCRBY', KEYS[1], string.format('%d', n))
if last == n then
  -- A new (or expired) log: its numbers start at the time in microseconds.
  local t = redis.call('TIME')
  last = t[1] * 1000000 + t[2] + n
  redis.call('SET', KEYS[1], string.format('%d', last))
end
local first = last - n + 1
-- %d: a plain concatenation would write a number this big as 1.79e+15.
local length = 0
if n == 1 then  -- most appends: one or two entries, pushed without a table
  length = redis.call('RPUSH', KEYS[2], string.format('%d\\n', first) .. ARGV[5])
elseif n == 2 then
  length = redis.call('RPUSH', KEYS[2], string.format('%d\\n', first) .. ARGV[5],
                      string.format('%d\\n', first + 1) .. ARGV[6])
else
  local items = {}
  for i = 1, n do items[i] = string.format('%d\\n', first + i - 1) .. ARGV[4 + i] end
  for i = 1, n, 1000 do  -- one RPUSH per thousand: unpack() has a stack limit
    length = redis.call('RPUSH', KEYS[2], unpack(items, i, math.min(i + 999, n)))
  end
end
if length > $CAP then
  redis.call('LTRIM', KEYS[2], '-$CAP', '-1')
end
redis.call('EXPIRE', KEYS[1], '$TTL')
redis.call('EXPIRE', KEYS[2], '$TTL')
-- Only when another front end listens: ARGV[4] is how many listeners this one is.
local listeners = redis.call('PUBSUB', 'NUMSUB', ARGV[1])[2]
if listeners > 1 or (listeners == 1 and ARGV[4] == '0') then
  redis.call('PUBLISH', ARGV[1], ARGV[2] .. '\\n' .. ARGV[3] .. '\\n' .. string.format('%d', last))
end
return first
"""


def _append_source(cap: int, ttl: int) -> str:
    """The append script for a log of ``cap`` entries kept ``ttl`` seconds."""
    return _APPEND.replace("$CAP", str(int(cap))).replace("$TTL", str(int(ttl)))


# KEYS: seq, log.
_SINCE = "return {redis.call('GET', KEYS[1]), redis.call('LRANGE', KEYS[2], 0, -1)}"

_RESUBSCRIBE_DELAY = 1.0


class RedisReplyLog(ReplyLog, RedisService):
    """The log in Redis (with ``[memory] backend = "redis"``); see the module docstring."""

    def __init__(self, section: MemorySection, bot: str, *, ttl: int, cap: int,
                 source: str = "<memory>", redis: RedisHub | None = None) -> None:
        super().__init__(ttl=ttl, cap=cap)
        # The process's shared connections to this Redis when the app passes them.
        RedisService.__init__(
            self, section.url, {"append": _append_source(cap, ttl), "since": _SINCE},
            timeout=section.timeout, setting=f"{source}: memory.url", error=StoreUnavailable,
            failing=f"redis at {redact(section.url)}", redis=redis)
        self.section = section
        self.source = source
        self._base = f"{section.key_prefix}:{key_part(bot)}:web:"
        self.channel = self._base + "events"
        self._origin = secrets.token_hex(8)  # this process, to skip its own pokes
        self._listener: asyncio.Task[None] | None = None
        # Subscribed to the pokes: then an append pokes only when someone else listens.
        self._listening = False

    async def _start(self) -> None:
        await super()._start()
        ready = asyncio.get_running_loop().create_future()
        self._listener = asyncio.create_task(self._listen(self._redis, ready))
        await ready  # subscribed: no poke sent after start() returns is missed

    async def _stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
        self._listening = False
        await super()._stop()

    async def _listen(self, client: Redis, ready: asyncio.Future[None]) -> None:
        """Poke local subscribers when another front end appends to their conversation."""
        while True:
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(self.channel)
                    self._listening = True
                    if not ready.done():
                        ready.set_result(None)
                    async for message in pubsub.listen():
                        if message.get("type") != "message":
                            continue
                        origin, ref, _ = reply_text(message["data"]).split("\n", 2)
                        if origin != self._origin:
                            self._fan_out(ref, None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._listening = False
                # Sockets then learn of other front ends' events only when they resume.
                log.warning("web: resume pub/sub on %s failed: %s; retrying",
                            redact(self.section.url), exc)
                if not ready.done():
                    ready.set_result(None)
                await asyncio.sleep(_RESUBSCRIBE_DELAY)

    def _keys(self, ref: str) -> list[str]:
        return [f"{self._base}seq:{ref}", f"{self._base}log:{ref}"]

    async def _append(self, ref: str, events: list[Entry]) -> int:
        encoded = [jsoncodec.dumpb(e) for e in events]
        args = [self.channel, self._origin, ref, "1" if self._listening else "0", *encoded]
        return int(await self._run("append", self._keys(ref), args))

    async def since(self, ref: str, after: int) -> Backlog:
        """The kept entries numbered above ``after``, oldest first."""
        last, raw = await self._run("since", self._keys(ref), [])
        numbered = []
        for item in raw:
            seq, _, encoded = reply_text(item).partition("\n")
            numbered.append((int(seq), jsoncodec.loads(encoded)))
        return _backlog(numbered, after, int(last) if last is not None else 0)

    async def drop(self, refs: list[str]) -> int:
        """Delete the logs of ``refs`` (and their numbers); how many there were."""
        client = self._redis  # (before start: an error, even for no refs)
        if not refs:
            return 0
        async with self._failures("forget"), asyncio.timeout(self.section.timeout):
            async with client.pipeline(transaction=False) as pipe:
                pipe.delete(*(f"{self._base}log:{ref}" for ref in refs))
                pipe.delete(*(f"{self._base}seq:{ref}" for ref in refs))
                logs, _ = await pipe.execute()
        return int(logs)
