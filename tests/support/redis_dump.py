"""Read back everything under a Redis key pattern, for tests that prove data is gone."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis


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
