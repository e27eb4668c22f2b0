"""The ``redis`` generation backend: a front end's client of a fleet of ``parley worker``s.

``stream(request)`` puts the job on ``{queue}:jobs`` and reads the reply stream the
worker writes (see :mod:`core.generation.fleet.jobs` for the keys and the wire format):

- nobody starts the job within ``generation.timeout`` -> :class:`GeneratorBusy`, and
  the job is deleted and marked cancelled so that no worker runs it later;
- a reply entry of a higher attempt (the job was reclaimed from a dead worker) after
  text was shown -> the next delta has ``restart=True``; entries of lower attempts are
  dropped, so the consumer sees one attempt's text;
- the consumer stops early -> the job is marked cancelled and its worker stops;
- Redis fails -> :class:`GenerationError`; nothing is retried (a retried submit could
  run the job twice).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from core.config import BotSettings, GenerationSection
from core.errors import ConfigError, GenerationError, GeneratorBusy
from core.generation.base import GenerationRequest, TokenDelta, backend_settings
from core.generation.fleet.jobs import (
    CANCEL_TTL,
    QUEUE_CAP,
    REPLY_DONE_TTL,
    MalformedReply,
    QueueKeys,
    decode_reply,
    encode_job,
    valid_request_id,
)
from core.generation.fleet.settings import FleetSettings
from core.lifecycle import ServiceBase
from core.redis_client import connect, failures_as, redact

log = logging.getLogger(__name__)

T = TypeVar("T")

READ_BLOCK = 1.0  # seconds one XREAD waits; the deadline is checked between reads
SOCKET_TIMEOUT = READ_BLOCK + 5.0  # a Redis that answers nothing for this long has failed

# KEYS: jobs. ARGV: cap, job. A full queue answers false instead of dropping old jobs.
_SUBMIT = """
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return false end
return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'job', ARGV[2])
"""


class RedisGenerator(ServiceBase):
    """A :class:`~core.generation.base.Generator` whose workers are ``parley worker``s."""

    def __init__(self, section: GenerationSection, *, source: str = "<memory>") -> None:
        options = backend_settings(section, FleetSettings, source=source)
        if not options.url:
            raise ConfigError(
                f"{source}: generation.url: the redis backend needs the workers' Redis URL"
            )
        self.section = section
        self.source = source
        self.keys = QueueKeys(options.queue)
        self.where = redact(options.url)
        self._url = options.url
        self._client: Redis | None = None
        self._submit: AsyncScript | None = None

    async def _start(self) -> None:
        client = connect(self._url, timeout=SOCKET_TIMEOUT,
                         where=f"{self.source}: generation.url")
        self._client = client
        self._submit = client.register_script(_SUBMIT)
        await self._call("start", client.ping())

    async def _stop(self) -> None:
        client, self._client = self._client, None
        self._submit = None
        if client is not None:
            await client.aclose()

    async def _call(self, what: str, call: Awaitable[T]) -> T:
        async with self._failures(what):
            return await call

    def _failures(self, what: str) -> AbstractAsyncContextManager[None]:
        return failures_as(GenerationError, f"redis at {self.where}", what)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        """The reply of whichever worker runs ``request``; closing the iterator cancels it."""
        client, submit = self._client, self._submit
        if client is None or submit is None or not self.started:
            raise GenerationError("the redis generator is not started")
        rid = request.request_id
        if not valid_request_id(rid):
            raise GenerationError("the request id is empty or too long")
        timeout = self.section.timeout
        job = encode_job(request, time.time() + timeout)
        reply_key, cancel_key = self.keys.reply(rid), self.keys.cancel(rid)
        entry = await self._call("submit", submit(keys=[self.keys.jobs], args=[QUEUE_CAP, job]))
        if entry is None:
            raise GeneratorBusy(f"the generation queue {self.keys.jobs} is full")
        finished = False
        try:
            async for delta in self._read(client, reply_key, timeout):
                if delta.finish_reason is not None:
                    finished = True
                yield delta
                if finished:
                    return
        except GeneratorBusy:
            # Nobody took the job: take it back, so that no worker runs it later.
            await self._quietly(client, "withdraw", lambda p: p.xdel(self.keys.jobs, entry))
            raise
        finally:
            if finished:
                await self._quietly(
                    client, "expire", lambda p: p.expire(reply_key, REPLY_DONE_TTL)
                )
            else:
                await self._quietly(client, "cancel", lambda p: p.set(cancel_key, 1, ex=CANCEL_TTL))

    async def _read(
        self, client: Redis, reply_key: str, patience: float
    ) -> AsyncIterator[TokenDelta]:
        """The deltas of the reply stream, the latest attempt's only."""
        last_id: bytes | str = "0-0"
        attempt, shown, restart = 0, False, False
        started = False
        deadline = time.monotonic() + patience
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                if not started:
                    raise GeneratorBusy(f"no worker started the job within {patience:g} s")
                raise GenerationError(f"no word from the worker for {patience:g} s")
            block = max(1, int(min(left, READ_BLOCK) * 1000))
            answer: Any = await self._call(
                "read", client.xread({reply_key: last_id}, count=256, block=block)
            )
            for _key, entries in answer or ():
                for entry_id, fields in entries:
                    last_id = entry_id
                    try:
                        reply = decode_reply(fields)
                    except MalformedReply as exc:
                        raise GenerationError(str(exc)) from None
                    if reply.attempt < attempt:
                        continue  # a worker that lost the job to another still writing
                    started = True
                    deadline = time.monotonic() + patience
                    if reply.attempt > attempt:
                        attempt = reply.attempt
                        restart = restart or shown
                    if reply.error is not None:
                        raise GenerationError(f"the worker failed: {reply.error}")
                    if reply.text or reply.finish_reason is not None or restart:
                        yield TokenDelta(reply.text, reply.finish_reason, restart=restart)
                        shown = bool(reply.text) or (shown and not restart)
                        restart = False
                    if reply.finish_reason is not None:
                        return

    async def _quietly(
        self, client: Redis, what: str, build: Callable[[Any], object]
    ) -> None:
        """Best-effort clean-up: the reply already ended, so a failure is only logged."""
        try:
            async with asyncio.timeout(SOCKET_TIMEOUT):
                pipe = client.pipeline(transaction=False)
                build(pipe)
                await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("redis generator: %s at %s failed: %s", what, self.where, exc)


def create(settings: BotSettings) -> RedisGenerator:
    """Entry point ``parley.generators: redis``."""
    return RedisGenerator(settings.generation, source=settings.source)
