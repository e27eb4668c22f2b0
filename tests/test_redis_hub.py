"""One Redis pipeline per URL in a process (core.redis_client.RedisHub): memory, the
moderation state and the web widget's reply log, built by the app, share one connection,
so one event-loop turn's calls of all three go out in one write; each keeps its own
timeout, and the shared connection lives until the last of them stops.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from redis.asyncio import Redis

from bots.web.resume import RedisReplyLog
from core.app import build_engine
from core.config import parse_settings
from core.engine import collect
from core.errors import MemoryUnavailable
from core.redis_client import RedisHub
from core.redis_pipeline import _Link
from core.types import IncomingMessage, ReplyKind
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.timeout(60)


class Links:
    """The pipelined connections opened, and the writes made to them."""

    def __init__(self) -> None:
        self.opened = 0
        self.writes = 0


@pytest.fixture
def links(monkeypatch: pytest.MonkeyPatch) -> Iterator[Links]:
    counted = Links()
    opened, sent = _Link.__init__, _Link.send

    def counting_init(self: _Link, owner: Any, connection: Any) -> None:
        counted.opened += 1
        opened(self, owner, connection)

    def counting_send(self: _Link, batch: Any) -> None:
        before = self.owner.round_trips
        sent(self, batch)
        counted.writes += self.owner.round_trips - before

    monkeypatch.setattr(_Link, "__init__", counting_init)
    monkeypatch.setattr(_Link, "send", counting_send)
    yield counted


def settings_for(redis_url: str, prefix: str) -> Any:
    return parse_settings({
        "bot": {"name": "hub"},
        "generation": {"backend": "echo"},
        "memory": {"backend": "redis", "url": redis_url, "key_prefix": prefix},
        "moderation": {"backend": "filters", "state": "redis"},
    }, source="<hub>")


async def test_memory_moderation_and_the_reply_log_share_one_connection(
    redis_url: str, memory_prefix: str, links: Links,
) -> None:
    settings = settings_for(redis_url, memory_prefix)
    engine = build_engine(settings)
    log = RedisReplyLog(settings.memory, "hub", ttl=60, cap=100, redis=engine.redis)
    async with engine, log:
        async def one(i: int) -> None:
            reply = await collect(engine.handle(IncomingMessage(
                bot="hub", channel="web", conversation_id=f"c{i}", user_id=f"u{i}",
                message_id=f"m{i}", text=f"hello there {i}")))
            assert reply.kind is ReplyKind.FINAL, reply
            await log.append(f"web:c{i}", [{"kind": "final", "text": reply.text}])

        await asyncio.gather(*(one(i) for i in range(8)))
        # The moderation state's flood check, memory's begin/finish and the log's append
        # all went through the one pipelined connection.
        assert links.opened == 1
        assert (await log.since("web:c3", 0)).entries[0]["text"]
    # Stopped: the shared connection was closed with the last of its users.
    assert engine.redis is not None and engine.redis._shares == {}


async def test_the_shared_connection_lives_until_its_last_user_stops(
    redis_url: str, memory_prefix: str, links: Links,
) -> None:
    hub = RedisHub()
    first = hub.acquire(redis_url, timeout=2.0, where="<test>")
    second = hub.acquire(redis_url, timeout=2.0, where="<test>")
    assert first is second
    ping = await first.scripts({"ping": "return ARGV[1]"}, call_timeout=2.0)
    assert await ping("ping", [], ["a"]) == b"a"
    await first.release()
    assert await ping("ping", [], ["b"]) == b"b"  # the other user's calls still work
    assert links.opened == 1
    await second.release()
    # Every user gone: the next one gets a new client and connection.
    third = hub.acquire(redis_url, timeout=2.0, where="<test>")
    assert third is not first
    again = await third.scripts({"ping": "return ARGV[1]"}, call_timeout=2.0)
    assert await again("ping", [], ["c"]) == b"c"
    await third.release()
    assert links.opened == 2


# Redis runs one script at a time: a call sent behind this one waits the whole second.
_SPIN = """
local t = redis.call('TIME')
repeat
  local n = redis.call('TIME')
