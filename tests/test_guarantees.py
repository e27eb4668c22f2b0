"""What the engine promises platforms and operators, checked through its public API.

Safe retries (a failed message is answered when redelivered; an answered one gets its
stored reply), back-pressure before the lane, and contained plugins. Memory runs on
both backends where it matters (Redis on the session's own redis-server).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from core.app import build_engine
from core.config import BotSettings, parse_settings
from core.engine import Engine, collect
from core.errors import GeneratorBusy
from core.generation.base import GenerationRequest, TokenDelta
from core.types import ConversationKey, IncomingMessage, ReplyKind
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]


def settings(memory: dict[str, Any] | None = None, **sections: Any) -> BotSettings:
    raw: dict[str, Any] = {
        "bot": {"name": "gbot"},
        "generation": {"backend": "echo", "timeout": 10},
        "memory": memory or {"backend": "embedded"},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return parse_settings(raw)


@pytest.fixture(params=["embedded", "redis"])
def memory(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The memory section of each backend."""
    if request.param == "embedded":
        return {"backend": "embedded"}
    return {"backend": "redis", "url": request.getfixturevalue("redis_url"),
            "key_prefix": request.getfixturevalue("memory_prefix"), "timeout": 1.0}


def message(text: str, *, message_id: str | None = None, conversation: str = "c1",
            user: str = "u1") -> IncomingMessage:
    return IncomingMessage(bot="gbot", channel="test", conversation_id=conversation,
                           user_id=user, message_id=message_id or uuid.uuid4().hex,
                           text=text)


class Gate:
    """A generator that fails on demand, or holds its answer until opened."""

    def __init__(self) -> None:
        self.fail_next: Exception | None = None
        self.opened = asyncio.Event()
        self.opened.set()
        self.started = asyncio.Event()

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        self.started.set()
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        text = request.messages[-1].content
        for word in text.split(" "):
            await self.opened.wait()
            yield TokenDelta(word + " ")
        yield TokenDelta("", "stop")


def engine_on(config: BotSettings, generator: Any) -> Engine:
    built = build_engine(config)
    built.generator = generator
    return built


async def stored(engine: Engine, conversation: str = "c1") -> list[tuple[str, str]]:
    snap = await engine.memory.load(ConversationKey("gbot", "test", conversation), "u1")
    return [(t.role, t.text) for t in snap.turns]


# --- 1. safe retries ------------------------------------------------------------------


async def test_a_failed_message_is_answered_when_retried(memory: dict[str, Any]) -> None:
    gate = Gate()
    async with engine_on(settings(memory), gate) as engine:
        gate.fail_next = GeneratorBusy("queue full")
        first = await collect(engine.handle(message("hello there", message_id="m-1")))
        assert (first.kind, first.code) == (ReplyKind.ERROR, "busy")
        retry = await collect(engine.handle(message("hello there", message_id="m-1")))
        assert (retry.kind, retry.code, retry.text) == (ReplyKind.FINAL, None, "hello there")
        again = await collect(engine.handle(message("hello there", message_id="m-1")))
        assert (again.kind, again.code, again.text) == (
            ReplyKind.FINAL, "duplicate", "hello there")
        assert await stored(engine) == [("user", "hello there"), ("assistant", "hello there")]


async def test_a_client_that_hangs_up_releases_its_message(memory: dict[str, Any]) -> None:
    gate = Gate()
    async with engine_on(settings(memory), gate) as engine:
        stream = engine.handle(message("one two three four", message_id="m-1"))
        async for event in stream:
            if event.kind is ReplyKind.DELTA:
                break
        await stream.aclose()  # gone before the reply was stored
        retry = await collect(engine.handle(message("one two three four", message_id="m-1")))
        assert (retry.kind, retry.code, retry.text) == (
            ReplyKind.FINAL, None, "one two three four")


async def test_a_redelivery_to_another_front_end_waits_for_the_answer(
    redis_url: str, memory_prefix: str
) -> None:
    memory = {"backend": "redis", "url": redis_url, "key_prefix": memory_prefix}
    slow, other = Gate(), Gate()
    slow.opened.clear()
    async with engine_on(settings(memory), slow) as a, engine_on(settings(memory), other) as b:
        original = asyncio.create_task(collect(a.handle(message("a b c", message_id="m-1"))))
        await slow.started.wait()
        redelivery = asyncio.create_task(collect(b.handle(message("a b c", message_id="m-1"))))
        await asyncio.sleep(0.3)
        assert not redelivery.done()  # it waits: the id is pending on front end a
        slow.opened.set()
        first, second = await original, await redelivery
        assert first.text == "a b c" and (second.text, second.code) == ("a b c", "duplicate")
        assert not other.started.is_set()  # b never generated
        assert len(await stored(a)) == 2


# --- 2. order across front ends --------------------------------------------------------


