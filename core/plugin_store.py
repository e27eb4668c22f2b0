"""Key-value storage for plugins, in the bot's memory backend (Redis or this process).

The unit is a *bucket*: a small map of JSON values under one name, with an optional
time to live for the whole bucket. Plugins never see backend keys; they get buckets
from :class:`core.plugin_services.Storage`, which names them by plugin and scope
(global, per user, per conversation), so ``/forget`` can find every per-user bucket.

Redis layout: one hash per bucket, ``{prefix}:{bot}:plugin:{bucket}``; every call is
one Lua script, pipelined with the other calls of its event-loop turn.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from core.config import BotSettings, MemorySection
from core.errors import MemoryUnavailable
from core.lifecycle import ServiceBase
from core.redis_client import RedisHub, RedisService, key_part, redact, reply_pairs, reply_text
from core.registry import Registry


class BucketStore(Protocol):
    """Named maps of strings. Every method does all its work or raises
    :class:`~core.errors.MemoryUnavailable`."""

    async def start(self) -> None:
        """Connect; idempotent."""

    async def stop(self) -> None:
        """Disconnect; idempotent."""

    async def get(self, bucket: str, field: str) -> str | None:
        """One value of ``bucket``, or None."""

    async def items(self, bucket: str) -> dict[str, str]:
        """Every value of ``bucket``."""

    async def put(self, bucket: str, values: Mapping[str, str], ttl: float | None) -> None:
        """Set ``values`` in ``bucket``; ``ttl`` seconds from now for the whole bucket
        (None: keep the bucket's expiry, if any)."""

    async def remove(self, bucket: str, *fields: str) -> int:
        """Delete fields of ``bucket``; how many existed."""

    async def drop(self, *buckets: str) -> int:
        """Delete whole buckets; how many existed."""

    async def incr(self, bucket: str, field: str, by: int, ttl: float | None, *,
                   bounds: Bounds | None = None, start: int = 0) -> int:
        """Add ``by`` to an integer value (``start`` if absent) and return it, in one
        atomic step: two calls at once never lose an addition. With ``bounds``
        ``(low, high)`` the result is clamped to them."""

    async def extend(self, bucket: str, field: str, items: Sequence[str], cap: int,
                     ttl: float | None, *, start: Sequence[str] = ()) -> list[str]:
        """Add the ``items`` not yet in a field holding a JSON list of strings (``start``
        if absent), keep its last ``cap``, and return it, in one atomic step: two calls
        at once never lose an item."""


Clock = Callable[[], float]
Bounds = tuple[int, int]


def clamped(value: int, bounds: Bounds | None) -> int:
    """``value`` within ``bounds`` (unchanged without them)."""
    return value if bounds is None else max(bounds[0], min(bounds[1], value))


class EmbeddedBuckets(ServiceBase):
    """A :class:`BucketStore` in this process (the ``embedded`` memory backend's companion)."""

    def __init__(self, *, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[dict[str, str], float | None]] = {}

    def _live(self, bucket: str) -> dict[str, str] | None:
        held = self._buckets.get(bucket)
        if held is None:
            return None
        values, expires = held
        if expires is not None and expires <= self._clock():
            del self._buckets[bucket]
            return None
        return values

    async def get(self, bucket: str, field: str) -> str | None:
        """See :class:`BucketStore`."""
        values = self._live(bucket)
        return None if values is None else values.get(field)

    async def items(self, bucket: str) -> dict[str, str]:
        """See :class:`BucketStore`."""
        return dict(self._live(bucket) or {})

    async def put(self, bucket: str, values: Mapping[str, str], ttl: float | None) -> None:
        """See :class:`BucketStore`."""
        current = self._live(bucket)
        expires = self._buckets[bucket][1] if current is not None else None
        if ttl is not None:
            expires = self._clock() + ttl
        self._buckets[bucket] = ({**(current or {}), **values}, expires)

    async def remove(self, bucket: str, *fields: str) -> int:
        """See :class:`BucketStore`."""
        values = self._live(bucket)
        if values is None:
            return 0
        gone = sum(1 for f in fields if values.pop(f, None) is not None)
        if not values:
            del self._buckets[bucket]
        return gone

    async def drop(self, *buckets: str) -> int:
        """See :class:`BucketStore`."""
        return sum(1 for b in buckets if self._live(b) is not None and self._buckets.pop(b))

    async def incr(self, bucket: str, field: str, by: int, ttl: float | None, *,
                   bounds: Bounds | None = None, start: int = 0) -> int:
        """See :class:`BucketStore`. Atomic because nothing here awaits between the read
        and the write."""
        values = self._live(bucket) or {}
        value = clamped(int(values.get(field, str(start))) + by, bounds)
        await self.put(bucket, {field: str(value)}, ttl)
        return value

    async def extend(self, bucket: str, field: str, items: Sequence[str], cap: int,
                     ttl: float | None, *, start: Sequence[str] = ()) -> list[str]:
        """See :class:`BucketStore`. Atomic as :meth:`incr` is."""
        raw = (self._live(bucket) or {}).get(field)
        kept = [str(i) for i in json.loads(raw)] if raw is not None else list(start)
        kept += [i for i in dict.fromkeys(items) if i not in kept]
        kept = kept[-cap:] if cap > 0 else []
        await self.put(bucket, {field: json.dumps(kept)}, ttl)
        return kept


class RedisBuckets(RedisService):
    """A :class:`BucketStore` on Redis: one hash per bucket under the memory prefix.

    Every call is one Lua script on a :class:`~core.redis_pipeline.ScriptPipeline`: its
    own (alone), or the process's for its URL once the app shares a
    :class:`~core.redis_client.RedisHub` (``share_redis``), so a message's pause check
    goes out in the same write as memory's and moderation's calls, on one connection.
    Only the calls safe to run twice (reads, ``put``, ``extend``) are sent again after a
    broken connection (a Redis restart); a script the restarted server lost is loaded
    again and run.
    """

    def __init__(self, section: MemorySection, bot: str, *, source: str = "<memory>",
                 redis: RedisHub | None = None) -> None:
        self.section = section
        self.source = source
        self._base = f"{section.key_prefix}:{key_part(bot)}:plugin:"
        # Its own connections unless the app shares a process's (share_redis).
        super().__init__(section.url, _SCRIPTS, timeout=section.timeout,
                         setting=f"{source}: memory.url", error=MemoryUnavailable,
                         failing=f"redis at {redact(section.url)}", retry=_IDEMPOTENT,
                         redis=redis)

    def _failures(self, what: str) -> AbstractAsyncContextManager[None]:
        return super()._failures(f"plugin storage {what}")

    def key(self, bucket: str) -> str:
        """The Redis key of ``bucket``."""
        return self._base + bucket

    async def get(self, bucket: str, field: str) -> str | None:
        """See :class:`BucketStore`."""
        value = await self._run("get", [self.key(bucket)], [field])
        return None if value is None else reply_text(value)

    async def items(self, bucket: str) -> dict[str, str]:
        """See :class:`BucketStore`."""
        flat = await self._run("items", [self.key(bucket)], [], what="read")
        return reply_pairs(flat)

    async def put(self, bucket: str, values: Mapping[str, str], ttl: float | None) -> None:
        """See :class:`BucketStore`."""
        if not values:
            return
        flat = [part for pair in values.items() for part in pair]
        await self._run("put", [self.key(bucket)], [_pexpire(ttl), *flat], what="write")

    async def remove(self, bucket: str, *fields: str) -> int:
        """See :class:`BucketStore`."""
        if not fields:
            return 0
        return int(await self._run("remove", [self.key(bucket)], fields, what="delete"))

    async def drop(self, *buckets: str) -> int:
        """See :class:`BucketStore`."""
        if not buckets:
            return 0
        return int(await self._run("drop", [self.key(b) for b in buckets], [],
                                   what="delete"))

    async def extend(self, bucket: str, field: str, items: Sequence[str], cap: int,
                     ttl: float | None, *, start: Sequence[str] = ()) -> list[str]:
        """See :class:`BucketStore`."""
        raw = await self._run("extend", [self.key(bucket)], [
            field, cap, _pexpire(ttl), json.dumps(list(start)), json.dumps(list(items))],
            what="write")
        return [str(i) for i in json.loads(reply_text(raw))]

    async def incr(self, bucket: str, field: str, by: int, ttl: float | None, *,
                   bounds: Bounds | None = None, start: int = 0) -> int:
        """See :class:`BucketStore`."""
        return int(await self._run("incr", [self.key(bucket)], [
            field, by, start, *(bounds or ("", "")), _pexpire(ttl)], what="write"))


def _pexpire(ttl: float | None) -> int:
    """``ttl`` in whole milliseconds, at least 1 (-1 for none: keep the expiry)."""
    return -1 if ttl is None else max(1, int(ttl * 1000))


# KEYS: the bucket. ARGV: field, by, start (when the field is absent), low, high ("" for
# none), pexpire (-1: keep the bucket's expiry). HINCRBY cannot clamp, so read, add and
# clamp run here, where nothing else runs in between.
_INCR = """
local value
if ARGV[3] == '0' and ARGV[4] == '' and ARGV[5] == '' then
  -- A plain count: Redis's own 64-bit HINCRBY, which refuses a field that is no integer;
  -- read back as text, as a Lua number holds only 53 bits.
  redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
  value = redis.call('HGET', KEYS[1], ARGV[1])
else
  local current = redis.call('HGET', KEYS[1], ARGV[1])
  value = (current and tonumber(current) or tonumber(ARGV[3])) + tonumber(ARGV[2])
  if ARGV[4] ~= '' then value = math.max(tonumber(ARGV[4]), value) end
  if ARGV[5] ~= '' then value = math.min(tonumber(ARGV[5]), value) end
  redis.call('HSET', KEYS[1], ARGV[1], value)
end
if tonumber(ARGV[6]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[6]) end
return value
"""


# KEYS: the bucket. ARGV: field, cap, pexpire (-1: keep the bucket's expiry), start and
# items (JSON lists of strings). Returns the list kept, as JSON.
_EXTEND = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
local kept = cjson.decode(current or ARGV[4])
local seen = {}
for _, item in ipairs(kept) do seen[item] = true end
for _, item in ipairs(cjson.decode(ARGV[5])) do
  if not seen[item] then table.insert(kept, item); seen[item] = true end
end
local cap = tonumber(ARGV[2])
local out = {}
for i = math.max(1, #kept - cap + 1), #kept do table.insert(out, kept[i]) end
-- cjson writes an empty table as {}; the field must stay a list.
local encoded = #out == 0 and '[]' or cjson.encode(out)
redis.call('HSET', KEYS[1], ARGV[1], encoded)
if tonumber(ARGV[3]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return encoded
"""


_GET = "return redis.call('HGET', KEYS[1], ARGV[1])"
_ITEMS = "return redis.call('HGETALL', KEYS[1])"
# Long lists go in pieces: Lua's unpack() refuses more than about 8,000 values.
_REMOVE = """
local n = 0
for i = 1, #ARGV, 1000 do
  n = n + redis.call('HDEL', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
return n
"""
_DROP = """
local n = 0
for i = 1, #KEYS, 1000 do
  n = n + redis.call('DEL', unpack(KEYS, i, math.min(i + 999, #KEYS)))
end
return n
"""

# KEYS: the bucket. ARGV: pexpire (-1: keep the bucket's expiry), then field, value, ...
# (in pieces of 500 pairs).
_PUT = """
for i = 2, #ARGV, 1000 do
  redis.call('HSET', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
if tonumber(ARGV[1]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return 1
"""

_SCRIPTS = {"get": _GET, "items": _ITEMS, "put": _PUT, "remove": _REMOVE, "drop": _DROP,
            "incr": _INCR, "extend": _EXTEND}
# Safe to run twice: a retried remove, drop or incr would count (or add) again.
_IDEMPOTENT = ("get", "items", "put", "extend")


BucketFactory = Callable[[BotSettings], BucketStore]


def bucket_stores() -> Registry[BucketFactory]:
    """Plugin storage by memory backend name: it lives where the bot's memory lives."""
    registry: Registry[BucketFactory] = Registry("plugin storage")
    registry.register("embedded", lambda settings: EmbeddedBuckets())
    registry.register("redis", lambda settings: RedisBuckets(
        settings.memory, settings.bot.name, source=settings.source))
    return registry
