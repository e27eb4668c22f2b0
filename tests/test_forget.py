"""``parley forget``: after it, nothing about the user is left in Redis (scanned)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import aiohttp
import pytest
from redis.asyncio import Redis

from core.app import build_engine
from core.config import load_settings
from core.engine import collect
from core.memory.base import UserRef
from core.types import IncomingMessage, ReplyKind
from tests.support.redis_dump import dump_keys, enforcement

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
    kept, rest = enforcement(after)
    leftovers = {k: v for k, v in rest.items() if SECRET in k + v or (
        "carol-9" in k + v and "telegram" not in k and "other carol" not in v)}
    assert leftovers == {}
    # Her flood window stays until it slides past (forgetting lifts no limit), holding
    # none of what she wrote.
    assert any(":mod:rate:u:web%3Acarol-9" in k for k in kept), kept
    assert not any(SECRET in k + v for k, v in kept.items())
    # Bob's own conversation and the Telegram namesake are untouched.
    assert any("room-c" in k and "bob alone" in v for k, v in after.items())
    assert any("telegram" in k and "other carol" in v for k, v in after.items())


async def test_forget_reaches_the_widgets_logs_and_feedback_plugin_storage_and_links(
    tmp_path: Path, redis_url: str, memory_prefix: str
) -> None:
    """A widget user with a reply log, feedback, custom instructions (plugin storage),
    and a linked Telegram account: after
    ``parley forget`` no key or value under the prefix names them or holds their words."""
    from tests.support.widget import final_of, frames_until, open_widget, serving_settings

    config = tmp_path / "bot.toml"
    config.write_text(
        '[bot]\nname = "wbot"\n[generation]\nbackend = "echo"\n'
        f'[memory]\nbackend = "redis"\nurl = "{redis_url}"\nkey_prefix = "{memory_prefix}"\n'
        '[moderation]\nbackend = "filters"\ninput_filters = ["terms", "flood"]\n'
        'output_filters = []\nbuiltin_terms = false\n'
        '[plugins]\nmodules = ["plugins.instructions"]\n'
        f'[adapters.web]\nport = 0\nsecret = "{"s" * 32}"\n',
        encoding="utf-8",
    )
    async with serving_settings(load_settings(config)) as (engine, _, url):
        async with aiohttp.ClientSession() as http:
            users = []
            for words, wish in ((f"my plan is {SECRET}", f"call me {SECRET}x"),
                                ("bob here, just browsing", "call me Bob")):
                session, ws, _ = await open_widget(http, url)
                for i, text in enumerate((words, f"/instructions {wish}")):
                    await ws.send_json({"type": "message", "id": f"m{i}", "text": text})
                    await frames_until(ws, final_of(f"m{i}"))
                await ws.send_json({"type": "feedback", "message_id": "m0",
                                    "rating": "down", "comment": f"{wish} comment"})
                await frames_until(ws, lambda f: f["type"] == "feedback_saved")
                users.append((session, ws))
            carol, ws = users[0]
            # A code from her Telegram account, where she talks too, links the two.
            telegram = IncomingMessage(bot="wbot", channel="telegram",
                                       conversation_id="tg-chat-31", user_id="tg-31",
                                       message_id="t1", text="/link")
            code = (await collect(engine.handle(telegram))).text.split()[4].rstrip(".")
            await ws.send_json({"type": "message", "id": "m9", "text": f"/link {code}"})
            assert "Linked" in next(f["text"] for f in await frames_until(
                ws, final_of("m9")) if f.get("kind") in ("final", "notice"))
            said = IncomingMessage(bot="wbot", channel="telegram",
                                   conversation_id="tg-chat-31", user_id="tg-31",
                                   message_id="t2", text=f"on telegram {SECRET}")
            assert (await collect(engine.handle(said))).kind is ReplyKind.FINAL
            for _, socket in users:
                await socket.close()

    carol_ids = [carol["conversation_id"], "tg-31", "tg-chat-31"]
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        before = await everything(client, memory_prefix)
        anon = next(v for k, v in before.items() if ":web:feedback:" in k and SECRET in v)
        carol_user = anon.split('"user_id": "')[1].split('"')[0]
        carol_ids.append(carol_user)
        # Everything the test wants gone is there to begin with.
        for needle in (":web:log:", ":web:feedback:", ":plugin:instructions:u:",
                       ":plugin:parley:links:"):
            assert any(needle in k and any(i in k + v for i in carol_ids)
                       for k, v in before.items()), needle
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "core.cli", "forget", str(config), "--channel", "web",
            "--user", carol_user, cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        assert b"adapters.web" in out and b"links" in out, out
        after = await everything(client, memory_prefix)
    finally:
        await client.aclose()
    kept, rest = enforcement(after)
    leftovers = {k: v for k, v in rest.items()
                 if SECRET in k + v or any(i in k + v for i in carol_ids)}
    assert sorted(leftovers) == [], out
    assert not any(SECRET in k + v for k, v in kept.items())
    # Bob's own widget conversation, feedback and instructions stay.
    assert any(":web:log:" in k and "bob here" in v for k, v in after.items())
    assert any(":web:feedback:" in k and "bob here" in v for k, v in after.items())
    assert any(":plugin:instructions:u:" in k and "call me Bob" in v for k, v in after.items())
