"""Conversation memory in Redis: for production, and for several processes serving one bot.

Key layout (``{p}`` is ``memory.key_prefix``; the bot name and every id are
percent-encoded, so a ``:`` inside an id cannot make two keys collide; ``{ref}`` is
``{channel}:{conversation_id}``)::

    {p}:{bot}:conv:{ref}         list  the window of turns, JSON, oldest first
    {p}:{bot}:members:{ref}      hash  user id -> that user's index key, for each user
                                       whose turns are in the window
    {p}:{bot}:seen:{ref}         zset  message id -> expiry (ms), for dedupe; capped
    {p}:{bot}:facts:{user}       hash  facts about a user; no TTL, gone on forget_user
    {p}:{bot}:user:{user}:convs  set   refs of the conversations holding the user's turns

A conversation, its members hash and the index of every member get the same TTL, set
together on every load and append, so an index outlives every conversation it points
to and ``forget_user`` finds them all.

Every call is one round trip: one command, or one Lua script (atomic, and checking key
types before it writes, so a failure leaves nothing half-stored). The scripts touch keys
they derive from stored data, which a standalone Redis (or a replicated one) allows and
Redis Cluster does not.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from redis.asyncio import Redis

from core.config import BotSettings, MemorySection
from core.errors import MemoryUnavailable
from core.lifecycle import ServiceBase
from core.memory.base import MemorySnapshot
from core.redis_client import (
    ScriptPipeline,
    connect,
    failures_as,
    key_part,
    load_scripts,
    redact,
)
from core.types import ConversationKey, Turn

log = logging.getLogger(__name__)

SEEN_TTL_CAP = 24 * 3600  # seconds a message id is remembered for dedupe, at most
SEEN_PER_CONVERSATION = 10_000  # message ids kept per conversation, at most

_LOAD_FN = """
local function load(conv, members, facts, window, ttl)
  local turns = redis.call('LRANGE', conv, -tonumber(window), -1)
  if redis.call('EXPIRE', conv, ttl) == 1 then
    redis.call('EXPIRE', members, ttl)
    for _, idx in ipairs(redis.call('HVALS', members)) do redis.call('EXPIRE', idx, ttl) end
  end
  return {turns, redis.call('HGETALL', facts)}
end
"""
# KEYS: conv, members, facts. ARGV: window, ttl.
_LOAD = _LOAD_FN + "return load(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2])"

# KEYS: conv, members. ARGV: window, ttl, ref, n, n x (user id, index key), turns (JSON).
_APPEND = """
local conv, members = KEYS[1], KEYS[2]
local window, ttl, ref, n = tonumber(ARGV[1]), ARGV[2], ARGV[3], tonumber(ARGV[4])
local function wrong(key, kind)
  local t = redis.call('TYPE', key)['ok']
  if t ~= 'none' and t ~= kind then return 'WRONGTYPE ' .. key .. ' is a ' .. t end
end
local bad = wrong(conv, 'list') or wrong(members, 'hash')
for i = 0, n - 1 do bad = bad or wrong(ARGV[6 + 2 * i], 'set') end
for _, idx in ipairs(bad and {} or redis.call('HVALS', members)) do
  bad = bad or wrong(idx, 'set')
end
if bad then return redis.error_reply(bad) end
-- Nothing is written above this line.
for i = 0, n - 1 do redis.call('HSET', members, ARGV[5 + 2 * i], ARGV[6 + 2 * i]) end
for i = 5 + 2 * n, #ARGV do redis.call('RPUSH', conv, ARGV[i]) end
redis.call('LTRIM', conv, -window, -1)
local present = {}
for _, raw in ipairs(redis.call('LRANGE', conv, 0, -1)) do
  local ok, turn = pcall(cjson.decode, raw)
  if ok and type(turn) == 'table' and type(turn.user_id) == 'string' then
    present[turn.user_id] = true
  end
end
local pairs_ = redis.call('HGETALL', members)
for i = 1, #pairs_, 2 do
  local user, idx = pairs_[i], pairs_[i + 1]
  if present[user] then
    redis.call('SADD', idx, ref)
    redis.call('EXPIRE', idx, ttl)
  else
    redis.call('SREM', idx, ref)
    redis.call('HDEL', members, user)
  end
