"""Memory backends: the shared semantics on both, and Redis's failure modes on a real server.

The Redis tests run against the session's own ``redis-server`` (tests/support/redis_server.py),
each under its own key prefix. Time: the embedded store takes an injected clock that tests
move forward; on Redis, TTLs of one second and short real sleeps.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection

from core.config import BotSettings, parse_settings
from core.errors import ConfigError, MemoryUnavailable
from core.memory.base import MemoryStore, StoredReply, UserRef, memory_backends
from core.memory.embedded import EmbeddedMemory
from core.memory.redis import RedisMemory
from core.redis_pipeline import _Link
from core.types import ConversationKey, Turn
from tests.support.redis_server import RedisServer

TIMEOUT = 0.5  # memory.timeout for Redis tests: a stuck server fails a call this fast

pytestmark = pytest.mark.timeout(60)


class FakeClock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Backend:
    """Opens stores of one backend with chosen settings, and moves their time forward."""

    def __init__(self, kind: str, url: str = "", prefix: str = "parley") -> None:
        self.kind = kind
        self.url = url
        self.prefix = prefix
        self.clock = FakeClock()
        self.stores: list[MemoryStore] = []

    def settings(self, bot: str = "bot", **memory: Any) -> BotSettings:
        """Bot settings for this backend, with ``memory`` overrides."""
        section = {"backend": self.kind, "url": self.url or "redis://unused", "timeout": TIMEOUT,
                   "key_prefix": self.prefix, **memory}
        return parse_settings({"bot": {"name": bot}, "memory": section})

    async def open(self, **memory: Any) -> MemoryStore:
        """A started store; stopped at the end of the test."""
        settings = self.settings(**memory)
        store: MemoryStore
        if self.kind == "embedded":
            store = EmbeddedMemory(settings.memory, clock=self.clock, sweep_interval=10.0)
        else:
            store = RedisMemory(settings.memory)
        await store.start()
        self.stores.append(store)
        return store

    async def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass for the stores."""
        if self.kind == "embedded":
            self.clock.now += seconds
        else:
            await asyncio.sleep(seconds)