async def test_a_reply_longer_than_its_lease_keeps_the_conversation(
    redis_url: str, memory_prefix: str
) -> None:
    memory = {"backend": "redis", "url": redis_url, "key_prefix": memory_prefix,
              "timeout": 1.0, "lease": 0.5}
    gate = Gate()
    gate.opened.clear()
    order: list[str] = []

    async def answer(engine: Engine, text: str) -> None:
        order.append((await collect(engine.handle(message(text)))).text)

    async with engine_on(settings(memory), gate) as here, build_engine(
            settings(memory)) as there:
        first = asyncio.ensure_future(answer(here, "first"))
        await gate.started.wait()
        second = asyncio.ensure_future(answer(there, "second"))  # another front end
        await asyncio.sleep(2.0)  # four leases: renewed, the lease is still held
        assert order == []
        gate.opened.set()
        await asyncio.gather(first, second)
    assert order == ["first", "second"]


# --- 3. back-pressure before the lane -------------------------------------------------


async def test_a_flood_on_one_conversation_is_refused_at_once(memory: dict[str, Any]) -> None:
    gate = Gate()
    gate.opened.clear()
    config = settings(memory, bot={"max_queued": 5, "max_in_flight_per_user": 1000})
    async with engine_on(config, gate) as engine:
        tasks = [asyncio.create_task(collect(engine.handle(
            message(f"m{i}", user=f"u{i}")))) for i in range(300)]
        await gate.started.wait()
        await asyncio.wait(tasks, timeout=1.0)  # the held reply keeps six from finishing
        refused = [t.result() for t in tasks if t.done()]
        # One being answered and five waiting; everybody else told at once, while the
        # first reply is still held back.
        assert len(refused) == 294
        assert {(r.kind, r.code) for r in refused} == {(ReplyKind.ERROR, "slow_down")}
        assert "slow down" in refused[0].text
        gate.opened.set()
        results = await asyncio.gather(*tasks)
        admitted = [f"m{i}" for i, r in enumerate(results) if r.kind is ReplyKind.FINAL]
        assert admitted == [f"m{i}" for i in range(6)]
        # ... and answered in arrival order.
        assert [text for role, text in await stored(engine) if role == "user"] == admitted
        text = engine.metrics.render().decode()
        assert 'outcome="slow_down"} 294.0' in text


async def test_a_message_that_leaves_the_queue_passes_its_turn_on(
    memory: dict[str, Any],
) -> None:
    gate = Gate()
    gate.opened.clear()
    async with engine_on(settings(memory), gate) as engine:
        first = asyncio.create_task(collect(engine.handle(message("one"))))
        await gate.started.wait()
        gone = asyncio.create_task(collect(engine.handle(message("two"))))
        third = asyncio.create_task(collect(engine.handle(message("three"))))
        await asyncio.sleep(0.05)  # both queued behind the held reply
        gone.cancel()
        gate.opened.set()
        assert [(await t).text for t in (first, third)] == ["one", "three"]
        assert [text for role, text in await stored(engine) if role == "user"] == [
            "one", "three"]
        assert len(engine.lanes) == 0


async def test_a_flood_over_the_rate_limit_is_refused_before_the_lane(
    memory: dict[str, Any],
) -> None:
    gate = Gate()
    gate.opened.clear()
    config = settings(memory, bot={"max_queued": 100, "max_in_flight_per_user": 100},
                      moderation={"backend": "filters", "input_filters": ["flood"],
                                  "user_rate": 3, "user_window": 600,
                                  "points": {"flood": 0}})  # no warnings or mute here
    async with engine_on(config, gate) as engine:
        tasks = [asyncio.create_task(collect(engine.handle(message(f"m{i}"))))
                 for i in range(10)]
        await gate.started.wait()
        # The seven over the limit are told while the first reply is still held: they
        # never waited behind it (10 s is only a guard against waiting forever).
        refused = await asyncio.wait_for(asyncio.gather(*tasks[3:]), timeout=10)
        assert {(r.kind, r.code, r.action) for r in refused} == {
            (ReplyKind.ERROR, "slow_down", "block")}
        assert refused[0].text == config.moderation.flood_reply
        gate.opened.set()
        answered = await asyncio.gather(*tasks[:3])
        assert [r.text for r in answered] == ["m0", "m1", "m2"]
        assert [text for role, text in await stored(engine) if role == "user"] == [
            "m0", "m1", "m2"]
        text = engine.metrics.render().decode()
        assert 'outcome="slow_down"} 7.0' in text
        assert ('parley_moderation_findings_total{bot="gbot",category="flood",channel="test",'
                'direction="input"} 7.0') in text


async def test_one_user_cannot_fill_every_lane(memory: dict[str, Any]) -> None:
    gate = Gate()
    gate.opened.clear()
    config = settings(memory, bot={"max_in_flight_per_user": 4})
    async with engine_on(config, gate) as engine:
        tasks = [asyncio.create_task(collect(engine.handle(
            message(f"m{i}", conversation=f"c{i}")))) for i in range(10)]
        await asyncio.sleep(0.2)
        assert sum(t.done() for t in tasks) == 6
        gate.opened.set()
        codes = sorted(str(r.code) for r in await asyncio.gather(*tasks))
        assert codes == ["None"] * 4 + ["slow_down"] * 6


