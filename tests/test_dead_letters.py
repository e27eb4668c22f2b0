"""Dead letters hold whole prompts: they expire, and ``parley forget`` deletes a user's."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from core.config import BotSettings, load_settings
from core.errors import GenerationError
from core.generation.base import ChatMessage, GenerationRequest, SamplingParams, TokenDelta
from core.generation.fleet.jobs import QueueKeys
from core.generation.fleet.remote import RedisGenerator
from core.generation.fleet.worker import Worker
from core.lifecycle import ServiceBase
from core.streams import closing

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]


class Broken(ServiceBase):
    """A model that fails every job."""

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        raise GenerationError("the model fell over")
        yield TokenDelta("")  # pragma: no cover - makes this an async generator


def bot_file(tmp_path: Path, redis_url: str, prefix: str, ttl: float) -> Path:
    path = tmp_path / "bot.toml"
    path.write_text(
        '[bot]\nname = "dbot"\n'
        f'[generation]\nbackend = "redis"\nurl = "{redis_url}"\nqueue = "{prefix}:gen"\n'
        f'[memory]\nbackend = "redis"\nurl = "{redis_url}"\nkey_prefix = "{prefix}"\n'
        f'[worker]\nurl = "{redis_url}"\nname = "dl"\nmax_attempts = 1\n'
        f"dead_letter_ttl = {ttl}\nclaim_idle = 1.0\nheartbeat = 0.3\n",
        encoding="utf-8")
    return path


async def fail_jobs(settings: BotSettings, users: list[str]) -> None:
    """One job per user, each dead-lettered by a worker whose model always fails."""
    async with Worker(settings, inner=Broken()), RedisGenerator(settings.generation) as front:
        for user in users:
            request = GenerationRequest((ChatMessage("user", f"secret of {user}"),),
                                        SamplingParams(max_new_tokens=8), tenant="dbot",
                                        user=user)
            with pytest.raises(GenerationError):
                async with closing(front.stream(request)) as deltas:
                    async for _ in deltas:
                        pass


async def letters(client: Redis, queue: str) -> list[dict[bytes, Any]]:
    return [fields for _, fields in await client.xrange(QueueKeys(queue).dead)]


async def test_dead_letters_expire(tmp_path: Path, redis_url: str, memory_prefix: str) -> None:
    settings = load_settings(bot_file(tmp_path, redis_url, memory_prefix, ttl=1.0))
    client = Redis.from_url(redis_url)
    try:
        await fail_jobs(settings, ["web:carol"])
        [letter] = await letters(client, settings.generation.queue)
        assert (letter[b"tenant"], letter[b"user"]) == (b"dbot", b"web:carol")
        assert 0 < await client.pttl(QueueKeys(settings.generation.queue).dead) <= 1000
        await asyncio.sleep(1.2)
        assert await letters(client, settings.generation.queue) == []
    finally:
        await client.aclose()


async def test_parley_forget_deletes_a_user_s_dead_letters(
    tmp_path: Path, redis_url: str, memory_prefix: str
) -> None:
    config = bot_file(tmp_path, redis_url, memory_prefix, ttl=3600)
    settings = load_settings(config)
    client = Redis.from_url(redis_url)
    try:
        await fail_jobs(settings, ["web:carol", "web:bob", "telegram:carol"])
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "core.cli", "forget", str(config), "--channel", "web",
            "--user", "carol", cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        assert b"dead_letters 1" in out
        left = await letters(client, settings.generation.queue)
        assert sorted(f[b"user"] for f in left) == [b"telegram:carol", b"web:bob"]
        assert not any(b"secret of web:carol" in f[b"job"] for f in left)
    finally:
        await client.aclose()