end
redis.call('EXPIRE', conv, ttl)
redis.call('EXPIRE', members, ttl)
return 1
"""

# KEYS: conv, members. ARGV: ref.
_RESET = """
for _, idx in ipairs(redis.call('HVALS', KEYS[2])) do redis.call('SREM', idx, ARGV[1]) end
return redis.call('DEL', KEYS[1], KEYS[2])
"""

_SEEN_FN = """
local function mark_seen(seen, id, ttl_ms, cap)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZREMRANGEBYSCORE', seen, '-inf', now)
  local added = redis.call('ZADD', seen, 'NX', now + tonumber(ttl_ms), id)
  if added == 1 then
    local extra = redis.call('ZCARD', seen) - tonumber(cap)
    if extra > 0 then redis.call('ZREMRANGEBYRANK', seen, 0, extra - 1) end
    redis.call('PEXPIRE', seen, ttl_ms)
  end
  return added
end
"""
# KEYS: seen. ARGV: message id, ttl (ms), cap.
_MARK_SEEN = _SEEN_FN + "return mark_seen(KEYS[1], ARGV[1], ARGV[2], ARGV[3])"

# KEYS: seen, conv, members, facts. ARGV: message id, seen ttl (ms), cap, window, ttl.
# {0} for a message seen before (nothing loaded), else {1, turns, facts}.
_LOAD_UNSEEN = _SEEN_FN + _LOAD_FN + """
if mark_seen(KEYS[1], ARGV[1], ARGV[2], ARGV[3]) == 0 then return {0} end
local loaded = load(KEYS[2], KEYS[3], KEYS[4], ARGV[4], ARGV[5])
return {1, loaded[1], loaded[2]}
"""

# KEYS: user index, facts. ARGV: '{p}:{bot}:'. Returns conversations + facts deleted.
_FORGET_USER = """
local base, count = ARGV[1], 0
for _, ref in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local members = base .. 'members:' .. ref
  for _, idx in ipairs(redis.call('HVALS', members)) do redis.call('SREM', idx, ref) end
  count = count + redis.call('EXISTS', base .. 'conv:' .. ref)
  redis.call('DEL', base .. 'conv:' .. ref, members, base .. 'seen:' .. ref)
