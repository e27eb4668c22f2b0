"""How every part of Parley that talks to Redis connects, and what its failures become.

One policy for memory, moderation state and the generation queue: no automatic retries
(a retried write whose first attempt did reach Redis would be applied twice), short
socket timeouts, and every Redis or socket error turned into the caller's own
:class:`~core.errors.ParleyError` naming the server without its password.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from urllib.parse import quote, urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from core.errors import ConfigError, ParleyError


def key_part(value: str) -> str:
    """One component of a key (a bot name, an id), percent-encoded so it holds no ':'."""
    return quote(value, safe="")


def redact(url: str) -> str:
    """``url`` without its password, fit for logs and error messages."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        user = f"{parts.username}:***@" if parts.username else "***@"
        return urlunsplit(parts._replace(netloc=user + host))
    except ValueError:
        return "<unparsable url>"


def connect(
    url: str, *, timeout: float, where: str, decode_responses: bool = False,
    socket_timeout: bool = True,
) -> Redis:
    """A client for ``url`` (``redis://``, ``rediss://`` or ``unix://``); connects lazily.

    ``where`` names the setting for the error a malformed URL gives
    (e.g. ``"bot.toml: memory.url"``). With ``socket_timeout=False`` only connecting is
    timed: the caller puts one timeout around each call instead of redis-py timing every
    socket read and write (two timers per command, a tenth of a busy front end's time).
    """
    try:
        return Redis.from_url(
            url,
            socket_timeout=timeout if socket_timeout else None,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            decode_responses=decode_responses,
        )
    except ValueError as exc:
        raise ConfigError(f"{where}: not a Redis URL ({redact(url)}): {exc}") from None


@asynccontextmanager
async def failures_as(error: type[ParleyError], prefix: str, what: str) -> AsyncIterator[None]:
    """Turn Redis and socket errors inside the block into ``error("{prefix}: {what} failed")``."""
    try:
        yield
    except (RedisError, OSError) as exc:
        # builtin ConnectionError and TimeoutError are OSErrors too.
        detail = str(exc) or type(exc).__name__
        raise error(f"{prefix}: {what} failed: {detail}") from exc


async def load_scripts(client: Redis, sources: Mapping[str, str]) -> dict[str, AsyncScript]:
    """Check the server answers, then register and pre-load each Lua script by name.

    Pre-loading keeps the first real calls to one round trip each (EVALSHA hits).
    """
    await client.ping()
    scripts = {name: client.register_script(source) for name, source in sources.items()}
    for script in scripts.values():
        await client.script_load(script.script)
    return scripts