# --- 4. contained plugins -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "what"),
    [("/boom now", "command /boom"), ("please hook-crash", "pre-hook"),
     ("a context-crash here", "context provider"), ("hook-hang", "pre-hook")],
)
async def test_a_failing_plugin_gets_an_apology_and_its_name_logged(
    memory: dict[str, Any], text: str, what: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = settings(memory, plugins={"modules": ["tests.support.broken_plugin"],
                                       "timeout": 0.3})
    async with build_engine(config) as engine:
        with caplog.at_level(logging.WARNING):
            events = [event async for event in engine.handle(message(text, message_id="m-1"))]
        last = events[-1]
        assert (last.kind, last.code) == (ReplyKind.ERROR, "plugin_failed")
        assert last.text.startswith("Sorry")
        assert f"plugin broken_plugin: {what} failed" in caplog.text
        assert text not in caplog.text  # ids and names in logs, not what users wrote
        failures = engine.metrics.plugin_failures.labels("gbot", "broken_plugin")
        assert failures._value.get() == 1
        # The conversation keeps being served, and the failed message can be retried.
        assert (await collect(engine.handle(message("all good")))).text == "all good"
        assert (await collect(engine.handle(message(text, message_id="m-1")))).code == (
            "plugin_failed")



def test_a_crashed_adapter_stops_parley_run(tmp_path: Path) -> None:
    """The terminal channel's output goes away mid-run: ``parley run`` exits with an
    error instead of serving on without the adapter (it used to hang forever)."""
    bot = tmp_path / "bot.toml"
    bot.write_text('[bot]\nname = "crashbot"\n[generation]\nbackend = "echo"\n'
                   "[adapters.console]\nexit_on_eof = false\ninteractive = false\n",
                   encoding="utf-8")
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody reads the replies: the first write fails
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "core.cli", "run", str(bot)], cwd=REPO,
            stdin=subprocess.PIPE, stdout=write_end, stderr=subprocess.PIPE,
        )
    finally:
        os.close(write_end)
    assert proc.stdin is not None and proc.stderr is not None
    proc.stdin.write(b"hello\n")
    proc.stdin.flush()  # stdin stays open: only the crash can end the run
    try:
        code = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail("parley run kept running after its only adapter crashed")
    finally:
        proc.stdin.close()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    # (The exit status is 1, or an abort when the stdin reader thread, still blocked in
    # a read, holds stdin's lock at interpreter shutdown: either way the run ended.)
    assert code != 0, err
    assert "parley: adapter ConsoleAdapter failed: BrokenPipeError" in err


# --- 9. Redis comes back, the bot comes back ------------------------------------------


@contextmanager
def tcp_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server on a free loopback TCP port (over TCP a restart leaves the
    pooled connections stale, where a unix socket's are seen closed at once)."""
    found = shutil.which("redis-server")
    assert found is not None, "the tests need redis-server"
    executable: str = found
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    class TcpRedis(RedisServer):
        @property
        def url(self) -> str:
            return f"redis://127.0.0.1:{port}/0"

        def start(self) -> None:
            if self.running:
                return
            self._process = subprocess.Popen(
                [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(tmp_path)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                with contextlib.suppress(OSError), socket.create_connection(
                        ("127.0.0.1", port), 0.2) as probe:
                    probe.sendall(b"PING\r\n")
                    if probe.recv(16).startswith(b"+PONG"):
                        return
                time.sleep(0.02)
            raise RuntimeError("redis-server on TCP did not start")

    server = TcpRedis(executable, tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_after_a_redis_restart_the_next_messages_are_answered(tmp_path: Path) -> None:
    """Waves of 20 concurrent messages while redis-server is SIGKILLed and restarted
    (empty): once it answers again, no message fails. Stale pooled connections used to
    fail a message each after the restart."""
    with tcp_redis(tmp_path) as server:
        config = settings({"backend": "redis", "url": server.url, "timeout": 1.0})
        async with build_engine(config) as engine:

            async def one(n: int, i: int) -> str | None:
                await asyncio.sleep(i * 0.003)  # spread over loop turns: many connections
                reply = await collect(engine.handle(
                    message(f"wave {n} message {i}", conversation=f"c{i}", user=f"u{i}")))
                return reply.code if reply.kind is not ReplyKind.FINAL else None

            async def wave(n: int) -> list[str | None]:
                return list(await asyncio.gather(*(one(n, i) for i in range(20))))

            for n in range(5):
                assert await wave(n) == [None] * 20
            server.kill()
            assert set(await wave(5)) == {"memory_unavailable"}
            server.restart()
            after = [await wave(n) for n in range(6, 16)]
            failures = [sum(code is not None for code in codes) for codes in after]
            assert failures == [0] * 10, after
