"""The ``redis`` generation backend and ``parley worker``, on the session's redis-server.

Front end (:class:`RedisGenerator`) and workers (:class:`Worker` in this process, or the
real ``parley worker`` CLI in subprocesses) meet on a private redis-server; each test
has a queue of its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from core.app import build_engine
from core.config import BotSettings, parse_settings
from core.engine import collect
from core.errors import GenerationError, GeneratorBusy
from core.generation.base import ChatMessage, GenerationRequest, SamplingParams, TokenDelta
from core.generation.fleet.jobs import GROUP, QueueKeys, decode_reply, encode_job
from core.generation.fleet.remote import RedisGenerator
from core.generation.fleet.worker import Worker
from core.lifecycle import ServiceBase
from core.streams import closing
from core.types import IncomingMessage, ReplyKind
from tests.support.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent


def make_settings(redis_url: str, queue: str, **sections: dict[str, Any]) -> BotSettings:
    raw: dict[str, Any] = {
        "bot": {"name": "remote"},
        "generation": {"backend": "redis", "url": redis_url, "queue": queue, "timeout": 10.0},
        "worker": {"url": redis_url, "backend": "echo", "name": "w-test",
                   "claim_idle": 1.0, "heartbeat": 0.3},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return parse_settings(raw)


def ask(text: str, max_new_tokens: int = 128, **kwargs: Any) -> GenerationRequest:
    return GenerationRequest(
        messages=(ChatMessage("user", text),),
        sampling=SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0),
        **kwargs,
    )


async def drain(stream: AsyncIterator[TokenDelta]) -> list[TokenDelta]:
    async with closing(stream) as deltas:
        return [d async for d in deltas]


class SlowEcho(ServiceBase):
    """Echoes the user's words, one per ``delay`` seconds; fails on the word ``boom``."""

    def __init__(self, delay: float = 0.02) -> None:
        self.delay = delay
        self.words_made = 0
        self.calls = 0
        self.closed_early = 0

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        self.calls += 1
        words = request.messages[-1].content.split()
        if "boom" in words:
            raise GenerationError("the model fell over")
        done = False
        try:
            for i, word in enumerate(words):
                await asyncio.sleep(self.delay)
                self.words_made += 1
                last = i == len(words) - 1
                yield TokenDelta((" " if i else "") + word, "stop" if last else None)
            done = True
        finally:
            if not done:
                self.closed_early += 1


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Redis]:
    redis = Redis.from_url(redis_url)
    try:
        yield redis
    finally:
        await redis.aclose()


@pytest.fixture
def queue(memory_prefix: str) -> str:
    return f"{memory_prefix}:gen"


async def test_round_trip_streams_and_coalesces(redis_url: str, queue: str,
                                                client: Redis) -> None:
    settings = make_settings(redis_url, queue, worker={"http_port": 0})
    slow = SlowEcho(delay=0.03)
    async with Worker(settings) as worker, RedisGenerator(settings.generation) as front:
        # The echo backend makes 200 words at once: a handful of entries carry them all.
        words = " ".join(f"w{i}" for i in range(200))
        request = ask(words, max_new_tokens=500)
        deltas = await drain(front.stream(request))
        assert "".join(d.text for d in deltas) == words
        assert deltas[-1].finish_reason == "stop"
        entries = await client.xlen(QueueKeys(queue).reply(request.request_id))
        assert entries <= 5, entries
        assert await client.ttl(QueueKeys(queue).reply(request.request_id)) <= 30

        assert worker.http_address is not None
        host, port = worker.http_address
        async with aiohttp.ClientSession() as http, \
                http.get(f"http://{host}:{port}/metrics") as resp:
            body = await resp.text()
        assert 'parley_worker_jobs_total{outcome="done"} 1.0' in body

    async with Worker(settings, inner=slow), RedisGenerator(settings.generation) as front:
        # Words made every 30 ms arrive as they are made, in several deltas.
        deltas = await drain(front.stream(ask("one two three four five six")))
        assert "".join(d.text for d in deltas) == "one two three four five six"
        assert len(deltas) >= 3
        assert not any(d.restart for d in deltas)
    assert await client.xlen(QueueKeys(queue).jobs) == 0  # acked jobs are deleted


async def test_tiny_model_writes_fewer_entries_than_tokens(
    redis_url: str, queue: str, client: Redis, tiny_model_dir: Path
) -> None:
    settings = make_settings(redis_url, queue,
                             generation={"model": str(tiny_model_dir), "dtype": "float32"},
                             worker={"backend": "local"})
    async with Worker(settings) as worker, RedisGenerator(settings.generation) as front:
        request = ask("hello who are you", max_new_tokens=60)
        deltas = await drain(front.stream(request))
        tokens = worker.inner.tokens_generated  # type: ignore[attr-defined]
        entries = await client.xlen(QueueKeys(queue).reply(request.request_id))
    assert deltas[-1].finish_reason in ("stop", "length")
    assert tokens >= 20
    assert entries < tokens, (entries, tokens)


