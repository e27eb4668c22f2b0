"""The widget's reply log on its own: what a reply's writer appends, and the Redis
backend's numbering (on a real redis-server)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from redis.asyncio import Redis

from bots.web.resume import MemoryReplyLog, RedisReplyLog
from bots.web.writer import ReplyWriter, _tick, compact
from core.config import MemorySection
from tests.support.widget import shown


def ev(kind: str, text: str = "", mid: str = "m1", action: str = "allow") -> dict[str, Any]:
    return {"kind": kind, "message_id": mid, "text": text, "action": action}


def test_a_batch_goes_out_late_in_its_linger_but_within_it() -> None:
    """Words are out within the linger (the streaming promise), and wait for their
    reply's end for most of it: at least four fifths of it."""
    for i in range(10_000):
        now = 1_000.0 + i * 0.000_731
        for linger in (0.05, 0.2):
            wait = _tick(now, linger) - now
            assert linger * 0.8 - 1e-9 < wait <= linger + 1e-9


def test_compact_keeps_what_the_widget_shows_in_fewer_entries() -> None:
    user = {"kind": "user", "message_id": "m1", "text": "hi", "at": 1.0}
    # A reply that ends in the batch: the end carries the whole text.
    assert compact([user, ev("typing"), ev("delta", "a"), ev("delta", " b"),
                    ev("final", "a b")]) == [user, ev("final", "a b")]
    assert compact([ev("delta", "a"), ev("reset"), ev("error", "sorry")]) == [
        ev("error", "sorry")]
    # A reply still going: typing gives way to its text, deltas become one.
    assert compact([user, ev("typing"), ev("delta", "a"), ev("delta", " b")]) == [
        user, ev("delta", "a b")]
    assert compact([ev("delta", "a"), ev("reset"), ev("delta", "c")]) == [
        ev("delta", "a"), ev("reset"), ev("delta", "c")]
    # Deltas moderated differently stay apart; one event stays as it is.
    assert compact([ev("delta", "a"), ev("delta", "b", action="warn")]) == [
        ev("delta", "a"), ev("delta", "b", action="warn")]
    assert compact([ev("typing")]) == [ev("typing")]


async def test_a_reply_that_ends_within_the_linger_is_one_append_of_two_entries() -> None:
    log = MemoryReplyLog(ttl=60, cap=100)
    with log.subscribe("r") as sub:
        writer = ReplyWriter(log, "r")
        writer.write({"kind": "user", "message_id": "m1", "text": "hi", "at": 1.0})
        for event in (ev("typing"), ev("delta", "hi"), ev("delta", " there"),
                      ev("final", "hi there")):
            writer.write(event)
        await writer.drain()
        got = sub.ready()
    assert [(e["kind"], e["text"]) for e in got if e] == [("user", "hi"), ("final", "hi there")]
    assert [e["seq"] for e in got if e] == [got[0]["seq"], got[0]["seq"] + 1]  # type: ignore[index]


async def test_a_streamed_reply_is_appended_in_batches_that_read_the_same() -> None:
    log = MemoryReplyLog(ttl=60, cap=100)
    words = ["one", " two", " three", " four"]
    with log.subscribe("r") as sub:
        writer = ReplyWriter(log, "r", linger=60.0)
        writer.write({"kind": "user", "message_id": "m1", "text": "hi", "at": 1.0})
        writer.write(ev("typing"))
        for word in words[:2]:
            writer.write(ev("delta", word))
        await writer.drain()  # a batch goes out before the reply ends
        part = [e for e in sub.ready() if e]
        for word in words[2:]:
            writer.write(ev("delta", word))
        await writer.drain()
        rest = [e for e in sub.ready() if e]
        writer.write(ev("final", "".join(words)))
        await writer.drain()
        end = [e for e in sub.ready() if e]
    assert [e["kind"] for e in part] == ["user", "delta"] and shown(part) == "one two"
    assert [e["kind"] for e in rest] == ["delta"] and [e["kind"] for e in end] == ["final"]
    everything = part + rest + end
    assert shown(everything[:-1]) == "one two three four" == shown(everything)
    seqs = [e["seq"] for e in everything]
    assert seqs == list(range(seqs[0], seqs[0] + 4))


async def test_redis_numbers_from_the_time_and_keeps_big_appends_in_order(
        redis_url: str, memory_prefix: str) -> None:
    section = MemorySection(backend="redis", url=redis_url, key_prefix=memory_prefix)
    async with RedisReplyLog(section, "bot", ttl=60, cap=5000) as log:
        before = int(time.time() * 1_000_000)
        first = await log.append("r", [ev("user", "hi"), ev("final", "hello")])
        many = await log.append("r", [ev("delta", str(i)) for i in range(2500)])
        backlog = await log.since("r", 0)
    start = first[0]["seq"]
    assert before <= start <= int(time.time() * 1_000_000)
    assert [e["seq"] for e in first + many] == list(range(start, start + 2502))
    assert backlog.entries == first + many and backlog.last == start + 2501


