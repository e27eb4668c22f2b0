"""A live worker whose heartbeats lapse reclaims its own job: the user still gets exactly
one full answer (a real :class:`Worker` and front end on the session's redis-server)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from core.config import parse_settings
from core.errors import ConfigError, GenerationError
from core.generation.base import ChatMessage, GenerationRequest, SamplingParams, TokenDelta
from core.generation.fleet.jobs import GROUP, QueueKeys
from core.generation.fleet.remote import RedisGenerator
from core.generation.fleet.worker import Worker
from core.lifecycle import ServiceBase
from core.streams import closing

pytestmark = pytest.mark.timeout(60)

WORDS = [f"w{i}" for i in range(25)]


class SlowWords(ServiceBase):
    """Echoes the user's words, one every ``delay`` seconds; fails on ``boom``."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.calls = 0

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        words = request.messages[-1].content.split()
        if "boom" in words:
            raise GenerationError("the model fell over")
        self.calls += 1
        for i, word in enumerate(words):
            await asyncio.sleep(self.delay)
            yield TokenDelta((" " if i else "") + word, "stop" if i == len(words) - 1 else None)


def ask(text: str) -> GenerationRequest:
    return GenerationRequest((ChatMessage("user", text),),
                             SamplingParams(max_new_tokens=500, temperature=0.0))


def test_a_heartbeat_of_half_claim_idle_or_more_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"heartbeat \(0.5 s\) must be less than half"):
        parse_settings({"bot": {"name": "x"}, "worker": {"claim_idle": 1.0, "heartbeat": 0.5}})


async def test_a_worker_that_reclaims_its_own_job_answers_it_once(
    redis_url: str, memory_prefix: str
) -> None:
    queue = f"{memory_prefix}:gen"
    settings = parse_settings({
        "bot": {"name": "attempts"},
        "generation": {"backend": "redis", "url": redis_url, "queue": queue, "timeout": 30.0},
        "worker": {"url": redis_url, "name": "solo", "claim_idle": 1.0, "heartbeat": 0.3,
                   "max_attempts": 3},
    })
    keys = QueueKeys(queue)
    inner = SlowWords(delay=0.1)  # 2.5 s an attempt: longer than claim_idle
    raw = Redis.from_url(redis_url)
    try:
        async with Worker(settings, inner=inner) as worker, \
                RedisGenerator(settings.generation) as front:
            received: list[TokenDelta] = []
            started = asyncio.Event()

            async def consume() -> None:
                async with closing(front.stream(ask(" ".join(WORDS)))) as deltas:
                    async for delta in deltas:
                        received.append(delta)
                        started.set()

            async def fail() -> None:
                with pytest.raises(GenerationError):
                    async with closing(front.stream(ask("boom"))) as deltas:
                        async for _ in deltas:
                            pass

            consuming = asyncio.create_task(consume())
            await started.wait()
            [pending] = await raw.xpending_range(keys.jobs, GROUP, "-", "+", 1)
            # Its heartbeats lapsed for a while (as when Redis stalls longer than
            # claim_idle): the job looks silent though its worker is alive. A failing job
            # handed back makes the worker reclaim at once, and it takes its own job too.
            entry, failing = pending["message_id"], None
            while (await raw.xpending_range(keys.jobs, GROUP, entry, entry, 1))[0][
                    "times_delivered"] < 2:
                await raw.xclaim(keys.jobs, GROUP, "solo", 0, [entry], idle=60_000,
                                 justid=True)
                if failing is None:
                    failing = asyncio.create_task(fail())
                await asyncio.sleep(0.01)
            await asyncio.wait_for(consuming, 30)
            assert failing is not None
            await failing
            metrics = worker.metrics.render().decode()
    finally:
        await raw.aclose()
    text = ""
    for delta in received:
        text = "" if delta.restart else text
        text += delta.text
    assert text == " ".join(WORDS)  # one full answer, the abandoned attempt dropped
    assert sum(d.finish_reason is not None for d in received) == 1
    assert inner.calls >= 2  # it did reclaim its own job
    assert 'parley_worker_jobs_total{outcome="done"} 1.0' in metrics
