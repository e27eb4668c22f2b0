"""Redis comes back, the bot comes back at once (#9 item 9): a front end (the real engine,
memory and generation on Redis) and two real :class:`Worker`s on the session's
redis-server, which is SIGKILLed under load and restarted empty. From the first message
after it answers again, every message is answered: no stale connection fails a user, and
the workers recreate their stream, consumer group and scripts without waiting.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from core.app import build_engine
from core.config import parse_settings
from core.engine import Engine, collect
from core.generation.echo import EchoGenerator
from core.generation.fleet import worker as worker_module
from core.generation.fleet.worker import Worker
from core.types import IncomingMessage, ReplyEvent, ReplyKind
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.timeout(120)

WAVE = 20
log = logging.getLogger(__name__)


async def wave(engine: Engine, tag: str) -> list[ReplyEvent]:
    """``WAVE`` messages at once, each in a conversation of its own."""
    async def one(i: int) -> ReplyEvent:
        return await collect(engine.handle(IncomingMessage(
            bot=engine.name, channel="web", conversation_id=f"{tag}-{i}", user_id=f"u{i}",
            message_id=f"{tag}-{i}", text=f"hello {tag} {i}")))

    return list(await asyncio.gather(*(one(i) for i in range(WAVE))))


def failures(events: list[ReplyEvent]) -> list[str]:
    return [f"{e.code}: {e.text}" for e in events if e.kind is not ReplyKind.FINAL]


async def test_after_a_redis_restart_every_message_is_answered(
    redis_server: RedisServer, redis_url: str, memory_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Longer than the front end waits for a worker: a worker that sat out a pause after
    # losing its connection, instead of coming back with Redis, fails the first waves.
    monkeypatch.setattr(worker_module, "ERROR_PAUSE", 60.0)
    settings = parse_settings({
        "bot": {"name": "restart"},
        "generation": {"backend": "redis", "url": redis_url, "queue": f"{memory_prefix}:gen",
                       "timeout": 10.0},
        "memory": {"backend": "redis", "url": redis_url, "key_prefix": memory_prefix},
        "moderation": {"backend": "passthrough"},
        "worker": {"url": redis_url, "backend": "echo"},
    }, source="<restart>")
    engine = build_engine(settings)
    workers = [Worker(settings, inner=EchoGenerator()) for _ in range(2)]
    for i, worker in enumerate(workers):
        worker.name = f"w{i}"
    async with engine, workers[0], workers[1]:
        # Two waves: every pooled connection is made, and idle when Redis goes.
        for n in range(2):
            assert failures(await wave(engine, f"warm{n}")) == []
        redis_server.kill()
        await asyncio.sleep(0.3)  # the workers notice (their reads break) and wait
        redis_server.start()  # returns once it answers PING, with nothing in it
        back = time.monotonic()
        results: list[tuple[float, list[str]]] = []
        for n in range(3):
            events = await wave(engine, f"after{n}")
            results.append((time.monotonic() - back, failures(events)))
        # For the record (not asserted: wall-clock time on a shared machine).
        log.info("waves after the restart (seconds since back, failures): %s",
                 [(round(t, 2), len(f)) for t, f in results])
    assert [f for _, f in results] == [[], [], []], results