until (n[1] - t[1]) * 1000000 + (n[2] - t[2]) > 1000000
return 'done'
"""


async def test_each_service_keeps_its_own_timeout_on_the_shared_connection(
    redis_url: str, links: Links,
) -> None:
    hub = RedisHub()
    share = hub.acquire(redis_url, timeout=5.0, where="<test>")
    patient = await share.scripts({"spin": _SPIN}, call_timeout=30.0)
    hasty = await share.scripts({"echo": "return ARGV[1]"}, call_timeout=0.05)
    try:
        slow = asyncio.ensure_future(patient("spin", [], []))
        quick = asyncio.ensure_future(hasty("echo", [], ["x"]))
        # Sent in one write; the quick call, stuck behind the spin, fails at its own
        # timeout, and the connection stays for the patient call, which is answered.
        with pytest.raises(TimeoutError):
            await quick
        assert not slow.done()
        assert await slow == b"done"
        assert links.opened == 1 and links.writes == 1
        assert await hasty("echo", [], ["y"]) == b"y"  # the same connection, still good
        assert links.opened == 1
    finally:
        await share.release()


async def test_a_memory_call_on_a_shared_connection_still_fails_as_memory(
    redis_url: str, memory_prefix: str, redis_server: Any,
) -> None:
    settings = settings_for(redis_url, memory_prefix)
    engine = build_engine(settings)
    async with engine:
        redis_server.kill()
        try:
            with pytest.raises(MemoryUnavailable):
                await engine.memory.reset(IncomingMessage(
                    bot="hub", channel="web", conversation_id="c", user_id="u",
                    message_id="m", text="x").key)
        finally:
            redis_server.start()


async def test_plugin_storage_joins_memorys_connection_and_survives_a_restart(
    redis_server: RedisServer, redis_url: str, memory_prefix: str,
) -> None:
    settings = parse_settings({
        "bot": {"name": "hub"},
        "generation": {"backend": "echo"},
        "memory": {"backend": "redis", "url": redis_url, "key_prefix": memory_prefix},
        "moderation": {"backend": "passthrough"},
    }, source="<hub>")
    engine = build_engine(settings)
    store = engine.plugins.services.store
    watcher = Redis.from_url(redis_url)
    try:
        before = len(await watcher.client_list())
        async with engine:
            reply = await collect(engine.handle(IncomingMessage(
                bot="hub", channel="web", conversation_id="c", user_id="u",
                message_id="m1", text="hello there")))
            assert reply.kind is ReplyKind.FINAL, reply
            await store.put("b", {"seen": "1"}, 60)
            assert await store.incr("b", "n", 2, None) == 2
            # A plain count is exact past 2**53 (HINCRBY, not a Lua number) and refuses
            # a field that holds no integer, as it did before storage shared the hub.
            assert await store.incr("b", "big", 2**53 + 1, None) == 2**53 + 1
            assert await store.incr("b", "big", 2, None) == 2**53 + 3
            await store.put("b", {"word": "abc"}, None)
            with pytest.raises(MemoryUnavailable):
                await store.incr("b", "word", 1, None)
            assert await store.get("b", "word") == "abc"
            # Memory and plugin storage: one pool, one pipelined connection.
            assert len(await watcher.client_list()) == before + 1
            redis_server.restart()  # empty again
            assert await store.get("b", "seen") is None
            await store.put("b", {"seen": "2"}, 60)
            assert await store.items("b") == {"seen": "2"}
            assert await store.incr("b", "n", 1, None, bounds=(0, 5), start=4) == 5
            assert await store.remove("b", "n") == 1 and await store.drop("b") == 1
            # Past what one Lua unpack() takes (about 8,000 values), as HSET/HDEL/DEL take.
            many = {f"f{i}": str(i) for i in range(5000)}
            await store.put("big", many, 60)
            assert await store.items("big") == many
            assert await store.remove("big", *many) == 5000
            buckets = [f"big{i}" for i in range(9000)]
            for name in buckets[:3]:
                await store.put(name, {"x": "1"}, 60)
            assert await store.drop(*buckets) == 3
    finally:
        await watcher.aclose()