end
count = count + redis.call('HLEN', KEYS[2])
redis.call('DEL', KEYS[1], KEYS[2])
return count
"""



class RedisMemory(ServiceBase):
    """A :class:`~core.memory.base.MemoryStore` on Redis (``redis://`` or ``unix://``).

    Every Redis failure is raised as :class:`~core.errors.MemoryUnavailable`. Calls are
    not retried, because a retried write whose first attempt did reach Redis would be
    stored twice; a connection broken by a Redis restart is replaced on the next call.
    """

    def __init__(self, section: MemorySection, *, source: str = "<memory>") -> None:
        self.section = section
        self.source = source
        self.where = redact(section.url)
        self._client: Redis | None = None
        self._pipeline: ScriptPipeline | None = None

    async def _start(self) -> None:
        client = connect(self.section.url, timeout=self.section.timeout,
                         where=f"{self.source}: memory.url", socket_timeout=False)
        self._client = client
        sources = {
            "load": _LOAD,
            "append": _APPEND,
            "reset": _RESET,
            "mark_seen": _MARK_SEEN,
            "load_unseen": _LOAD_UNSEEN,
            "forget_user": _FORGET_USER,
        }
        async with self._failures("start"), asyncio.timeout(self.section.timeout):
            scripts = await load_scripts(client, sources)
        self._pipeline = ScriptPipeline(client, scripts, timeout=self.section.timeout)

    async def _stop(self) -> None:
        client, self._client = self._client, None
        self._pipeline = None
        if client is not None:
            await client.aclose()

    def _failures(self, what: str) -> AbstractAsyncContextManager[None]:
        return failures_as(MemoryUnavailable, f"redis at {self.where}", what)

    async def _run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        if self._pipeline is None:
            raise RuntimeError("RedisMemory is used before start() or after stop()")
        async with self._failures(name):
            return await self._pipeline(name, keys, args)

    def _base(self, bot: str) -> str:
        return f"{self.section.key_prefix}:{key_part(bot)}:"

    @staticmethod
    def _ref(key: ConversationKey) -> str:
        return f"{key_part(key.channel)}:{key_part(key.conversation_id)}"

    def _index(self, bot: str, user_id: str) -> str:
        return f"{self._base(bot)}user:{key_part(user_id)}:convs"

    def _facts(self, bot: str, user_id: str) -> str:
        return f"{self._base(bot)}facts:{key_part(user_id)}"

    async def mark_seen(self, key: ConversationKey, message_id: str) -> bool:
        """Record ``message_id``; False if it was recorded within the dedupe TTL."""
        added = await self._run("mark_seen", [self._seen(key)], [message_id, *self._seen_args()])
        return bool(added)

    async def load(self, key: ConversationKey, user_id: str) -> MemorySnapshot:
        """The last ``window`` turns and the user's facts; refreshes the TTL."""
        raw_turns, raw_facts = await self._run(
            "load", self._load_keys(key, user_id), [self.section.window, self.section.ttl]
        )
        return self._snapshot(key, raw_turns, raw_facts)

    async def load_unseen(
        self, key: ConversationKey, message_id: str, user_id: str
    ) -> MemorySnapshot | None:
        """:meth:`mark_seen` and :meth:`load` in one round trip; None for a duplicate."""
        reply = await self._run(
            "load_unseen", [self._seen(key), *self._load_keys(key, user_id)],
            [message_id, *self._seen_args(), self.section.window, self.section.ttl],
        )
        if not reply[0]:
            return None
        return self._snapshot(key, reply[1], reply[2])

    def _seen(self, key: ConversationKey) -> str:
        return f"{self._base(key.bot)}seen:{self._ref(key)}"

    def _seen_args(self) -> list[int]:
        return [min(self.section.ttl, SEEN_TTL_CAP) * 1000, SEEN_PER_CONVERSATION]

    def _load_keys(self, key: ConversationKey, user_id: str) -> list[str]:
        base, ref = self._base(key.bot), self._ref(key)
        return [f"{base}conv:{ref}", f"{base}members:{ref}", self._facts(key.bot, user_id)]

    @staticmethod
    def _snapshot(key: ConversationKey, raw_turns: Any, raw_facts: Any) -> MemorySnapshot:
        turns = []
        for raw in raw_turns:
            try:
                turns.append(Turn.from_dict(json.loads(raw)))
            except (ValueError, TypeError, AttributeError):
                log.warning("memory: skipping a malformed turn in %s: %.200r", key, raw)
        facts = {
            _text(raw_facts[i]): _text(raw_facts[i + 1]) for i in range(0, len(raw_facts), 2)
        }
        return MemorySnapshot(tuple(turns), facts)

    async def append(self, key: ConversationKey, turns: Sequence[Turn]) -> None:
        """Add ``turns`` and trim to the window, atomically, in one round trip."""
        if not turns:
            return
        base, ref = self._base(key.bot), self._ref(key)
        users = {t.user_id for t in turns if t.user_id is not None}
        args: list[Any] = [self.section.window, self.section.ttl, ref, len(users)]
        for user in sorted(users):
            args += [user, self._index(key.bot, user)]
        args += [json.dumps(t.to_dict(), separators=(",", ":")) for t in turns]
        await self._run("append", [f"{base}conv:{ref}", f"{base}members:{ref}"], args)

    async def reset(self, key: ConversationKey) -> None:
        """Delete the conversation's turns (its dedupe record stays)."""
        base, ref = self._base(key.bot), self._ref(key)
        await self._run("reset", [f"{base}conv:{ref}", f"{base}members:{ref}"], [ref])

    async def set_fact(self, bot: str, user_id: str, name: str, value: str) -> None:
        """Store ``name = value`` in the user's facts."""
        if self._client is None:
            raise RuntimeError("RedisMemory is used before start() or after stop()")
        async with self._failures("set_fact"), asyncio.timeout(self.section.timeout):
            await self._client.hset(self._facts(bot, user_id), name, value)

    async def forget_user(self, bot: str, user_id: str) -> int:
        """Delete the user's facts and every conversation holding their turns.

        Returns the number of conversations plus the number of facts deleted.
        """
        count = await self._run(
            "forget_user",
            [self._index(bot, user_id), self._facts(bot, user_id)],
            [self._base(bot)],
        )
        return int(count)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


def create(settings: BotSettings) -> RedisMemory:
    """The ``redis`` memory backend for ``settings`` (entry point ``parley.memory``)."""
    return RedisMemory(settings.memory, source=settings.source)
