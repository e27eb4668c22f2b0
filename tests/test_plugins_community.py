"""The community bot's plugins through the chat harness: community, summary, and /forget
leaving nothing about the user in Redis (scanned), linked accounts included."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from redis.asyncio import Redis

from core.generation.base import GenerationRequest
from core.testing import ChatHarness, ScriptedGenerator
from tests.support.redis_dump import dump_keys, enforcement

REPO = Path(__file__).resolve().parents[1]
ADMINS = {"discord": ["mod-1"], "telegram": ["mod-1"]}


def community(memory_url: str | None = None, key_prefix: str | None = None,
              generator: ScriptedGenerator | None = None, window: int = 20) -> ChatHarness:
    """config/community.toml itself, on the harness (its admins swapped for test ids)."""
    return ChatHarness.from_file(
        REPO / "config" / "community.toml", env={"REDIS_URL": "redis://127.0.0.1:1/0",
                                                 "DISCORD_TOKEN": "x", "TELEGRAM_TOKEN": "1:a"},
        memory_url=memory_url, key_prefix=key_prefix, generator=generator, channel="discord",
        channels=["telegram"],
        plugins={"modules": ["plugins.community", "plugins.instructions", "plugins.summary"],
                 "admins": ADMINS, "summary": {"max_new_tokens": 32}},
        memory={"backend": "redis" if memory_url else "embedded", "window": window,
                **({"url": memory_url} if memory_url else {}),
                **({"key_prefix": key_prefix} if key_prefix else {})},
        moderation={"backend": "filters", "user_rate": 1000, "conversation_rate": 1000})


async def test_roll_rolls_within_bounds_and_explains_bad_dice() -> None:
    async with community() as bot:
        for _ in range(20):
            reply = await bot.send("/roll 2d6+1")
            match = re.fullmatch(r"🎲 2d6\+1: (\d) \+ (\d) \+ 1 = (\d+)", reply.text)
            assert match, reply.text
            a, b, total = map(int, match.groups())
            assert 1 <= a <= 6 and 1 <= b <= 6 and total == a + b + 1
        assert re.fullmatch(r"🎲 d20: \d+", (await bot.send("/roll d20")).text)
        assert (await bot.send("/roll 2x6")).text.startswith("usage: /roll NdM")
        assert "Between 1 and 100 dice" in (await bot.send("/roll 500d6")).text


async def test_moderator_commands_act_on_the_state_the_filters_enforce() -> None:
    async with community() as bot:
        refused = await bot.send("/mute troll 5", user="ann")
        assert refused.code == "not_admin"
        assert "/mute" not in (await bot.send("/help", user="ann")).text
        assert "/mute USER [minutes] [reason]" in (await bot.send("/help", user="mod-1")).text
        assert (await bot.send("hello", user="troll")).kind == "final"
        assert (await bot.send("/mute troll 5 spamming", user="mod-1")).text == (
            "Muted for 5 minute(s).")
        muted = await bot.send("hello again", user="troll")
        assert (muted.kind, muted.code) == ("notice", "moderated")
        assert "muted" in muted.text
        assert (await bot.send("/unmute troll", user="mod-1")).text == "Unmuted."
        assert (await bot.send("hello once more", user="troll")).kind == "final"
        warned = await bot.send("/warn troll rude", user="mod-1")
        assert warned.text.startswith("Warned (violation score now 2.0")
        audit = (await bot.send("/audit 5", user="mod-1")).text
        assert "discord:troll warn rude" in audit
        assert "discord:troll mute spamming" in audit
        # A moderator of Discord is nobody on another channel unless listed there.
        assert (await bot.send("/audit", user="mod-1", channel="web")).code == "not_admin"


def summarising(request: GenerationRequest) -> str:
    if request.tenant.endswith(":summary"):
        return "The user is Kim, who collects old radios."
    return "noted"


async def test_long_conversations_get_a_summary_in_the_background() -> None:
    generator = ScriptedGenerator(summarising)
    async with community(generator=generator, window=4) as bot:
        await bot.send("/instructions Please be brief.", user="kim")
        for i in range(6):
            assert (await bot.send(f"fact number {i} about my radios", user="kim")).text == (
                "noted")
        for _ in range(200):
            if any(r.tenant.endswith(":summary") for r in generator.requests):
                break
            await asyncio.sleep(0.01)
        summary_request = next(r for r in generator.requests if r.tenant.endswith(":summary"))
        assert "fact number 0" in summary_request.messages[1].content
        await asyncio.sleep(0.05)
        await bot.send("what do you know about me?", user="kim")
        system = generator.requests[-1].messages[0].content
        assert "Summary of the earlier conversation: The user is Kim" in system


async def test_a_conversation_never_waits_for_its_summary() -> None:
    release = asyncio.Event()
    calls: list[str] = []

    class SlowSummaries(ScriptedGenerator):
        async def stream(self, request: GenerationRequest):  # type: ignore[override]
            calls.append(request.tenant)
            if request.tenant.endswith(":summary"):
                await release.wait()
            async for delta in super().stream(request):
                yield delta

    generator = SlowSummaries(summarising)
    async with community(generator=generator, window=4) as bot:
        for i in range(12):
            reply = await asyncio.wait_for(bot.send(f"message {i}", user="lee"), 5)
            assert reply.text == "noted"
        assert calls.count("community:summary") == 1  # one at a time, still running
        release.set()


async def scan(client: Redis, prefix: str) -> dict[str, str]:
    """Every key under ``prefix`` and everything in it, as text."""
    return await dump_keys(client, f"{prefix}*")


async def test_forget_leaves_nothing_about_the_user_in_redis_linked_accounts_included(
    redis_url: str, memory_prefix: str,
) -> None:
    generator = ScriptedGenerator(summarising)
    async with community(redis_url, memory_prefix, generator, window=4) as bot:
        # Alice on Discord, in a server channel and in a DM, with instructions ...
        await bot.send("/instructions I am Alice-Zebra and I like tea.", user="alice-d",
                       conversation="guild-chan")
        for i in range(5):
            await bot.send(f"Alice-Zebra says hello {i}", user="alice-d",
                           conversation="guild-chan")
        await bot.send("Alice-Zebra here privately", user="alice-d", conversation="dm-7")
        # ... linked to her Telegram account, where she also talks ...
        code = (await bot.send("/link", user="alice-d", conversation="dm-7")).text
        code = code.split("code is ")[1].split(".")[0]
        await bot.send(f"/link {code}", user="alice-t", channel="telegram", conversation="t-9")
        await bot.send("Alice-Zebra on telegram", user="alice-t", channel="telegram",
                       conversation="t-9")
        # ... warned and muted by a moderator; Bob talks too.
        await bot.send("/warn alice-d rude", user="mod-1", conversation="mod-room")
        await bot.send("/mute alice-t 1", user="mod-1", channel="telegram",
                       conversation="mod-room")
        await bot.send("Bob-Yak was here", user="bob", conversation="bob-dm")
        await asyncio.sleep(0.3)  # let the background summaries finish

        client = Redis.from_url(redis_url)
        try:
            before = await scan(client, memory_prefix)
            assert any("alice" in k + v for k, v in before.items())
            assert any("Alice-Zebra" in v for v in before.values())

            gone = await bot.send("/forget", user="alice-t", channel="telegram",
                                  conversation="t-9")
            assert gone.text.startswith("Done: I deleted everything I kept about you")

            after = await scan(client, memory_prefix)
            kept, rest = enforcement(after)
            leaks = {k: v for k, v in rest.items()
                     if "alice" in k.lower() or "alice" in v.lower() or "Zebra" in v}
            assert leaks == {}
            # Her mute and score outlive it (forgetting lifts no limit), holding no words.
            assert any(":mod:mute:telegram%3Aalice-t" in k for k in kept)
            assert not any("Zebra" in k + v for k, v in kept.items())
            assert any("Bob-Yak" in v for v in after.values())  # others keep their data
        finally:
            await client.aclose()