@pytest.fixture(params=["embedded", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """Each shared test runs once per backend."""
    if request.param == "redis":
        b = Backend("redis", request.getfixturevalue("redis_url"),
                    request.getfixturevalue("memory_prefix"))
    else:
        b = Backend("embedded")
    yield b
    for store in reversed(b.stores):
        await store.stop()


@pytest.fixture
async def redis_backend(redis_url: str, memory_prefix: str) -> AsyncIterator[Backend]:
    """Only the Redis backend."""
    b = Backend("redis", redis_url, memory_prefix)
    yield b
    for store in reversed(b.stores):
        await store.stop()


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[Redis]:
    """A plain client on the test server, to look at keys behind the store's back."""
    client = Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


KEY = ConversationKey("bot", "web", "conv-1")


def turns(*texts: str, user: str = "alice") -> list[Turn]:
    """A user turn per text, with message ids, at increasing times."""
    return [Turn("user", t, user, f"m-{t}", at=1000.0 + i) for i, t in enumerate(texts)]


def texts(snapshot: Any) -> list[str]:
    """The texts of a snapshot's turns, oldest first."""
    return [t.text for t in snapshot.turns]


def alice(bot: str = "bot", channel: str = "web", user: str = "alice") -> UserRef:
    """A user of a channel of a bot."""
    return UserRef(bot, channel, user)


async def answer(store: MemoryStore, key: ConversationKey, message_id: str,
                 reply: str = "ok", user: str = "alice") -> bool:
    """Answer ``message_id`` as the engine does (begin, then finish with no turns);
    False if it was answered before (the stored reply came back instead)."""
    begun = await store.begin(key, message_id, user, f"t-{message_id}")
    if begun.replay is not None:
        return False
    assert begun.snapshot is not None
    await store.finish(key, message_id, user, f"t-{message_id}", [],
                       StoredReply("final", reply))
    return True


# --- shared semantics -------------------------------------------------------------------


async def test_start_and_stop_are_idempotent(backend: Backend) -> None:
    store = await backend.open()
    await store.start()
    await store.append(KEY, turns("a"))
    await store.stop()
    await store.stop()


async def test_unknown_conversation_loads_empty(backend: Backend) -> None:
    store = await backend.open()
    snapshot = await store.load(KEY, "alice")
    assert snapshot.turns == () and dict(snapshot.facts) == {}


async def test_turns_come_back_in_order_and_intact(backend: Backend) -> None:
    store = await backend.open()
    first = [Turn("user", "hi: there", "alice", "m1", at=10.5), Turn("assistant", "héllo ✓")]
    await store.append(KEY, first)
    await store.append(KEY, [Turn("user", "again", "alice", "m2", at=11.0)])
    snapshot = await store.load(KEY, "alice")
    assert snapshot.turns[:2] == tuple(first)
    assert texts(snapshot) == ["hi: there", "héllo ✓", "again"]


async def test_conversation_is_trimmed_to_its_window(backend: Backend) -> None:
    store = await backend.open(window=3)
    await store.append(KEY, turns("1", "2"))
    await store.append(KEY, turns("3", "4"))
    assert texts(await store.load(KEY, "alice")) == ["2", "3", "4"]
    await store.append(KEY, turns("5", "6", "7", "8", "9"))  # one batch longer than the window
    assert texts(await store.load(KEY, "alice")) == ["7", "8", "9"]


async def test_concurrent_appends_keep_each_batch_whole(backend: Backend) -> None:
    store = await backend.open(window=100)
    batches = [
        [Turn("user", f"q{i}", f"user{i}"), Turn("assistant", f"a{i}")] for i in range(20)
    ]
    await asyncio.gather(*(store.append(KEY, batch) for batch in batches))
    got = texts(await store.load(KEY, "user0"))
    assert sorted(got) == sorted(t.text for batch in batches for t in batch)
    assert all(got[i][1:] == got[i + 1][1:] for i in range(0, len(got), 2))  # q7 then a7


async def test_conversation_expires_and_load_refreshes_it(backend: Backend) -> None:
    store = await backend.open(ttl=1)
    await store.append(KEY, turns("a"))
    await backend.advance(0.6)
    assert texts(await store.load(KEY, "alice")) == ["a"]  # refreshes: 1 s from now
    await backend.advance(0.6)
    assert texts(await store.load(KEY, "alice")) == ["a"]  # alive only thanks to the refresh
    await backend.advance(1.3)
    assert texts(await store.load(KEY, "alice")) == []


async def test_reset_forgets_one_conversation_only(backend: Backend) -> None:
    store = await backend.open()
    other = ConversationKey("bot", "web", "conv-2")
    assert await answer(store, KEY, "m1")
    await store.append(KEY, turns("a"))
    await store.append(other, turns("b"))
    await store.set_fact(alice(), "name", "Alice")
    await store.reset(KEY)
    snapshot = await store.load(KEY, "alice")
    assert texts(snapshot) == [] and dict(snapshot.facts) == {"name": "Alice"}
    assert texts(await store.load(other, "alice")) == ["b"]
    assert not await answer(store, KEY, "m1")  # a redelivery is still recognised
    await store.append(KEY, turns("c"))
    assert texts(await store.load(KEY, "alice")) == ["c"]


async def test_bots_channels_and_conversations_do_not_meet(backend: Backend) -> None:
    store = await backend.open()
    keys = [
        ConversationKey("bot", "web", "c"),
        ConversationKey("other-bot", "web", "c"),
        ConversationKey("bot", "discord", "c"),
        ConversationKey("bot", "web", "d"),
        # ':' in ids must not make these two the same conversation
        ConversationKey("bot", "a:b", "c"),
        ConversationKey("bot", "a", "b:c"),
    ]
    for i, key in enumerate(keys):
        await store.append(key, turns(str(i)))
        assert await answer(store, key, "same-id")
    for i, key in enumerate(keys):
        assert texts(await store.load(key, "alice")) == [str(i)]


async def test_an_answered_message_is_replayed_until_its_window_ends(backend: Backend) -> None:
    store = await backend.open(dedupe_window=1, lease=1)
    assert await answer(store, KEY, "m1", "first reply")
    again = await store.begin(KEY, "m1", "alice", "other-token")
    assert again.replay == StoredReply("final", "first reply")  # the stored reply, again
    assert await answer(store, KEY, "m2")
    assert await answer(store, ConversationKey("bot", "web", "conv-2"), "m1")
    await backend.advance(1.2)
    assert await answer(store, KEY, "m1")


async def test_a_released_message_is_answered_on_redelivery(backend: Backend) -> None:
    store = await backend.open()
    begun = await store.begin(KEY, "m1", "alice", "t1")
    assert begun.snapshot is not None
    await store.abort(KEY, "m1", "t1")  # the reply failed
    retry = await store.begin(KEY, "m1", "alice", "t2")
    assert retry.snapshot is not None and retry.replay is None


async def test_a_pending_message_makes_its_redelivery_wait(backend: Backend) -> None:
    store = await backend.open(lease=1)
    assert (await store.begin(KEY, "m1", "alice", "t1")).snapshot is not None
    assert (await store.begin(KEY, "m1", "alice", "t2")).waiting
    await store.finish(KEY, "m1", "alice", "t1", turns("q"), StoredReply("final", "a"))
    assert (await store.begin(KEY, "m1", "alice", "t2")).replay == StoredReply("final", "a")


async def test_a_pending_mark_expires_with_the_lease(backend: Backend) -> None:
    store = await backend.open(lease=1)
    assert (await store.begin(KEY, "m1", "alice", "t1")).snapshot is not None  # then crashed
    await backend.advance(1.2)
    assert (await store.begin(KEY, "m1", "alice", "t2")).snapshot is not None


async def test_finish_and_begin_are_safe_to_repeat(backend: Backend) -> None:
    store = await backend.open()
    assert (await store.begin(KEY, "m1", "alice", "t1")).snapshot is not None
    assert (await store.begin(KEY, "m1", "alice", "t1")).snapshot is not None  # same token
    for _ in range(2):
        await store.finish(KEY, "m1", "alice", "t1", turns("q"), StoredReply("final", "a"))
    assert texts(await store.load(KEY, "alice")) == ["q"]


async def test_the_dedupe_record_is_bounded_by_count(backend: Backend) -> None:
    store = await backend.open(dedupe_max=5)
    for i in range(1500):
        assert await answer(store, KEY, f"m{i}")
    assert not await answer(store, KEY, "m1499")
    assert not await answer(store, KEY, "m1495")
    assert await answer(store, KEY, "m1494")  # dropped: the five newest are kept


async def test_begin_is_dedupe_lease_and_load_in_one(
    backend: Backend, round_trips: RoundTrips
) -> None:
    store = await backend.open(window=2)
    await store.append(KEY, turns("a", "b", "c"))
    await store.set_fact(alice(), "name", "Alice")
    before = round_trips.count
    begun = await store.begin(KEY, "m1", "alice", "t1")
    assert begun.snapshot is not None and texts(begun.snapshot) == ["b", "c"]
    assert begun.snapshot.facts == {"name": "Alice"}
    await store.finish(KEY, "m1", "alice", "t1", turns("d"), StoredReply("final", "e"))
    assert (await store.begin(KEY, "m1", "alice", "t2")).replay is not None  # a redelivery
    if backend.kind == "redis":
        assert round_trips.count - before == 3


async def test_facts_belong_to_a_user_of_a_channel_of_a_bot(backend: Backend) -> None:
    store = await backend.open()
    await store.set_fact(alice(), "name", "Alice")
    await store.set_fact(alice(), "name", "Ally")
    await store.set_fact(alice(), "city", "Oslo")
    await store.set_fact(alice(user="bob"), "name", "Bob")
    await store.set_fact(alice(bot="other-bot"), "name", "A.")
    await store.set_fact(alice(channel="telegram", user="12345"), "secret", "s3")
    elsewhere = ConversationKey("bot", "web", "42")
    assert dict((await store.load(elsewhere, "alice")).facts) == {"name": "Ally", "city": "Oslo"}
    assert dict((await store.load(KEY, "bob")).facts) == {"name": "Bob"}
    other = ConversationKey("other-bot", "web", "conv-1")
    assert dict((await store.load(other, "alice")).facts) == {"name": "A."}
    # A web caller claiming a Telegram user's id gets nothing of theirs.
    assert dict((await store.load(KEY, "12345")).facts) == {}
    telegram = ConversationKey("bot", "telegram", "dm")
    assert dict((await store.load(telegram, "12345")).facts) == {"secret": "s3"}
    assert dict((await store.load(telegram, "alice")).facts) == {}


async def test_forget_user_deletes_their_conversations_and_facts(backend: Backend) -> None:
    store = await backend.open()
    alone = ConversationKey("bot", "web", "alice-only")
    shared = ConversationKey("bot", "web", "group")
    bobs = ConversationKey("bot", "web", "bob-only")
    theirs = ConversationKey("other-bot", "web", "alice-only")
    namesake = ConversationKey("bot", "discord", "alice-only")  # another channel's alice:x
    await store.append(alone, turns("a1", user="alice:x"))
    await store.append(shared, turns("b1", user="bob") + turns("a2", user="alice:x"))
    await store.append(bobs, turns("b2", user="bob"))
    await store.append(theirs, turns("a3", user="alice:x"))
    await store.append(namesake, turns("a4", user="alice:x"))
    await store.set_fact(alice(user="alice:x"), "name", "Alice")
    await store.set_fact(alice(user="alice:x"), "city", "Oslo")
    await store.set_fact(alice(user="bob"), "name", "Bob")

    assert await store.forget_user(alice(user="alice:x")) == 2 + 2  # conversations + facts
    assert texts(await store.load(alone, "bob")) == []
    assert texts(await store.load(shared, "bob")) == []
    assert dict((await store.load(alone, "alice:x")).facts) == {}
    assert texts(await store.load(bobs, "bob")) == ["b2"]
    assert dict((await store.load(bobs, "bob")).facts) == {"name": "Bob"}
    assert texts(await store.load(theirs, "alice:x")) == ["a3"]  # another bot's data
    assert texts(await store.load(namesake, "alice:x")) == ["a4"]  # another channel's user
    assert await store.forget_user(alice(user="alice:x")) == 0


async def test_forget_user_reaches_replies_kept_for_redelivery(backend: Backend) -> None:
    store = await backend.open(window=2)
    await store.begin(KEY, "m1", "alice", "t1")
    await store.finish(KEY, "m1", "alice", "t1", turns("hi", user="alice"),
                       StoredReply("final", "hello alice"))
    await store.append(KEY, turns("b1", "b2", user="bob"))  # alice's turn left the window
    assert await store.forget_user(alice()) == 1
    assert (await store.begin(KEY, "m1", "alice", "t2")).replay is None


async def test_forget_user_spares_conversations_their_turns_have_left(backend: Backend) -> None:
    store = await backend.open(window=2)
    await store.append(KEY, turns("a", user="alice"))
    await store.append(KEY, turns("b1", "b2", user="bob"))  # alice's turn is trimmed away
    assert await store.forget_user(alice()) == 0
    assert texts(await store.load(KEY, "bob")) == ["b1", "b2"]


async def test_forget_user_finds_a_conversation_kept_alive_by_others(backend: Backend) -> None:
    store = await backend.open(ttl=1)
    await store.append(KEY, turns("a", user="alice"))
    for _ in range(3):  # longer than the TTL, with only bob reading the conversation
        await backend.advance(0.5)
        assert texts(await store.load(KEY, "bob")) == ["a"]
    assert await store.forget_user(alice()) == 1
    assert texts(await store.load(KEY, "bob")) == []


async def test_backends_are_found_by_name() -> None:
    memory = {"backend": "redis", "url": "redis://127.0.0.1:1/0"}
    settings = parse_settings({"bot": {"name": "b"}, "memory": memory})
    backends = memory_backends()
    assert {"embedded", "redis"} <= set(backends.names())
    assert isinstance(backends.get("embedded")(settings), EmbeddedMemory)
    assert isinstance(backends.get("redis")(settings), RedisMemory)  # not started: no I/O


# --- embedded only ----------------------------------------------------------------------


async def test_embedded_sweeps_expired_conversations() -> None:
    clock = FakeClock()
    settings = parse_settings({"bot": {"name": "b"}, "memory": {"ttl": 5}})
    store = EmbeddedMemory(settings.memory, clock=clock, sweep_interval=10.0)
    for i in range(100):
        key = ConversationKey("b", "web", str(i))
        await store.append(key, turns("x"))
        await answer(store, key, "m")
    assert store.conversation_count == 100
    clock.now += 11
    await answer(store, KEY, "m")  # any call may sweep
    assert store.conversation_count == 0


# --- redis only -------------------------------------------------------------------------


class RoundTrips:
    """Counts requests written to Redis connections in this process.

    redis-py writes a command, or a whole pipeline, with one ``send_packed_command`` and
    then reads all its replies, so each call is one round trip; a script pipeline writes
    each batch of calls at once (and counts its writes). A connection's handshake
    would count too, which is why the store is used once before counting.
    """

    def __init__(self) -> None:
        self.count = 0


@pytest.fixture
def round_trips(monkeypatch: pytest.MonkeyPatch) -> Iterator[RoundTrips]:
    """A :class:`RoundTrips` observing every redis.asyncio connection."""
    counter = RoundTrips()
    original = AbstractConnection.send_packed_command

    async def counting(self: AbstractConnection, command: Any, check_health: bool = True) -> None:
        counter.count += 1
        await original(self, command, check_health)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", counting)
    # Scripts go out on a ScriptPipeline's own connection: one write per batch.
    sent = _Link.send

    def counting_send(self: _Link, batch: Any) -> None:
        before = self.owner.round_trips
        sent(self, batch)
        counter.count += self.owner.round_trips - before

    monkeypatch.setattr(_Link, "send", counting_send)
    yield counter


async def test_each_call_is_one_round_trip_whatever_the_history(
    redis_backend: Backend, round_trips: RoundTrips
) -> None:
    store = await redis_backend.open(window=100)
    for i in range(60):
        await store.append(KEY, turns(f"{i}a", f"{i}b", user=f"user{i % 7}"))
    await store.conversations(alice())  # the plain commands' pooled connection is made
    calls: dict[str, Callable[[], Any]] = {
        "load": lambda: store.load(KEY, "user1"),
        "append": lambda: store.append(KEY, turns("x", "y", user="user9")),
        "begin": lambda: store.begin(KEY, "m-new", "user1", "t"),
        "finish": lambda: store.finish(KEY, "m-new", "user1", "t", turns("q"),
                                       StoredReply("final", "a")),
        "abort": lambda: store.abort(KEY, "m-other", "t2"),
        "renew": lambda: store.renew(KEY, "m-other", "t2"),
        "set_fact": lambda: store.set_fact(alice(user="user1"), "name", "One"),
        "forget_user": lambda: store.forget_user(alice(user="user3")),
        "reset": lambda: store.reset(KEY),
    }
    for name, call in calls.items():
        before = round_trips.count
        await call()
        assert round_trips.count - before == 1, name


async def test_concurrent_calls_share_one_round_trip(
    redis_backend: Backend, round_trips: RoundTrips
) -> None:
    store = await redis_backend.open()
    keys = [ConversationKey("bot", "web", f"c{i}") for i in range(40)]
    await asyncio.gather(*(store.append(k, turns(f"hello {i}")) for i, k in enumerate(keys)))
    before = round_trips.count
    snapshots = await asyncio.gather(*(store.load(k, "alice") for k in keys))
    # 40 conversations read at once: one pipeline, and each gets its own history.
    assert round_trips.count - before == 1
    assert [texts(s) for s in snapshots] == [[f"hello {i}"] for i in range(40)]


async def test_batches_in_flight_share_one_connection(
    redis_backend: Backend, raw: Redis
) -> None:
    store = await redis_backend.open()
    await store.load(KEY, "alice")  # connected
    clients = len(await raw.client_list())
    keys = [ConversationKey("bot", "web", f"c{i}") for i in range(8)]
    loads = []
    for key in keys:  # a batch per loop turn, each sent before the last is answered
        loads.append(asyncio.ensure_future(store.load(key, "alice")))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    assert [texts(s) for s in await asyncio.gather(*loads)] == [[]] * 8
    assert len(await raw.client_list()) == clients


async def test_one_failing_call_in_a_batch_fails_alone(
    redis_backend: Backend, raw: Redis
) -> None:
    store = await redis_backend.open()
    good, bad = ConversationKey("bot", "web", "good"), ConversationKey("bot", "web", "bad")
    await store.append(good, turns("fine"))
    await raw.set(f"{redis_backend.prefix}:bot:conv:web:bad", "not a list")  # WRONGTYPE
    results = await asyncio.gather(store.load(good, "alice"), store.load(bad, "alice"),
                                   return_exceptions=True)
    assert texts(results[0]) == ["fine"]
    assert isinstance(results[1], MemoryUnavailable) and "load failed" in str(results[1])


async def test_scripts_flushed_from_redis_are_loaded_again(
    redis_backend: Backend, raw: Redis
) -> None:
    store = await redis_backend.open()
    await store.append(KEY, turns("a"))
    await raw.script_flush()
    # Every call of the batch is answered NOSCRIPT, runs again alone, and succeeds.
    results = await asyncio.gather(store.load(KEY, "alice"),
                                   store.begin(KEY, "m-1", "alice", "t"),
                                   store.append(KEY, turns("b")))
    assert texts(results[0]) == ["a"] and results[1].snapshot is not None
    assert texts(await store.load(KEY, "alice")) == ["a", "b"]


async def test_keys_live_under_prefix_and_bot_and_expire(
    redis_backend: Backend, raw: Redis
) -> None:
    store = await redis_backend.open(ttl=100, dedupe_window=50, lease=5)
    key = ConversationKey("bot", "dis:cord", "c:1")
    await store.begin(key, "m1", "u:1", "t1")
    await store.finish(key, "m1", "u:1", "t1", turns("a", user="u:1"),
                       StoredReply("final", "b"))
    await store.set_fact(UserRef("bot", "dis:cord", "u:1"), "name", "U")
    keys = sorted(await raw.keys(f"{redis_backend.prefix}:*"))
    p = f"{redis_backend.prefix}:bot"
    assert keys == [
        f"{p}:conv:dis%3Acord:c%3A1",
        f"{p}:facts:dis%3Acord:u%3A1",
        f"{p}:members:dis%3Acord:c%3A1",
        f"{p}:replies:dis%3Acord:c%3A1",
        f"{p}:seen:dis%3Acord:c%3A1",
        f"{p}:seenby:dis%3Acord:c%3A1",
        f"{p}:user:dis%3Acord:u%3A1:convs",
        f"{p}:ver:dis%3Acord:c%3A1",
    ]  # the lease went with the reply
    for k in keys:
        ttl = await raw.ttl(k)
        if ":facts:" in k:
            assert ttl == -1
        elif ":seen" in k or ":replies:" in k:
            assert 0 < ttl <= 50, k
        else:
            assert 0 < ttl <= 100, k


async def answered(store: MemoryStore, message_id: str, *said: str, user: str = "alice",
                   key: ConversationKey = KEY) -> list[str]:
    """Claim ``key`` for ``message_id``, store ``said`` as its turns; the window it saw."""
    begun = await store.begin(key, message_id, user, f"t-{message_id}")
    assert begun.snapshot is not None
    await store.finish(key, message_id, user, f"t-{message_id}",
                       turns(*said, user=user), StoredReply("final", "ok"))
    return texts(begun.snapshot)


async def test_a_front_ends_window_cache_follows_every_other_writer(
    redis_backend: Backend, raw: Redis
) -> None:
    here = await redis_backend.open(window=3)
    there = await redis_backend.open(window=2)  # a front end with a smaller window
    assert await answered(here, "m1", "a", "b") == []
    assert await answered(here, "m2") == ["a", "b"]
    assert await answered(there, "m3", "c") == ["a", "b"]  # trims to 2: b, c
    assert await answered(here, "m4") == ["b", "c"]
    await there.reset(KEY)
    assert await answered(here, "m5", "d") == []
    await there.append(KEY, turns("e", "f", user="bob"))
    assert await answered(here, "m6") == ["e", "f"]  # trimmed to 2 by the other
    # An older front end pushes without keeping the version.
    conv = f"{redis_backend.prefix}:bot:conv:web:conv-1"
    await raw.rpush(conv, '{"role":"user","text":"g","user_id":"carol"}')
    assert await answered(here, "m7") == ["e", "f", "g"]
    await raw.delete(conv)  # as its TTL would
    assert await answered(here, "m8", "h") == []
    assert await answered(here, "m9") == ["h"]
    assert await there.forget_user(alice()) == 1
    assert await answered(here, "m10") == []


async def test_begin_decodes_only_the_turns_pushed_since_it_last_looked(
    redis_backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    here = await redis_backend.open(window=20)
    there = await redis_backend.open(window=20)
    for i in range(5):
        await answered(here, f"m{i}", f"q{i}", f"a{i}")
    await answered(there, "other", "x")
    decoded = 0
    original = Turn.from_dict

    def counting(data: Any) -> Turn:
        nonlocal decoded
        decoded += 1
        return original(data)

    monkeypatch.setattr(Turn, "from_dict", counting)
    assert len(await answered(here, "next", "y")) == 11
    assert decoded == 1  # only the other front end's turn
    assert len(await answered(here, "after")) == 12
    assert decoded == 1  # its own turns it knew


async def test_a_member_joining_a_fresh_conversation_gets_an_expiring_index(
    redis_backend: Backend, raw: Redis
) -> None:
    store = await redis_backend.open(ttl=100)
    await store.append(KEY, turns("a", user="alice"))
    await store.append(KEY, turns("b", user="bob"))  # the window's TTL is still fresh
    index = f"{redis_backend.prefix}:bot:user:web:bob:convs"
    assert await raw.smembers(index) == {"web:conv-1"}
    assert 0 < await raw.ttl(index) <= 100
    assert await store.forget_user(alice(user="bob")) == 1


async def test_an_append_of_thousands_of_turns_keeps_the_newest(redis_backend: Backend) -> None:
    store = await redis_backend.open(window=3)
    await store.append(KEY, turns(*(f"t{i}" for i in range(9000))))
    assert texts(await store.load(KEY, "alice")) == ["t8997", "t8998", "t8999"]


async def test_malformed_turns_are_skipped_with_a_warning(
    redis_backend: Backend, raw: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    store = await redis_backend.open()
    await store.append(KEY, turns("a"))
    conv = f"{redis_backend.prefix}:bot:conv:web:conv-1"
    await raw.rpush(conv, b"not json", b'{"role": "robot", "text": 1}', b"\xff\xfe", b"[1]")
    await store.append(KEY, turns("b"))  # the append script copes with them too
    with caplog.at_level(logging.WARNING, logger="core.memory.redis"):
        assert texts(await store.load(KEY, "alice")) == ["a", "b"]
    assert sum("malformed turn" in r.getMessage() for r in caplog.records) == 4


async def test_a_failed_append_stores_nothing(redis_backend: Backend, raw: Redis) -> None:
    store = await redis_backend.open()
    await store.append(KEY, turns("a", user="alice"))
    await raw.set(f"{redis_backend.prefix}:bot:user:web:bob:convs", "not a set")
    with pytest.raises(MemoryUnavailable, match="WRONGTYPE"):
        await store.append(KEY, turns("b1", user="alice") + turns("b2", user="bob"))
    assert texts(await store.load(KEY, "alice")) == ["a"]
    members = await raw.hkeys(f"{redis_backend.prefix}:bot:members:web:conv-1")
    assert members == ["alice"]


async def test_an_append_a_member_leaves_checks_their_index_first(
    redis_backend: Backend, raw: Redis
) -> None:
    # bob joins and alice's turn leaves the window: both index keys are checked (join's,
    # then leave's) before anything is written.
    store = await redis_backend.open(window=2)
    await store.append(KEY, turns("a", user="alice"))
    index = f"{redis_backend.prefix}:bot:user:web:alice:convs"
    await raw.delete(index)
    await raw.set(index, "not a set")
    with pytest.raises(MemoryUnavailable, match=f"WRONGTYPE {index} is a string"):
        await store.append(KEY, turns("b1", "b2", user="bob"))
    assert texts(await store.load(KEY, "bob")) == ["a"]
    members = await raw.hkeys(f"{redis_backend.prefix}:bot:members:web:conv-1")
    assert members == ["alice"]


@pytest.mark.parametrize("kind", ["seen", "seenby", "replies", "conv", "members"])
async def test_a_finish_meeting_a_key_of_the_wrong_type_stores_nothing(
    redis_backend: Backend, raw: Redis, kind: str
) -> None:
    # finish checks types by reading before it writes (and by its first write), not with
    # a TYPE per key: whichever key is wrong, nothing of the message is stored.
    store = await redis_backend.open()
    assert await answered(store, "m1", "a") == []
    begun = await store.begin(KEY, "m2", "alice", "t-m2")
    assert begun.snapshot is not None
    await raw.delete(f"{redis_backend.prefix}:bot:{kind}:web:conv-1")
    await raw.set(f"{redis_backend.prefix}:bot:{kind}:web:conv-1", "not the right type")
    with pytest.raises(MemoryUnavailable, match="WRONGTYPE"):
        await store.finish(KEY, "m2", "alice", "t-m2", turns("b"), StoredReply("final", "ok"))
    p = f"{redis_backend.prefix}:bot"
    if kind != "conv":
        assert await raw.llen(f"{p}:conv:web:conv-1") == 1  # "a" alone
    if kind != "replies":
        assert await raw.hget(f"{p}:replies:web:conv-1", "m2") == "p:t-m2"  # still pending
    assert await raw.get(f"{p}:lease:web:conv-1") == "t-m2"  # still held


async def test_killed_redis_fails_fast_then_recovers_after_restart(
    redis_backend: Backend, redis_server: RedisServer
) -> None:
    store = await redis_backend.open()
    await store.append(KEY, turns("a"))
    redis_server.kill()
    calls: list[Callable[[], Any]] = [
        lambda: store.load(KEY, "alice"),
        lambda: store.append(KEY, turns("b")),
        lambda: store.begin(KEY, "m9", "alice", "t"),
        lambda: store.set_fact(alice(), "k", "v"),
        lambda: store.reset(KEY),
        lambda: store.forget_user(alice()),
    ]
    for call in calls:
        started = time.monotonic()
        with pytest.raises(MemoryUnavailable, match="redis at unix://"):
            await call()
        assert time.monotonic() - started < TIMEOUT * 2
    redis_server.restart()  # an empty server: it keeps nothing on disk
    assert texts(await store.load(KEY, "alice")) == []
    await store.append(KEY, turns("c"))  # scripts are loaded again as needed
    assert await answer(store, KEY, "m9")
    assert await store.forget_user(alice()) == 1


async def test_unresponsive_redis_times_out_then_recovers(
    redis_backend: Backend, redis_server: RedisServer
) -> None:
    store = await redis_backend.open()
    await store.append(KEY, turns("a"))
    redis_server.pause()
    try:
        started = time.monotonic()
        with pytest.raises(MemoryUnavailable, match="load failed"):
            await store.load(KEY, "alice")
        assert time.monotonic() - started < TIMEOUT + 0.5
    finally:
        redis_server.resume()
    assert texts(await store.load(KEY, "alice")) == ["a"]


async def test_start_fails_naming_the_url(
    redis_backend: Backend, redis_server: RedisServer
) -> None:
    missing = f"unix://{redis_server.workdir}/nobody-here.sock"
    store = RedisMemory(redis_backend.settings(url=missing).memory)
    with pytest.raises(MemoryUnavailable, match=r"nobody-here\.sock"):
        await store.start()
    assert not store.started
    secret = "redis://user:hunter2@127.0.0.1:1/0"  # port 1: nothing listens
    store = RedisMemory(redis_backend.settings(url=secret).memory)
    with pytest.raises(MemoryUnavailable) as failure:
        await store.start()
    assert "127.0.0.1:1" in str(failure.value) and "hunter2" not in str(failure.value)
    store = RedisMemory(redis_backend.settings(url="http://example.invalid").memory)
    with pytest.raises(ConfigError, match=r"memory\.url"):
        await store.start()
