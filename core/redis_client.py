"""How every part of Parley that talks to Redis connects, and what its failures become.

One policy for memory, moderation state and the generation queue: no automatic retries
(a retried write whose first attempt did reach Redis would be applied twice) except of
scripts their caller declares safe to repeat, short
socket timeouts, and every Redis or socket error turned into the caller's own
:class:`~core.errors.ParleyError` naming the server without its password.

The services of a process share a client and a script pipeline
(:mod:`core.redis_pipeline`) per URL: :class:`RedisHub`.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, Protocol, runtime_checkable
from urllib.parse import quote, urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from core.errors import ConfigError, ParleyError
from core.lifecycle import ServiceBase
from core.redis_pipeline import ScriptPipeline, Scripts


@functools.lru_cache(maxsize=65536)
def key_part(value: str) -> str:
    """One component of a key (a bot name, an id), percent-encoded so it holds no ':'.

    Remembered: every message names its bot, channel, conversation and user in several
    keys, and ``quote`` costs microseconds each time.
    """
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


def failures_as(error: type[ParleyError], prefix: str, what: str) -> _FailuresAs:
    """Turn Redis and socket errors inside the block into ``error("{prefix}: {what} failed")``."""
    return _FailuresAs(error, prefix, what)


class _FailuresAs:
    """What :func:`failures_as` returns: a plain class, not an ``@asynccontextmanager``
    generator (an async generator for every Redis call)."""

    __slots__ = ("error", "prefix", "what")

    def __init__(self, error: type[ParleyError], prefix: str, what: str) -> None:
        self.error = error
        self.prefix = prefix
        self.what = what

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        traceback: TracebackType | None) -> None:
        # builtin ConnectionError and TimeoutError are OSErrors too.
        if isinstance(exc, RedisError | OSError):
            detail = str(exc) or type(exc).__name__
            raise self.error(f"{self.prefix}: {self.what} failed: {detail}") from exc


async def load_scripts(client: Redis, sources: Mapping[str, str]) -> dict[str, AsyncScript]:
    """Check the server answers, then register and pre-load each Lua script by name.

    Pre-loading keeps the first real calls to one round trip each (EVALSHA hits).
    """
    scripts = {name: client.register_script(source) for name, source in sources.items()}
    # One round trip for all (a store starts within its timeout on a loaded machine too).
    async with client.pipeline(transaction=False) as pipe:
        pipe.ping()
        for script in scripts.values():
            pipe.script_load(script.script)
        await pipe.execute()
    return scripts


class RedisShare:
    """A client and a :class:`ScriptPipeline` for one Redis URL, as a :class:`RedisHub`
    lends them: replies are not decoded (bytes), and only connecting is timed (each
    pipelined call has its caller's timeout)."""

    def __init__(self, hub: RedisHub, url: str, client: Redis) -> None:
        self._hub = hub
        self.url = url
        self.client = client
        self.pipeline = ScriptPipeline(client)
        self.users = 0

    async def release(self) -> None:
        """Give this share back (once per :meth:`RedisHub.acquire`)."""
        await self._hub._release(self)

    async def scripts(self, sources: Mapping[str, str], *, call_timeout: float,
                      retry: Collection[str] = ()) -> Scripts:
        """Check the server answers, load ``sources`` (Lua by name) and return them as
        :class:`Scripts` on the shared pipeline, each call timed by ``call_timeout``.
        Raises what :func:`load_scripts` raises; the caller times it and turns failures
        into its own errors."""
        loaded = await load_scripts(self.client, sources)
        return Scripts(self.pipeline, loaded, timeout=call_timeout, retry=retry)


@runtime_checkable
class SharesRedis(Protocol):
    """A part (memory, moderator) that can talk to Redis through a process's
    :class:`RedisHub` instead of connections of its own."""

    def share_redis(self, hub: RedisHub) -> None:
        """Use ``hub``'s connections from the next start on; called before starting."""


def reply_text(value: bytes | str) -> str:
    """A value from Redis as text: a client without ``decode_responses`` hands back bytes
    (invalid UTF-8 is replaced, never raised)."""
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


def reply_pairs(flat: Sequence[bytes | str]) -> dict[str, str]:
    """A flat field, value, field, value ... reply (HGETALL's, a script's) as a dict of
    text."""
    return {reply_text(flat[i]): reply_text(flat[i + 1]) for i in range(0, len(flat), 2)}


class RedisHub:
    """The Redis connections of one process: one client (with its pool) and one
    :class:`ScriptPipeline` per URL, shared by every service that talks to that Redis.

    Memory, the moderation state and the web widget's reply log mostly talk to one Redis;
    sharing the pipeline, their calls of one event-loop turn go out in one write on one
    connection read by one task, instead of one of each per service. The app builds one
    (:func:`core.app.build_engine`) and hands it to the services; each takes its URL's
    share when it starts (:meth:`acquire`) and gives it back when it stops
    (:meth:`RedisShare.release`); the last one out closes the pipeline and the client. The first
    acquirer's ``timeout`` bounds connecting.
    """

    def __init__(self) -> None:
        self._shares: dict[str, RedisShare] = {}

    def acquire(self, url: str, *, timeout: float, where: str) -> RedisShare:
        """The share of ``url`` (made now if no service holds it); connects lazily."""
        share = self._shares.get(url)
        if share is None:
            client = connect(url, timeout=timeout, where=where, socket_timeout=False)
            share = self._shares[url] = RedisShare(self, url, client)
        share.users += 1
        return share

    async def _release(self, share: RedisShare) -> None:
        share.users -= 1
        if share.users > 0:
            return
        if self._shares.get(share.url) is share:
            del self._shares[share.url]
        try:
            await share.pipeline.aclose()
        finally:
            await share.client.aclose()


class RedisService(ServiceBase):
    """The Redis plumbing of a service whose calls are Lua scripts on a process's
    :class:`RedisHub` (memory, the moderation state, the web reply log, plugin storage).

    It takes its URL's share when it starts and loads its scripts there (both within its
    timeout; a failure is its own error), gives the share back when it stops, runs a
    script by name (:meth:`_run`), and lends the share's client for other commands
    (:attr:`_redis`). It has a hub of its own unless the app shares a process's
    (:meth:`share_redis`) before it starts. A subclass passes its settings to
    ``__init__`` and extends ``_start``/``_stop`` with what is its own.
    """

    def __init__(self, url: str, scripts: Mapping[str, str], *, timeout: float, setting: str,
                 error: type[ParleyError], failing: str, retry: Collection[str] = (),
                 redis: RedisHub | None = None) -> None:
        """Scripts ``scripts`` (Lua by name) on the Redis at ``url`` (named ``setting``
        in a config error), each call timed by ``timeout`` and sent again after a broken
        connection if named in ``retry`` (safe to run twice); a failure raises ``error``
        with ``failing`` (e.g. ``"redis at HOST"``) and what failed."""
        self._url = url
        self._sources = dict(scripts)
        self._timeout = timeout
        self._setting = setting
        self._error = error
        self._failing = failing
        self._retry = retry
        self._hub = redis or RedisHub()
        self._share: RedisShare | None = None
        self._scripts: Scripts | None = None

    def share_redis(self, hub: RedisHub) -> None:
        """Talk to Redis through ``hub``'s connections from the next start on (see
        :class:`RedisHub`); the app calls it before starting."""
        self._hub = hub

    async def _start(self) -> None:
        share = self._share = self._hub.acquire(self._url, timeout=self._timeout,
                                                where=self._setting)
        # (A failure here is stopped by ServiceBase.start, releasing the share.)
        async with self._failures("start"), asyncio.timeout(self._timeout):
            self._scripts = await share.scripts(self._sources, call_timeout=self._timeout,
                                                retry=self._retry)

    async def _stop(self) -> None:
        self._scripts = None
        share, self._share = self._share, None
        if share is not None:
            await share.release()

    def _failures(self, what: str) -> AbstractAsyncContextManager[None]:
        """Redis and socket errors in the block raised as the service's error."""
        return failures_as(self._error, self._failing, what)

    def _unstarted(self) -> RuntimeError:
        return RuntimeError(f"{type(self).__name__} is used before start() or after stop()")

    @property
    def _redis(self) -> Redis:
        """The share's client (replies as bytes, commands untimed: the caller times
        them); only between start and stop."""
        if self._share is None:
            raise self._unstarted()
        return self._share.client

    async def _run(self, name: str, keys: Sequence[str], args: Sequence[Any], *,
                   what: str | None = None) -> Any:
        """Script ``name``'s result; a failure names ``what`` (by default ``name``)."""
        scripts = self._scripts
        if scripts is None:
            raise self._unstarted()
        async with self._failures(what or name):
            return await scripts(name, keys, args)