async def test_engine_answers_over_the_redis_backend(redis_url: str, queue: str) -> None:
    settings = make_settings(redis_url, queue, memory={"backend": "embedded"})
    async with Worker(settings), build_engine(settings) as engine:
        message = IncomingMessage(bot="remote", channel="test", conversation_id="c1",
                                  user_id="u1", message_id="m1", text="hello over redis")
        last = await collect(engine.handle(message))
    assert last.kind is ReplyKind.FINAL
    assert last.text == "hello over redis"


async def test_closing_the_stream_stops_the_worker(redis_url: str, queue: str,
                                                   client: Redis) -> None:
    settings = make_settings(redis_url, queue)
    slow = SlowEcho(delay=0.02)
    words = " ".join(f"w{i}" for i in range(200))  # 4 s if nobody stops it
    async with Worker(settings, inner=slow) as worker, \
            RedisGenerator(settings.generation) as front:
        async with closing(front.stream(ask(words, max_new_tokens=500))) as stream:
            first = await anext(aiter(stream))
        assert first.text
        await asyncio.sleep(0.3)  # a flush (15 ms) and a worker reaction, with room
        assert slow.closed_early == 1
        made = slow.words_made
        await asyncio.sleep(0.2)
        assert slow.words_made == made < 40
        assert worker.metrics.jobs.labels("cancelled")._value.get() == 1
        assert await client.xlen(QueueKeys(queue).jobs) == 0


async def test_no_worker_is_busy_and_the_job_never_runs_later(
    redis_url: str, queue: str, client: Redis
) -> None:
    settings = make_settings(redis_url, queue, generation={"timeout": 0.5})
    slow = SlowEcho(delay=0.0)
    async with RedisGenerator(settings.generation) as front:
        request = ask("nobody hears this")
        started = time.monotonic()
        with pytest.raises(GeneratorBusy):
            await drain(front.stream(request))
        assert time.monotonic() - started < 1.5
        async with Worker(settings, inner=slow):
            deltas = await drain(front.stream(ask("somebody hears this")))
            assert "".join(d.text for d in deltas) == "somebody hears this"
    assert slow.calls == 1
    assert not await client.exists(QueueKeys(queue).reply(request.request_id))


async def test_malformed_jobs_are_dead_lettered_and_the_worker_goes_on(
    redis_url: str, queue: str, client: Redis
) -> None:
    settings = make_settings(redis_url, queue)
    keys = QueueKeys(queue)
    good = json.loads(encode_job(ask("x", request_id="bad-1"), time.time() + 60))
    good["messages"] = "not a list"
    junk: list[dict[Any, Any]] = [
        {"job": "not json"},
        {"other": "field"},
        {"job": b"\xff\xfe\x00"},
        {"job": json.dumps([1, 2])},
        {"job": json.dumps(good)},
    ]
    async with Worker(settings) as worker, RedisGenerator(settings.generation) as front:
        for fields in junk:
            await client.xadd(keys.jobs, fields)
        deltas = await drain(front.stream(ask("still serving")))
        assert "".join(d.text for d in deltas) == "still serving"
        assert worker.metrics.dead_letters.labels("malformed")._value.get() == len(junk)
    dead = await client.xrange(keys.dead)
    assert len(dead) == len(junk)
    reasons = [fields[b"reason"].decode() for _, fields in dead]
    assert all(reason.startswith("malformed:") for reason in reasons), reasons
    # The one that named its request told its front end.
    replies = await client.xrange(keys.reply("bad-1"))
    assert decode_reply(replies[-1][1]).error is not None
    assert await client.xlen(keys.jobs) == 0


async def test_a_job_failing_every_attempt_is_dead_lettered(
    redis_url: str, queue: str, client: Redis
) -> None:
    settings = make_settings(redis_url, queue,
                             worker={"max_attempts": 2, "claim_idle": 0.2, "heartbeat": 0.05})
    slow = SlowEcho()
    async with Worker(settings, inner=slow), RedisGenerator(settings.generation) as front:
        started = time.monotonic()
        with pytest.raises(GenerationError, match="attempt 2 failed"):
            await drain(front.stream(ask("this will boom")))
        assert time.monotonic() - started < 3.0
        assert slow.calls == 2
        deltas = await drain(front.stream(ask("but this is fine")))
        assert "".join(d.text for d in deltas) == "but this is fine"
    dead = await client.xrange(QueueKeys(queue).dead)
    assert len(dead) == 1
    assert dead[0][1][b"attempts"] == b"2"


