"""How every part of Parley that talks to Redis connects, and what its failures become.

One policy for memory, moderation state and the generation queue: no automatic retries
(a retried write whose first attempt did reach Redis would be applied twice) except of
scripts their caller declares safe to repeat, short
socket timeouts, and every Redis or socket error turned into the caller's own
:class:`~core.errors.ParleyError` naming the server without its password.
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from collections.abc import Collection, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import hiredis
from hiredis import pack_command
from redis._parsers.base import BaseParser
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, NoScriptError, RedisError

from core.errors import ConfigError, ParleyError


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
    await client.ping()
    scripts = {name: client.register_script(source) for name, source in sources.items()}
    for script in scripts.values():
        await client.script_load(script.script)
    return scripts


class ScriptPipeline:
    """Runs registered Lua scripts on one pipelined connection of its own.

    The calls made in one event-loop turn go out as one write, without waiting for the
    replies to earlier writes; one task reads every reply, in order, and hands each to its
    caller. Many conversations are in flight at once, so their memory reads and writes
    arrive together; this is what ioredis calls auto-pipelining. Compared with taking a
    pooled connection, a task and a timer for each batch and redis-py's reader for each
    reply, a call costs a few microseconds instead of tens when batches are small (as
    under a steady stream of messages, not a benchmark's burst).

    Each call still gets its own result or error. A call unanswered within ``timeout``
    fails with :class:`TimeoutError`, and so does every call behind it on the connection,
    which is closed (what is left on the wire belongs to no caller). When the connection
    breaks, the calls of scripts safe to repeat (``retry``) are sent once more on a fresh
    one and the others fail; a call the server answered NOSCRIPT (after a restart) did
    not run and is run again (the script is loaded first).
    """

    def __init__(
        self, client: Redis, scripts: Mapping[str, AsyncScript], *, timeout: float,
        retry: Collection[str] = (),
    ) -> None:
        self._client = client
        self._scripts = dict(scripts)
        self._timeout = timeout
        # Scripts that may run twice: sent again once when their connection broke.
        self._retry = frozenset(self._scripts[name].sha for name in retry)
        self._pending: list[_Call] = []
        self._link: _Link | None = None
        self._opening = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self.round_trips = 0  # writes to Redis (what tests count)

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
        link = self._link
        if link is not None and link.alive:
            link.send(batch)
        else:
            self._spawn(self._open_and_send(batch))

    async def _open_and_send(self, batch: list[_Call]) -> None:
        try:
            async with self._opening:
                link = self._link
                if link is None or not link.alive:
                    pool = self._client.connection_pool
                    async with asyncio.timeout(self._timeout):
                        # Never given back while it works: the pool closes it with the
                        # client (aclose), and it is not one of the idle connections a
                        # restart makes us drop.
                        connection = await pool.get_connection()  # type: ignore[no-untyped-call]
                    link = self._link = _Link(self, connection)
        except BaseException as exc:
            for call in batch:
                call.settle(exc)
            if not isinstance(exc, Exception):
                raise
            return
        link.send(batch)

    async def aclose(self) -> None:
        """Close the pipeline's connection (calls still waiting fail)."""
        link, self._link = self._link, None
        if link is not None:
            await link.aclose()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _lost(self, calls: list[_Call], exc: BaseException) -> None:
        """``calls`` were on a connection that broke (or timed out) with ``exc``."""
        retry = []
        broken = isinstance(exc, ConnectionError | RedisConnectionError)
        if broken:
            # The server restarted (or the network blipped): every idle pooled
            # connection is as stale as this one, so drop them all at once rather than
            # fail one call per connection; then send the calls that are safe to repeat
            # once more, on a fresh connection.
            self._spawn(self._client.connection_pool.disconnect(inuse_connections=False))
        for call in calls:
            if broken and call.script.sha in self._retry and not call.retried:
                call.retried = True
                retry.append(call)
            else:
                call.settle(exc)
        if retry:
            self._spawn(self._open_and_send(retry))

    async def _run_again(self, calls: list[_Call]) -> None:
        """Calls that did not run (NOSCRIPT, after a restart): one by one, in their
        order; the script object loads its script again first."""
        for call in calls:
            try:
                async with asyncio.timeout(self._timeout):
                    call.settle(await call.script(keys=list(call.keys), args=list(call.args)))
            except Exception as exc:
                call.settle(exc)


class _Link:
    """A connection of a :class:`ScriptPipeline`: written to at once, read by one task."""

    def __init__(self, owner: ScriptPipeline, connection: Any) -> None:
        self.owner = owner
        self.connection = connection
        # redis-py connected it (TLS, AUTH, SELECT, ...); its streams are used directly.
        self._writer: asyncio.StreamWriter = connection._writer
        encoder = connection.encoder
        options: dict[str, Any] = {"protocolError": InvalidResponse,
                                   "replyError": BaseParser.parse_error}
        if encoder.decode_responses:
            options.update(encoding=encoder.encoding, errors=encoder.encoding_errors)
        self._parser = hiredis.Reader(**options)
        self.waiting: deque[_Call] = deque()
        self.alive = True
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._reading = self._loop.create_task(self._read(connection._reader))

    def send(self, batch: list[_Call]) -> None:
        """Write ``batch``'s calls (those whose callers still wait) in one write."""
        calls = [call for call in batch if not call.result.done()]
        if not calls:
            return
        if not self.alive:
            self.owner._lost(calls, RedisConnectionError("the connection was closed"))
            return
        deadline = self._loop.time() + self.owner._timeout
        for call in calls:
            call.deadline = deadline
        self.waiting.extend(calls)
        try:
            # Packed by hiredis in C: redis-py's own pipeline spends several times longer
            # per command in Python (encoding each argument, a command stack, callbacks).
            self._writer.write(b"".join([
                pack_command(("EVALSHA", call.script.sha, len(call.keys), *call.keys,
                              *call.args))
                for call in calls]))
        except Exception as exc:  # the transport closed under us (uvloop raises)
            self.close(RedisConnectionError(f"writing to Redis failed: {exc}"))
            return
        self.owner.round_trips += 1
        if self._timer is None:
            self._timer = self._loop.call_at(deadline, self._check)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        parser, waiting = self._parser, self.waiting
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    raise RedisConnectionError("Connection closed by server.")
                parser.feed(data)
                again = []
                while (reply := parser.gets()) is not False:
                    call = waiting.popleft()
                    if isinstance(reply, NoScriptError):
                        again.append(call)
                    else:
                        call.settle(reply)
                if again:
                    self.owner._spawn(self.owner._run_again(again))
        except asyncio.CancelledError:
            self.close(RedisConnectionError("the connection was closed"))
            raise
        except BaseException as exc:
            self.close(exc)
            if not isinstance(exc, Exception):
                raise

    def _check(self) -> None:
        """The oldest call's deadline came: fail it (and all behind it) if unanswered."""
        self._timer = None
        if not self.alive or not self.waiting:
            return
        deadline = self.waiting[0].deadline
        if self._loop.time() >= deadline:
            self.close(TimeoutError(f"Redis did not answer within {self.owner._timeout} s"))
        else:
            self._timer = self._loop.call_at(deadline, self._check)

    def close(self, exc: BaseException) -> None:
        """Stop using the connection; its waiting calls fail with ``exc`` (or go again)."""
        if not self.alive:
            return
        self.alive = False
        if self._timer is not None:
            self._timer.cancel()
        if not self._reading.done() and asyncio.current_task() is not self._reading:
            self._reading.cancel()
        calls = list(self.waiting)
        self.waiting.clear()
        self.owner._spawn(self._disconnect())
        self.owner._lost(calls, exc)

    async def aclose(self) -> None:
        """Close the connection on purpose; calls still waiting fail."""
        if self.alive:
            self.alive = False
            if self._timer is not None:
                self._timer.cancel()
            self._reading.cancel()
            for call in self.waiting:
                call.settle(RedisConnectionError("the pipeline was closed"))
            self.waiting.clear()
            await self._disconnect()

    async def _disconnect(self) -> None:
        await self.connection.disconnect(nowait=True)
        await self.owner._client.connection_pool.release(self.connection)


@dataclass(slots=True)
class _Call:
    script: AsyncScript
    keys: Sequence[str]
    args: Sequence[Any]
    result: asyncio.Future[Any]
    deadline: float = 0.0
    retried: bool = False

    def settle(self, outcome: Any) -> None:
        """Give the caller ``outcome`` (an exception is raised to it), unless it left."""
        if self.result.done():
            return
        if isinstance(outcome, BaseException):
            self.result.set_exception(outcome)
        else:
            self.result.set_result(outcome)
