"""Moderation state in Redis, shared by every front end of a bot.

Key layout (``{p}`` is the key prefix, the bot name and ids percent-encoded)::

    {p}:{bot}:mod:rate:u:{user}      zset  messages (by id) stamped, in the user's window
    {p}:{bot}:mod:rate:c:{conv}      zset  messages (by id) stamped, in the conversation's window
    {p}:{bot}:mod:score:{user}       hash  score, at (ms): the decaying violation score
    {p}:{bot}:mod:mute:{user}        string, expiring when the mute ends
    {p}:{bot}:mod:audit              stream  decisions; capped by count and by age
    {p}:{bot}:mod:escalations        stream  cases handed to people; capped by count

Every key but the streams expires on its own. Each call is one round trip (a Lua script
or a pipeline). Times come from the Redis server, so front ends with skewed clocks agree.

The flood admit is a script of its own, not a part of memory's ``begin`` (though both
run for every message, one after the other when the conversation's lane is free): it is
asked before the message waits for its lane, so a refusal comes at once, while ``begin``
runs after the wait; the moderation state may live in another Redis than memory, or in
the process; and a script's fixed cost in Redis is small beside its commands' (measured
with bench/redis_cost.py: the admit's ten commands are most of its instructions), so
one script for both would save little of Redis's time for a memory store that knows
moderation's keys. (Admits of many messages made in one turn of the event loop still go
out in one write with the other calls: :class:`~core.redis_pipeline.ScriptPipeline`.)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from redis.asyncio import Redis

from core.errors import ParleyError
from core.moderation.state import Admission, Limits
from core.redis_client import RedisHub, RedisService, connect, key_part


class ModerationStateUnavailable(ParleyError):
    """The shared moderation state could not be read or written."""


# KEYS: user rate, conversation rate, mute. ARGV: member, user window ms, conv window ms.
# The member is the message's (see message_member): a redelivered message still in the
# window keeps its first stamp and is not counted again (NX); how many windows added it
# comes back last (0: a repeat). Numbers go to Redis as strings made with '%d' (a Lua
# number is printed with '%.17g', thousands of instructions each: see
# core.memory.redis_scripts).
_ADMIT = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local now_s = string.format('%d', now)
local counts = {}
local added = 0
for i = 1, 2 do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', string.format('%d', now - ARGV[i + 1]))
  added = added + redis.call('ZADD', KEYS[i], 'NX', now_s, ARGV[1])
  redis.call('PEXPIRE', KEYS[i], ARGV[i + 1])
  counts[i] = redis.call('ZCARD', KEYS[i])
end
local mute = redis.call('PTTL', KEYS[3])
if mute < 0 then mute = 0 end
return {counts[1], counts[2], mute, added}
"""