async def test_a_job_whose_worker_died_too_often_is_dead_lettered(
    redis_url: str, queue: str, client: Redis
) -> None:
    settings = make_settings(redis_url, queue,
                             worker={"max_attempts": 1, "claim_idle": 0.2, "heartbeat": 0.05})
    keys = QueueKeys(queue)
    await client.xgroup_create(keys.jobs, GROUP, id="0", mkstream=True)
    async with RedisGenerator(settings.generation) as front:
        stream = front.stream(ask("a ghost takes this"))
        waiting = asyncio.ensure_future(drain(stream))
        await asyncio.sleep(0.1)
        assert await client.xlen(keys.jobs) == 1
        # A worker takes the job and dies before writing anything.
        await client.xreadgroup(GROUP, "ghost", {keys.jobs: ">"}, count=1)
        slow = SlowEcho()
        async with Worker(settings, inner=slow):
            with pytest.raises(GenerationError, match="gave up after 1 attempts"):
                await asyncio.wait_for(waiting, 5.0)
    assert slow.calls == 0
    assert await client.xlen(keys.dead) == 1


async def test_redis_dying_while_waiting_is_a_quick_generation_error(
    redis_server: RedisServer, redis_url: str, queue: str
) -> None:
    settings = make_settings(redis_url, queue, generation={"timeout": 30.0})
    try:
        async with RedisGenerator(settings.generation) as front:
            waiting = asyncio.ensure_future(drain(front.stream(ask("hello?"))))
            await asyncio.sleep(0.3)
            started = time.monotonic()
            redis_server.kill()
            with pytest.raises(GenerationError) as caught:
                await asyncio.wait_for(waiting, 5.0)
            assert not isinstance(caught.value, GeneratorBusy)
            assert time.monotonic() - started < 2.0
    finally:
        redis_server.start()


# -- the fault test: two real `parley worker` processes, one SIGKILLed mid-job ----------

PROMPTS = [
    "Hello, who are you?",
    "Where is my order?",
    "Tell me about refunds.",
    "What are your opening hours?",
]


def _start_worker(config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "core.cli", "worker", str(config)],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
        )


# Replies long enough that one is still half-way when the test looks for a victim, even
# when the tiny model decodes fast (with 48 tokens every job could end between two looks).
_FAULT_TOKENS = 160


def _worker_file(tmp: Path, name: str, redis_url: str, queue: str, model: Path) -> Path:
    path = tmp / f"{name}.toml"
    path.write_text(
        f'[bot]\nname = "fault"\n\n'
        f'[generation]\nmodel = "{model}"\ndtype = "float32"\nqueue = "{queue}"\n'
        f"temperature = 0.0\nmax_new_tokens = {_FAULT_TOKENS}\n\n"
        f'[worker]\nurl = "{redis_url}"\nname = "{name}"\nbackend = "local"\n'
        f"concurrency = 10\nclaim_idle = 1.0\nheartbeat = 0.3\nmax_attempts = 3\n",
        encoding="utf-8",
    )
    return path


async def _half_way_replies(client: Redis, keys: QueueKeys, worker: str) -> tuple[int, int]:
    """How many jobs ``worker`` holds, and how many of their replies have text but no end."""
    pending = await client.xpending_range(keys.jobs, GROUP, "-", "+", 100, consumername=worker)
    half_way = 0
    for entry in pending:
        [(_, fields)] = await client.xrange(keys.jobs, entry["message_id"], entry["message_id"])
        reply_key = keys.reply(json.loads(fields[b"job"])["id"])
        replies = [decode_reply(f) for _, f in await client.xrange(reply_key)]
        if any(r.text for r in replies) and not any(r.finish_reason for r in replies):
            half_way += 1
    return len(pending), half_way


