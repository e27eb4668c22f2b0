"""``parley forget``: after it, nothing about the user is left in Redis (scanned)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest
from redis.asyncio import Redis

from core.app import build_engine
from core.config import load_settings
from core.engine import collect
from core.memory.base import UserRef
from core.types import IncomingMessage, ReplyKind
from tests.support.redis_dump import dump_keys

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[1]
SECRET = "my-secret-plan-4471"


async def everything(client: Redis, prefix: str) -> dict[str, str]:
    """Every key under ``prefix`` with its whole value as text, whatever its type."""
    return await dump_keys(client, f"{prefix}:*")


async def test_forget_leaves_nothing_about_the_user_in_redis(
    tmp_path: Path, redis_url: str, memory_prefix: str
) -> None:
    config = tmp_path / "bot.toml"
    config.write_text(
        '[bot]\nname = "fbot"\n[generation]\nbackend = "echo"\n'
        f'[memory]\nbackend = "redis"\nurl = "{redis_url}"\nkey_prefix = "{memory_prefix}"\n'
        '[moderation]\nbackend = "filters"\ninput_filters = ["terms", "flood"]\n'
        'output_filters = []\nbuiltin_terms = false\nblocklist = ["zorkmid"]\n',
        encoding="utf-8",
    )
    settings = load_settings(config)

    def says(user: str, conversation: str, text: str) -> IncomingMessage:
        return IncomingMessage(bot="fbot", channel="web", conversation_id=conversation,
                               user_id=user, message_id=f"{user}-{text[:12]}", text=text)

    async with build_engine(settings) as engine:
        for msg in (says("carol-9", "room-a", f"hello, {SECRET}"),
                    says("carol-9", "room-b", f"remember {SECRET} please"),
                    says("bob-2", "room-b", "hi all"),
                    says("carol-9", "room-a", f"zorkmid {SECRET}"),  # blocked: audited
                    says("bob-2", "room-c", "bob alone")):
            assert (await collect(engine.handle(msg))).kind in (ReplyKind.FINAL,
                                                                  ReplyKind.NOTICE)
        await engine.memory.set_fact(UserRef("fbot", "web", "carol-9"), "plan", SECRET)
        # Another channel's user with the same id is someone else, and stays.
        telegram = IncomingMessage(bot="fbot", channel="telegram", conversation_id="dm",
                                   user_id="carol-9", message_id="t1", text="other carol")
        assert (await collect(engine.handle(telegram))).kind is ReplyKind.FINAL

    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        before = await everything(client, memory_prefix)
        assert any(SECRET in v for v in before.values())
        assert any(":mod:audit" in k and "carol-9" in v for k, v in before.items())

        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "core.cli", "forget", str(config), "--channel", "web",
            "--user", "carol-9", cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        assert b"forgot web user 'carol-9'" in out

        after = await everything(client, memory_prefix)
    finally:
        await client.aclose()
    leftovers = {k: v for k, v in after.items() if SECRET in k + v or (
        "carol-9" in k + v and "telegram" not in k and "other carol" not in v)}
    assert leftovers == {}
    # Bob's own conversation and the Telegram namesake are untouched.
    assert any("room-c" in k and "bob alone" in v for k, v in after.items())
    assert any("telegram" in k and "other carol" in v for k, v in after.items())