async def test_the_start_of_a_reply_waits_for_its_first_words() -> None:
    log = MemoryReplyLog(ttl=60, cap=100)
    with log.subscribe("r") as sub:
        writer = ReplyWriter(log, "r", linger=0.01, quiet=3600.0)
        writer.write({"kind": "user", "message_id": "m1", "text": "hi", "at": 1.0})
        writer.write(ev("typing"))
        await asyncio.sleep(0.2)  # many times the linger: the start is still held
        assert sub.ready() == []
        writer.write(ev("delta", "hello"))  # the first words: out within the linger
        async with asyncio.timeout(10):
            got = [await sub.get(), *sub.ready()]
        await writer.drain()
    assert [(e["kind"], e["text"]) for e in got if e] == [("user", "hi"), ("delta", "hello")]


async def test_redis_keeps_the_newest_cap_entries(redis_url: str, memory_prefix: str) -> None:
    section = MemorySection(backend="redis", url=redis_url, key_prefix=memory_prefix)
    async with RedisReplyLog(section, "bot", ttl=60, cap=16) as log:
        first = await log.append("r", [ev("delta", str(i)) for i in range(10)])
        second = await log.append("r", [ev("delta", str(i)) for i in range(10, 20)])
        kept = await log.since("r", 0)
        after_first = await log.since("r", first[0]["seq"])
    assert kept.entries == (first + second)[-16:]
    assert after_first.gap  # what came right after it is no longer kept


async def test_redis_keeps_numbers_and_entries_for_the_ttl(redis_url: str,
                                                           memory_prefix: str) -> None:
    section = MemorySection(backend="redis", url=redis_url, key_prefix=memory_prefix)
    async with RedisReplyLog(section, "bot", ttl=77, cap=16) as log:
        one = await log.append("r", [ev("user", "hi")])
        client = Redis.from_url(redis_url)
        try:
            await client.expire(f"{memory_prefix}:bot:web:seq:r", 5)
            await client.expire(f"{memory_prefix}:bot:web:log:r", 5)
            two = await log.append("r", [ev("final", "hello")])  # each sets them again
            ttls = [await client.pttl(f"{memory_prefix}:bot:web:{kind}:r")
                    for kind in ("seq", "log")]
        finally:
            await client.aclose()
        kept = await log.since("r", 0)
    assert all(75_000 < t <= 77_000 for t in ttls), ttls
    assert kept.entries == one + two and two[0]["seq"] == one[0]["seq"] + 1 == kept.last


async def test_redis_pokes_the_other_front_ends_that_listen(redis_url: str,
                                                            memory_prefix: str) -> None:
    section = MemorySection(backend="redis", url=redis_url, key_prefix=memory_prefix)
    async with (RedisReplyLog(section, "bot", ttl=60, cap=100) as here,
                RedisReplyLog(section, "bot", ttl=60, cap=100) as there):
        with here.subscribe("r") as mine, there.subscribe("r") as theirs:
            entries = await here.append("r", [ev("user", "hi")])
            async with asyncio.timeout(10):
                assert await theirs.get() is None  # a poke: read the log
                assert await mine.get() == entries[0]
            # This front end no longer listens (its pub/sub is down), the other does:
            # it is still poked.
            assert here._listener is not None
            here._listener.cancel()
            await asyncio.gather(here._listener, return_exceptions=True)
            here._listening = False
            await here.append("r", [ev("final", "hello")])
            async with asyncio.timeout(10):
                assert await theirs.get() is None


def test_a_batch_due_within_uvloops_millisecond_is_still_appended() -> None:
    # uvloop rounds call_at() to milliseconds and hands back a plain Handle (no when())
    # for a time less than half of one away: the writer kept a timer per reply and asked
    # it when() as the reply's words came, so such a reply failed with AttributeError.
    uvloop = pytest.importorskip("uvloop")

    async def reply() -> list[tuple[str, str]]:
        log = MemoryReplyLog(ttl=60, cap=100)
        with log.subscribe("r") as sub:
            writer = ReplyWriter(log, "r", linger=0.0004, quiet=0.0004)
            writer.write({"kind": "user", "message_id": "m1", "text": "hi", "at": 1.0})
            writer.write(ev("typing"))
            writer.write(ev("delta", "hello"))
            writer.write(ev("final", "hello"))
            await writer.drain()
            return [(e["kind"], e["text"]) for e in sub.ready() if e]

    assert uvloop.run(reply()) == [("user", "hi"), ("final", "hello")]