async def test_a_killed_worker_s_jobs_are_answered_once_by_the_other(
    redis_url: str, queue: str, client: Redis, tiny_model_dir: Path, tmp_path: Path
) -> None:
    keys = QueueKeys(queue)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs: dict[str, Path] = {}
    passed = False
    victim, survivor = "w1", "w2"
    try:
        for name in ("w1", "w2"):
            config = _worker_file(tmp_path, name, redis_url, queue, tiny_model_dir)
            logs[name] = tmp_path / f"{name}.log"
            procs[name] = _start_worker(config, logs[name])
        # What a lone run says, in this process, while the workers load.
        settings = make_settings(redis_url, queue, generation={
            "model": str(tiny_model_dir), "dtype": "float32", "max_new_tokens": _FAULT_TOKENS,
            "timeout": 60.0})
        from core.generation.fleet.settings import inner_settings
        from core.generation.local.generator import LocalGenerator

        expected: dict[str, str] = {}
        async with LocalGenerator(inner_settings(settings)) as lone:  # as a worker runs it
            for prompt in PROMPTS:
                deltas = await drain(lone.stream(ask(prompt, max_new_tokens=_FAULT_TOKENS)))
                expected[prompt] = "".join(d.text for d in deltas)
        assert all(expected.values())

        deadline = time.monotonic() + 60
        while True:
            for name, proc in procs.items():
                assert proc.poll() is None, logs[name].read_text()
            try:
                consumers = {c["name"] for c in await client.xinfo_consumers(keys.jobs, GROUP)}
            except Exception:
                consumers = set()
            if {b"w1", b"w2"} <= consumers:
                break
            assert time.monotonic() < deadline, "workers did not start"
            await asyncio.sleep(0.1)

        # A fresh budget once both workers serve: loading (and their start-up self-check)
        # may take most of the first one on a loaded machine.
        deadline = time.monotonic() + 60
        results: dict[str, dict[str, Any]] = {}
        async with RedisGenerator(settings.generation) as front:

            async def consume(i: int) -> None:
                prompt = PROMPTS[i % len(PROMPTS)]
                request = ask(prompt, max_new_tokens=_FAULT_TOKENS, request_id=f"job-{i}")
                record: dict[str, Any] = {"prompt": prompt, "text": "", "restarts": 0,
                                          "finals": 0}
                results[request.request_id] = record
                async with closing(front.stream(request)) as stream:
                    async for delta in stream:
                        if delta.restart:
                            record["restarts"] += 1
                            record["text"] = ""
                        record["text"] += delta.text
                        if delta.finish_reason is not None:
                            record["finals"] += 1

            # Kill w1 while one of its replies is half-way. To catch that moment whatever
            # the machine's load, w1 is frozen (SIGSTOP) as soon as it holds a job and then
            # let run a few milliseconds at a time until a reply it writes is half-way.
            # w2 is frozen until then, so that it cannot take (and finish) every job first.
            procs[survivor].send_signal(signal.SIGSTOP)
            tasks = [asyncio.ensure_future(consume(i)) for i in range(20)]
            frozen = False
            try:
                while True:
                    held, half_way = await _half_way_replies(client, keys, victim)
                    if half_way:
                        break
                    assert time.monotonic() < deadline, ("no half-way reply", results)
                    assert not all(t.done() for t in tasks), ("every job ended first", results)
                    if frozen:
                        procs[victim].send_signal(signal.SIGCONT)
                        await asyncio.sleep(0.005)
                    elif not held:
                        await asyncio.sleep(0.001)
                        continue
                    procs[victim].send_signal(signal.SIGSTOP)
                    frozen = True
            finally:
                procs[victim].send_signal(signal.SIGKILL)
                procs[victim].wait()
                procs[survivor].send_signal(signal.SIGCONT)
            pending = await client.xpending_range(keys.jobs, GROUP, "-", "+", 100,
                                                  consumername=victim)
            orphans = set()
            for p in pending:
                [(_, fields)] = await client.xrange(keys.jobs, p["message_id"],
                                                    p["message_id"])
                orphans.add(json.loads(fields[b"job"])["id"])
            assert orphans, "the killed worker held no jobs"

            done, _ = await asyncio.wait(tasks, timeout=max(5.0, deadline - time.monotonic()))
            assert len(done) == 20, "not every job was answered"
            for task in done:
                task.result()

        for rid, record in results.items():
            assert record["finals"] == 1, (rid, record)
            assert record["text"] == expected[record["prompt"]], (rid, record)
            replies = [decode_reply(fields) for _, fields in await client.xrange(keys.reply(rid))]
            assert max(r.attempt for r in replies) == (2 if rid in orphans else 1), (rid, replies)
            # What the dead worker's attempt had written was dropped; nothing else was.
            dropped = any(r.attempt == 1 and r.text for r in replies) and rid in orphans
            assert bool(record["restarts"]) == dropped, (rid, record, replies)
        passed = True
    finally:
        if not passed:  # pytest shows this with the failure
            for name, path in logs.items():
                print(f"--- worker {name} ---\n{path.read_text()[-4000:]}")
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)  # a frozen worker would not see SIGTERM
                proc.send_signal(signal.SIGTERM)
        for name, proc in procs.items():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                pytest.fail(f"worker {name} did not stop on SIGTERM:\n"
                            + logs[name].read_text()[-3000:])
    assert procs["w1"].returncode == -signal.SIGKILL
    assert procs[survivor].returncode == 0, logs[survivor].read_text()[-3000:]

