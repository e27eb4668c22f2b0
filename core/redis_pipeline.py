"""The pipeline every Redis service's Lua scripts go out on: :class:`ScriptPipeline`.

Calls made in one event-loop turn are written to one connection at once and read back by
one task; :class:`Scripts` is one service's view of a pipeline it may share (through a
:class:`~core.redis_client.RedisHub`). The policy it follows is
:mod:`core.redis_client`'s: no retries but of the scripts a caller declares safe to
repeat, and NOSCRIPT (a restarted server) handled here, once for all.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Collection, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import hiredis
from hiredis import pack_command
from redis._parsers.base import BaseParser
from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, NoScriptError


class ScriptPipeline:
    """Runs registered Lua scripts on one pipelined connection of its own.

    The calls made in one event-loop turn go out as one write, without waiting for the
    replies to earlier writes; one task reads every reply, in order, and hands each to its
    caller. Many conversations are in flight at once, so their memory reads and writes
    arrive together; this is what ioredis calls auto-pipelining. Compared with taking a
    pooled connection, a task and a timer for each batch and redis-py's reader for each
    reply, a call costs a few microseconds instead of tens when batches are small (as
    under a steady stream of messages, not a benchmark's burst).

    Several services may share one (see :class:`~core.redis_client.RedisHub`): each
    runs its own scripts through a :class:`Scripts` view with its own timeout and its
    own scripts safe to repeat, and the calls of all of them made in one turn still go
    out in one write.

    Each call still gets its own result or error. A call unanswered within its
    ``timeout`` fails with :class:`TimeoutError`; when the oldest call on the connection
    times out, so does every call behind it, and the connection is closed (what is left
    on the wire belongs to no caller). When the connection breaks, the calls of scripts
    safe to repeat (``retry``) are sent once more on a fresh one and the others fail; a
    call the server answered NOSCRIPT (after a restart) did not run and is run again
    (the script is loaded first).
    """

    def __init__(self, client: Redis) -> None:
        self._client = client
        self._pending: list[_Call] = []
        self._link: _Link | None = None
        self._opening = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self.round_trips = 0  # writes to Redis (what tests count)

    def run(self, script: AsyncScript, keys: Sequence[str], args: Sequence[Any], *,
            timeout: float, retry: bool) -> asyncio.Future[Any]:
        """Run ``script`` (registered on this pipeline's client) with ``keys`` and
        ``args``: a future of its result; fails with :class:`TimeoutError` if unanswered
        within ``timeout``; sent once more after a broken connection if ``retry`` (it is
        safe to run twice). Cancelling the future withdraws the call if not yet sent."""
        loop = asyncio.get_running_loop()
        call = _Call(script, keys, args, loop.create_future(), timeout, retry)
        self._pending.append(call)
        if len(self._pending) == 1:
            loop.call_soon(self._flush)
        return call.result

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
                    async with asyncio.timeout(min(call.timeout for call in batch)):
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
            if broken and call.retry and not call.retried:
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
            if call.result.done():
                continue
            try:
                async with asyncio.timeout(call.timeout):
                    call.settle(await call.script(keys=list(call.keys), args=list(call.args)))
            except Exception as exc:
                call.settle(exc)


class Scripts:
    """One service's scripts on a :class:`ScriptPipeline` it may share: called by name,
    with the service's own timeout and its own scripts safe to run twice."""

    __slots__ = ("_pipeline", "_retry", "_scripts", "_timeout")

    def __init__(self, pipeline: ScriptPipeline, scripts: Mapping[str, AsyncScript], *,
                 timeout: float, retry: Collection[str] = ()) -> None:
        self._pipeline = pipeline
        self._scripts = dict(scripts)
        self._timeout = timeout
        self._retry = frozenset(retry)
        if unknown := self._retry - self._scripts.keys():
            raise ValueError(f"no such scripts: {sorted(unknown)}")

    def __call__(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Awaitable[Any]:
        """Run script ``name``; see :meth:`ScriptPipeline.run`."""
        return self._pipeline.run(self._scripts[name], keys, args, timeout=self._timeout,
                                  retry=name in self._retry)


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
        now = self._loop.time()
        soonest = float("inf")
        for call in calls:
            call.deadline = deadline = now + call.timeout
            soonest = min(soonest, deadline)
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
        # Deadlines only grow when every call has the same timeout (one service); a
        # shorter one (another service's) behind them moves the timer forward.
        if self._timer is None or soonest < self._timer.when():
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(soonest, self._check)

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
        """A deadline came. The oldest call unanswered: the connection is stuck, so it
        fails with every call behind it. A call behind it with a shorter timeout (another
        service's): that call alone fails; its reply, when it comes, is dropped."""
        self._timer = None
        if not self.alive or not self.waiting:
            return
        now = self._loop.time()
        head = self.waiting[0]
        if now >= head.deadline:
            self.close(TimeoutError(f"Redis did not answer within {head.timeout} s"))
            return
        soonest = head.deadline
        for call in self.waiting:
            if call.result.done():
                continue
            if now >= call.deadline:
                call.settle(TimeoutError(f"Redis did not answer within {call.timeout} s"))
            elif call.deadline < soonest:
                soonest = call.deadline
        self._timer = self._loop.call_at(soonest, self._check)

    def close(self, exc: BaseException) -> None:
        """Stop using the connection; its waiting calls fail with ``exc`` (or go again)."""
        if self.alive:
            calls = self._shut()
            self.owner._spawn(self._disconnect())
            self.owner._lost(calls, exc)

    async def aclose(self) -> None:
        """Close the connection on purpose; calls still waiting fail."""
        if self.alive:
            for call in self._shut():
                call.settle(RedisConnectionError("the pipeline was closed"))
            await self._disconnect()

    def _shut(self) -> list[_Call]:
        """Mark the link dead, stop its timer and reader; the calls it left waiting."""
        self.alive = False
        if self._timer is not None:
            self._timer.cancel()
        if not self._reading.done() and asyncio.current_task() is not self._reading:
            self._reading.cancel()
        calls = list(self.waiting)
        self.waiting.clear()
        return calls

    async def _disconnect(self) -> None:
        await self.connection.disconnect(nowait=True)
        await self.owner._client.connection_pool.release(self.connection)


@dataclass(slots=True)
class _Call:
    script: AsyncScript
    keys: Sequence[str]
    args: Sequence[Any]
    result: asyncio.Future[Any]
    timeout: float
    retry: bool  # safe to run twice: sent again once after a broken connection
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