# KEYS: score. ARGV: points, half life ms. Returns the new score as a string.
_ADD_POINTS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local half = tonumber(ARGV[2])
local old = redis.call('HMGET', KEYS[1], 'score', 'at')
local score = tonumber(old[1]) or 0
local at = tonumber(old[2]) or now
if now > at then score = score * math.pow(0.5, (now - at) / half) end
score = score + tonumber(ARGV[1])
redis.call('HSET', KEYS[1], 'score', tostring(score), 'at', now)
-- Gone once it has decayed below a hundredth of a point.
local life = math.ceil(half * math.max(1, math.log(math.max(score, 1) * 100) / math.log(2)))
redis.call('PEXPIRE', KEYS[1], life)
return tostring(score)
"""



class RedisState(RedisService):
    """:class:`~core.moderation.state.ModerationState` on Redis; see the module docstring."""

    def __init__(
        self, url: str, *, prefix: str, bot: str, timeout: float = 2.0,
        audit_max_entries: int = 100_000, audit_retention: float = 30 * 86400.0,
        redis: RedisHub | None = None,
    ) -> None:
        self.url = url
        self.base = f"{prefix}:{key_part(bot)}:mod:"
        self.timeout = timeout
        self.audit_max_entries = audit_max_entries
        self.audit_retention = audit_retention
        self._client: Redis | None = None
        # The scripts (every message's flood check) go through the hub's pipeline, shared
        # with the process's other services on this Redis when the app passes one.
        super().__init__(url, {"admit": _ADMIT, "add_points": _ADD_POINTS}, timeout=timeout,
                         setting="moderation.url", error=ModerationStateUnavailable,
                         failing="moderation state", redis=redis)

    async def _start(self) -> None:
        # Decoded replies for the other commands (audit, mutes); connects when first used.
        self._client = connect(self.url, timeout=self.timeout, where="moderation.url",
                               decode_responses=True)
        await super()._start()

    async def _stop(self) -> None:
        client, self._client = self._client, None
        try:
            await super()._stop()
        finally:
            if client is not None:
                await client.aclose()

    @property
    def client(self) -> Redis:
        """The connection; only between start and stop."""
        if self._client is None:
            raise self._unstarted()
        return self._client

    async def admit(self, user: str, conversation: str, limits: Limits, *,
                    message: str | None = None) -> Admission:
        """See :class:`~core.moderation.state.ModerationState`."""
        keys = [f"{self.base}rate:u:{key_part(user)}",
                f"{self.base}rate:c:{key_part(conversation)}",
                f"{self.base}mute:{key_part(user)}"]
        member = f"m:{message}" if message is not None else f"r:{os.urandom(16).hex()}"
        args: list[str | int] = [member, int(limits.user_window * 1000),
                                 int(limits.conversation_window * 1000)]
        users, convs, mute_ms, added = await self._run("admit", keys, args)
        return Admission(int(users), int(convs), int(mute_ms) / 1000, repeated=not added)

    async def add_points(self, user: str, points: float, half_life: float) -> float:
        """See :class:`~core.moderation.state.ModerationState`."""
        score = await self._run("add_points", [f"{self.base}score:{key_part(user)}"],
                                [points, int(half_life * 1000)])
        return float(score)

    async def record(
        self, entry: Mapping[str, str], *, mute_user: str | None = None,
        mute_seconds: float = 0.0, escalate: bool = False,
    ) -> None:
        """See :class:`~core.moderation.state.ModerationState`."""
        fields: dict[Any, Any] = dict(entry)
        async with self._failures("record"):
            async with self.client.pipeline(transaction=True) as pipe:
                muting = False
                if mute_user is not None and mute_seconds > 0:
                    muting = True
                    # A mute only ever grows, as in process: a moderator's day-long mute
                    # is not cut to the policy's minutes by a later automatic one (a
                    # muted user flooding commands earns one).
                    mute, ms = f"{self.base}mute:{key_part(mute_user)}", max(
                        1, int(mute_seconds * 1000))
                    pipe.set(mute, "1", px=ms, nx=True)
                    pipe.pexpire(mute, ms, gt=True)
                # Bounded twice: by count, and by age (MINID) on the next write.
                pipe.xadd(f"{self.base}audit", fields, maxlen=self.audit_max_entries,
                          approximate=True)
                pipe.time()
                if escalate:
                    pipe.xadd(f"{self.base}escalations", fields,
                              maxlen=self.audit_max_entries, approximate=True)
                results = await pipe.execute()
            seconds, micros = results[3 if muting else 1]
            oldest = int(seconds * 1000 + micros // 1000 - self.audit_retention * 1000)
            await self.client.xtrim(f"{self.base}audit", minid=max(oldest, 0), approximate=True)

    async def _read(self, stream: str, count: int) -> list[dict[str, str]]:
        async with self._failures("read"):
            rows: Any = await self.client.xrevrange(f"{self.base}{stream}", count=count)
        return [{"id": entry_id, **fields} for entry_id, fields in rows or ()]

    async def read_audit(self, count: int) -> list[dict[str, str]]:
        """See :class:`~core.moderation.state.ModerationState`."""
        return await self._read("audit", count)

    async def read_escalations(self, count: int) -> list[dict[str, str]]:
        """See :class:`~core.moderation.state.ModerationState`."""
        return await self._read("escalations", count)

    async def unmute(self, user: str) -> bool:
        """See :class:`~core.moderation.state.ModerationState`."""
        async with self._failures("unmute"):
            return bool(await self.client.delete(f"{self.base}mute:{key_part(user)}"))

    async def forget_user(self, user: str, conversations: Sequence[str] = ()) -> int:
        """Delete ``user``'s audit and escalation entries (``user`` is
        ``{channel}:{user_id}``); how many went. What enforces the limits is kept, so
        ``/forget`` lifts none of them: the mute, the violation score and the flood
        windows (of ``user`` and of ``conversations``), none of which holds what the user
        wrote, and each of which expires on its own (the mute when it ends, the score once
        decayed, a window after its length)."""
        channel, _, user_id = user.partition(":")
        count = 0
        async with self._failures("forget_user"):
            for stream in ("audit", "escalations"):
                start = "-"
                while True:
                    rows: Any = await self.client.xrange(f"{self.base}{stream}", min=start,
                                                         count=1000)
                    if not rows:
                        break
                    mine = [entry_id for entry_id, fields in rows
                            if fields.get("user") == user_id
                            and fields.get("channel") == channel]
                    if mine:
                        count += int(await self.client.xdel(f"{self.base}{stream}", *mine))
                    start = "(" + rows[-1][0]
        return count
