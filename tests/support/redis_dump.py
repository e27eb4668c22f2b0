"""Read back everything under a Redis key pattern, for tests that prove data is gone."""

from __future__ import annotations

import re
from typing import Any

from redis.asyncio import Redis

# What forgetting a user keeps, so that it lifts none of moderation's limits (see
# RedisState.forget_user): the mute, the violation score and the flood windows, keyed by
# the user or conversation and expiring on their own; none holds what anyone wrote.
_ENFORCEMENT = re.compile(r":mod:(?:mute|score|rate:[uc]):")


def enforcement(found: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """``found`` (see :func:`dump_keys`) split in two: moderation's enforcement keys, which
    outlive forgetting, and all the others."""
    kept = {k: v for k, v in found.items() if _ENFORCEMENT.search(k)}
    return kept, {k: v for k, v in found.items() if k not in kept}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def dump_keys(client: Redis, match: str) -> dict[str, str]:
    """Every key matching ``match`` with its whole value as text, whatever its type."""
    found: dict[str, str] = {}
    async for raw in client.scan_iter(match=match, count=1000):
        key = _text(raw)
        kind = _text(await client.type(key))
        value: Any
        if kind == "string":
            value = await client.get(key)
        elif kind == "list":
            value = await client.lrange(key, 0, -1)
        elif kind == "hash":
            value = await client.hgetall(key)
        elif kind == "set":
            value = await client.smembers(key)
        elif kind == "zset":
            value = await client.zrange(key, 0, -1, withscores=True)
        elif kind == "stream":
            value = await client.xrange(key)
        else:
            value = kind
        found[key] = repr(value)
    return found
