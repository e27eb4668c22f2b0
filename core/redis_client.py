"""How every part of Parley that talks to Redis connects, and what its failures become.

One policy for memory, moderation state and the generation queue: no automatic retries
(a retried write whose first attempt did reach Redis would be applied twice) except of
scripts their caller declares safe to repeat, short
socket timeouts, and every Redis or socket error turned into the caller's own
:class:`~core.errors.ParleyError` naming the server without its password.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from hiredis import pack_command
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError

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
    await client.ping()
    scripts = {name: client.register_script(source) for name, source in sources.items()}
    for script in scripts.values():
        await client.script_load(script.script)
    return scripts


class ScriptPipeline:
    """Runs registered Lua scripts, sending the calls made in one event-loop turn as one
    pipeline: one write and one read for all of them instead of a round trip each.

    Many conversations are in flight at once, so their memory reads and writes arrive
    together; this is what ioredis calls auto-pipelining. Each call still gets its own
    result or error; nothing is retried except a call the server answered NOSCRIPT
    (after a restart), which did not run.
    """

    def __init__(
        self, client: Redis, scripts: Mapping[str, AsyncScript], *, timeout: float,
        retry: Collection[str] = (),
    ) -> None:
        self._client = client
        self._scripts = dict(scripts)
        self._timeout = timeout  # for a whole batch: one timer, not one per call
        # Scripts that may run twice: sent again once when their connection broke.
        self._retry = frozenset(self._scripts[name].sha for name in retry)
        self._pending: list[_Call] = []
        self._sending: set[asyncio.Task[None]] = set()

    async def __call__(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run script ``name`` with ``keys`` and ``args``; its result, or the error (a
        :class:`TimeoutError` when Redis does not answer within ``timeout``)."""
        loop = asyncio.get_running_loop()
        call = _Call(self._scripts[name], keys, args, loop.create_future())
        self._pending.append(call)
        if len(self._pending) == 1:
            loop.call_soon(self._flush)
        return await call.result

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[_Call], *, retried: bool = False) -> None:
        calls = [call for call in batch if not call.result.done()]  # callers that left
        if not calls:
            return
        try:
            async with asyncio.timeout(self._timeout):
                replies = await self._round_trip(calls)
        except BaseException as exc:
            retry = []
            if isinstance(exc, ConnectionError | RedisConnectionError) and not retried:
                # The server restarted (or the network blipped): every idle pooled
                # connection is as stale as this one, so drop them all at once rather
                # than fail one batch per connection; then send the calls that are safe
                # to repeat once more, on a fresh connection.
                await self._client.connection_pool.disconnect(inuse_connections=False)
                retry = [call for call in calls if call.script.sha in self._retry]
            for call in calls:
                if call not in retry:
                    call.settle(exc)
            if retry:
                await self._send(retry, retried=True)
            if not isinstance(exc, Exception):
                raise
            return
        again = []
        for call, reply in zip(calls, replies, strict=True):
            if isinstance(reply, NoScriptError):
                again.append(call)
            else:
                call.settle(reply)
        # Calls that did not run (NOSCRIPT, after a restart): one by one, in their order;
        # the script object loads its script again first.
        for call in again:
            try:
                async with asyncio.timeout(self._timeout):
                    call.settle(await call.script(keys=list(call.keys), args=list(call.args)))
            except Exception as exc:
                call.settle(exc)

    async def _round_trip(self, calls: list[_Call]) -> list[Any]:
        """Send ``calls`` as one write on one pooled connection and read their replies
        (an error reply is returned in its place, not raised).

        The commands are packed by hiredis in C (redis[hiredis] is a dependency) and the
        replies read straight off the connection: redis-py's own pipeline spends several
        times longer per command in Python (encoding each argument, a command stack,
        response callbacks).
        """
        pool = self._client.connection_pool
        connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            packed = [pack_command(("EVALSHA", call.script.sha, len(call.keys), *call.keys,
                                    *call.args)) for call in calls]
            await connection.send_packed_command(b"".join(packed), check_health=False)
            replies: list[Any] = []
            for _ in calls:
                try:
                    replies.append(await connection.read_response())
                except ResponseError as exc:
                    replies.append(exc)
        except BaseException:
            # Cut off mid-write or mid-read (a timeout, a broken socket): what is left on
            # the wire belongs to no caller, so the connection must not be reused.
            await connection.disconnect(nowait=True)
            raise
        finally:
            await pool.release(connection)
        return replies


@dataclass(slots=True)
class _Call:
    script: AsyncScript
    keys: Sequence[str]
    args: Sequence[Any]
    result: asyncio.Future[Any]

    def settle(self, outcome: Any) -> None:
        """Give the caller ``outcome`` (an exception is raised to it), unless it left."""
        if self.result.done():
            return
        if isinstance(outcome, BaseException):
            self.result.set_exception(outcome)
        else:
            self.result.set_result(outcome)
