"""The Discord channel: the real discord.py client against the fake Discord on loopback."""

from __future__ import annotations

import itertools
import re

import pytest
import regex
from discord.http import Route

from bots.discord.adapter import DiscordAdapter, DiscordUnavailable
from bots.testing.discord import MAX_CONTENT, FakeDiscord, would_ping
from core.app import build_engine
from core.errors import ConfigError
from core.plugins import CommandContext
from core.types import ConversationKey
from tests.discord_support import (
    BOT,
    SlowGenerator,
    build_world,
    contents,
    make_settings,
    running,
    section,
    with_generator,
)


async def test_dms_mentions_replies_and_prefix_are_answered_chatter_is_not() -> None:
    async with FakeDiscord() as discord:
        w = build_world(discord)
        other_bot = discord.add_user("otherbot", bot=True)
        quiet = {w.quiet: {"answer_in": "always"}}
        async with running(discord, prefix="!",
                           channels={str(k): v for k, v in quiet.items()}):
            discord.post(w.general, w.alice, "just chatting among ourselves")
            discord.post(w.general, other_bot, f"<@{discord.bot_id}> bots talk too")
            discord.post(w.dm, w.alice, "hello in private")
            discord.post(w.general, w.bob, f"<@{discord.bot_id}> hello in public")
            discord.post(w.general, w.bob, "!prefixed words")
            discord.post(w.quiet, w.alice, "this channel always gets answers")
            await discord.wait_until(lambda: len(discord.sent(w.general)) == 2
                                     and discord.sent(w.dm) and discord.sent(w.quiet))
            first = discord.sent(w.general)[0]
            discord.post(w.general, w.alice, "a reply to the bot", reply_to=first.id)
            await discord.wait_until(lambda: len(discord.sent(w.general)) == 3)
            # Whatever else was pending has had its chance to be (wrongly) answered.
            discord.post(w.dm, w.alice, "last")
            await discord.wait_until(lambda: len(discord.sent(w.dm)) == 2)
        assert contents(discord.sent(w.dm)) == ["hello in private", "last"]
        assert contents(discord.sent(w.general)) == [
            "hello in public", "prefixed words", "a reply to the bot"]
        assert contents(discord.sent(w.quiet)) == ["this channel always gets answers"]
        # In a guild the answer is a reply to the message (that pings nobody).
        assert all(m.payload.get("message_reference") for m in discord.sent(w.general))
        assert not discord.sent(w.dm)[0].payload.get("message_reference")


async def test_guild_and_thread_settings_fall_back_in_order() -> None:
    async with FakeDiscord() as discord:
        w = build_world(discord)
        settings = {"guilds": {str(w.guild): {"answer_in": "always"}},
                    "channels": {str(w.general): {"answer_in": "mention"}}}
        async with running(discord, **settings):
            discord.post(w.general, w.alice, "general: mention only, so silence")
            discord.post(w.thread, w.alice, "thread of general: also silence")
            discord.post(w.quiet, w.alice, "quiet: the guild says always")
            await discord.wait_until(lambda: bool(discord.sent(w.quiet)))
            discord.post(w.thread, w.alice, f"<@{discord.bot_id}> now the thread")
            await discord.wait_until(lambda: bool(discord.sent(w.thread)))
        assert discord.sent(w.general) == []
        assert contents(discord.sent(w.thread)) == ["now the thread"]


async def test_each_thread_is_a_conversation_of_its_own() -> None:
    async with FakeDiscord() as discord:
        w = build_world(discord)
        other_thread = discord.add_thread(w.general, "another topic")
        settings = make_settings()
        engine = build_engine(settings)
        async with running(discord, engine, settings, answer_in="always"):
            discord.post(w.general, w.alice, "in the channel")
            discord.post(w.thread, w.alice, "in the thread")
            discord.post(other_thread, w.bob, "in the other thread")
            discord.post(w.thread, w.bob, "thread again")
            await discord.wait_until(lambda: len(discord.sent(w.thread)) == 2
                                     and discord.sent(w.general) and discord.sent(other_thread))

            async def said(channel: int) -> list[str]:
                key = ConversationKey(BOT, "discord", str(channel))
                turns = (await engine.memory.load(key, "x")).turns
                return [t.text for t in turns if t.role == "user"]

            assert await said(w.general) == ["in the channel"]
            assert await said(w.thread) == ["in the thread", "thread again"]
            assert await said(other_thread) == ["in the other thread"]


async def test_slash_commands_are_synced_and_answered_by_the_engine() -> None:
    async with FakeDiscord() as discord:
        w = build_world(discord)
        settings = make_settings()
        engine = build_engine(settings)

        async def hours(ctx: CommandContext) -> str:
            return f"Open 9-17 (asked: {ctx.args!r})"

        engine.plugins.add_command("hours", hours, "opening hours")
        async with running(discord, engine, settings, answer_in="always"):
            assert discord.command_names() == ["help", "hours", "reset"]
            synced = {c["name"]: c for c in discord.commands}
            assert synced["hours"]["description"] == "opening hours"
            discord.post(w.general, w.alice, "remember me")
            await discord.wait_until(lambda: bool(discord.sent(w.general)))
            help_ = discord.run_command(w.general, w.alice, "help")
            hours_ = discord.run_command(w.dm, w.alice, "hours", {"text": "today"})
            reset = discord.run_command(w.general, w.bob, "reset")
            await discord.wait_until(lambda: all(
                discord.interaction_replies(t) and discord.interaction_replies(t)[0].content
                for t in (help_, hours_, reset)))
            key = ConversationKey(BOT, "discord", str(w.general))
            assert (await engine.memory.load(key, "x")).turns == ()
        assert "/hours - opening hours" in discord.interaction_replies(help_)[0].content
        assert contents(discord.interaction_replies(hours_)) == ["Open 9-17 (asked: 'today')"]
        assert "forgotten" in discord.interaction_replies(reset)[0].content
        callbacks = [r.body for r in discord.requests if r.path.endswith("/callback")]
        assert [c["type"] for c in callbacks] == [5, 5, 5]  # deferred: "thinking..."


async def test_streaming_grows_the_reply_by_paced_edits_of_changed_text() -> None:
    interval = 0.2
    async with FakeDiscord() as discord:
        w = build_world(discord)
        settings = make_settings()
        engine = with_generator(settings, SlowGenerator(delay=0.02))
        text = " ".join(f"word{i}" for i in range(60))
        async with running(discord, engine, settings, edit_interval=interval):
            discord.post(w.dm, w.alice, text)
            await discord.wait_until(lambda: contents(discord.sent(w.dm)) == [text])
        [message] = discord.sent(w.dm)
        times = [at for at, _, _ in message.versions]
        shown = [content for _, content, _ in message.versions]
        assert len(shown) >= 4, shown  # it grew while being written (~1.2 s at 0.2 s)
        assert all(b - a >= interval for a, b in itertools.pairwise(times)), times
        assert all(a != b for a, b in itertools.pairwise(shown))  # only changes
        assert all(text.startswith(s) for s in shown)
        # "typing..." came before the first words.
        paths = [r.path for r in discord.requests if f"/channels/{w.dm}/" in r.path]
        assert paths[0].endswith("/typing")


async def test_without_streaming_one_message_is_sent() -> None:
    async with FakeDiscord() as discord:
        w = build_world(discord)
        settings = make_settings()
        engine = with_generator(settings, SlowGenerator(delay=0.01))
        async with running(discord, engine, settings, streaming=False):
            discord.post(w.dm, w.alice, "one two three four five six seven")
            await discord.wait_until(lambda: bool(discord.sent(w.dm)))
        [message] = discord.sent(w.dm)
        assert message.content == "one two three four five six seven"
        assert message.edits == []
        assert not [r for r in discord.requests if r.method == "PATCH"]


async def test_a_reset_replaces_what_was_shown() -> None:
    async with FakeDiscord() as discord:
        w = build_world(discord)
        settings = make_settings()
        text = " ".join(f"w{i}" for i in range(30))
        engine = with_generator(settings, SlowGenerator(delay=0.03, restart_after=12))
        async with running(discord, engine, settings, edit_interval=0.05):
            discord.post(w.dm, w.alice, text)
            await discord.wait_until(lambda: contents(discord.sent(w.dm)) == [text])
        [message] = discord.sent(w.dm)
        shown = [content for _, content, _ in message.versions]
        # The first attempt was on screen, then replaced (the shown text got shorter),
        # then only the second attempt's text: never both.
        assert any(len(b) < len(a) for a, b in itertools.pairwise(shown)), shown
        assert all(text.startswith(s) or s == "…" for s in shown)
        assert message.content.count("w0 ") == 1


async def test_a_5000_character_reply_is_split_without_breaking_clusters_or_code() -> None:
    family = "\U0001F468\u200D\U0001F469\u200D\U0001F467"  # one grapheme, five code points
    code = "```python\n" + "\n".join(f"print({i})  # {family}" for i in range(90)) + "\n```"
    prose = " ".join(f"{family}word{i}" for i in range(300))
    reply = f"{prose}\n\n{code}\n\n{prose}"
    assert len(reply) > 5000
    async with FakeDiscord() as discord:
        w = build_world(discord)
        settings = make_settings()
        engine = with_generator(settings, SlowGenerator(delay=0.0, reply=reply))
        async with running(discord, engine, settings):
            discord.post(w.dm, w.alice, "tell me everything")
            await discord.wait_until(
                lambda: "".join(contents(discord.sent(w.dm))).replace("```python\n", "")
                .replace("```", "").replace("\n", "").replace(" ", "")
                == reply.replace("```python\n", "").replace("```", "")
                .replace("\n", "").replace(" ", ""))
        parts = contents(discord.sent(w.dm))
        assert len(parts) >= 3
        assert all(len(p) <= MAX_CONTENT for p in parts)
        assert not [r for r in discord.requests if r.status == 400]
        clusters = {c for c in regex.findall(r"\X", reply)}
        for part in parts:
            assert set(regex.findall(r"\X", part)) <= clusters | {"\n"}, part[:40]
            assert part.count("```") % 2 == 0  # every code block closed in its part


async def test_model_output_never_pings_anyone() -> None:
    async with FakeDiscord() as discord:
        w = build_world(discord)
        settings = make_settings()
        ping = f"@everyone @here <@{w.bob}> <@&{w.guild}> look"
        engine = with_generator(settings, SlowGenerator(delay=0.01, reply=ping))
        async with running(discord, engine, settings, answer_in="always"):
            discord.post(w.general, w.alice, "say it")
            token = discord.run_command(w.general, w.alice, "help")
            await discord.wait_until(lambda: ping in contents(discord.sent(w.general))
                                     and bool(discord.interaction_replies(token))
                                     and discord.interaction_replies(token)[0].content)
        bodies = [r.body for r in discord.requests
                  if r.method in ("POST", "PATCH") and "/messages" in r.path]
        assert any(ping == b.get("content") for b in bodies)
        for body in bodies:
            mentions = body["allowed_mentions"]
            assert mentions["parse"] == [] and not mentions.get("replied_user"), body
            assert not mentions.get("users") and not mentions.get("roles"), body
            assert not would_ping(body)
        # The fake itself would have pinged for the same text without allowed_mentions.
        assert would_ping({"content": ping})


def test_config_errors_name_the_file_and_key() -> None:
    settings = make_settings()
    cases = [
        ({}, "adapters.discord.token: required key is missing"),
        ({"token": "t", "answer_in": "sometimes"}, "adapters.discord.answer_in:"),
        ({"token": "t", "channels": {"general": {"answer_in": "always"}}},
         "adapters.discord.channels.general.[key]:"),
        ({"token": "t", "max_message_chars": 4000}, "adapters.discord.max_message_chars:"),
        ({"token": "t", "gateway_url": "http://x"}, "adapters.discord.gateway_url:"),
        ({"token": "t", "shards": 2}, "adapters.discord.shards: unknown key"),
    ]
    for table, expected in cases:
        with pytest.raises(ConfigError) as caught:
            DiscordAdapter(settings, table)
        assert f"{settings.source}: {expected}" in str(caught.value), str(caught.value)


async def test_a_refused_token_is_a_config_error_at_start() -> None:
    async with FakeDiscord() as discord:
        settings = make_settings()
        engine = build_engine(settings)
        adapter = DiscordAdapter(settings, {**section(discord), "token": "wrong"})
        async with engine:
            with pytest.raises(ConfigError, match=re.escape(
                    f"{settings.source}: adapters.discord.token: Discord refused the token")):
                await adapter.start(engine)
            await adapter.stop()
        assert discord.gateway.identified == 0


async def test_a_gateway_that_refuses_the_bot_fails_the_start_clearly() -> None:
    async with FakeDiscord() as discord:
        discord.gateway.token = "another-token"  # REST takes the token, the gateway not
        settings = make_settings()
        engine = build_engine(settings)
        adapter = DiscordAdapter(settings, section(discord))
        async with engine:
            with pytest.raises(DiscordUnavailable, match="gateway connection failed"):
                await adapter.start(engine)
            await adapter.stop()
        assert discord.gateway.identified == 0


async def test_a_plugin_sends_on_its_own_without_pinging() -> None:
    async with FakeDiscord() as discord:
        w = build_world(discord)
        settings = make_settings()
        engine = build_engine(settings)
        plugin = engine.plugins.plugin("notifier")

        async def notify(ctx: CommandContext) -> str:
            await plugin.send(ConversationKey(BOT, "discord", str(w.thread)),
                              f"@everyone {ctx.args}")
            await plugin.send(ctx.key, "and a note here")  # its own conversation too
            return "sent"

        plugin.add_command("notify", notify, "tell the thread")
        async with running(discord, engine, settings):
            discord.post(w.dm, w.alice, "/notify the release is out")
            await discord.wait_until(lambda: bool(discord.sent(w.thread))
                                     and contents(discord.sent(w.dm))[-1:] == ["sent"])
        [message] = discord.sent(w.thread)
        assert message.content == "@everyone the release is out"
        assert contents(discord.sent(w.dm)) == ["and a note here", "sent"]
        assert message.payload["allowed_mentions"]["parse"] == []
        assert not would_ping(message.payload)


async def test_long_command_answers_continue_in_follow_ups_and_the_prefix_runs_commands() -> None:
    async with FakeDiscord() as discord:
        w = build_world(discord)
        settings = make_settings()
        engine = build_engine(settings)
        long_answer = "\n".join(f"line {i}: " + "x" * 60 for i in range(70))  # ~4,800 chars

        async def report(ctx: CommandContext) -> str:
            return long_answer

        engine.plugins.add_command("report", report, "a long report")
        async with running(discord, engine, settings, prefix="!"):
            token = discord.run_command(w.general, w.alice, "report")
            discord.post(w.general, w.bob, "!help")
            await discord.wait_until(lambda: len(discord.interaction_replies(token)) == 3
                                     and len(discord.sent(w.general)) == 4)
        parts = contents(discord.interaction_replies(token))
        assert all(len(p) <= MAX_CONTENT for p in parts)
        assert "\n".join(parts) == long_answer
        [help_reply] = [m for m in discord.sent(w.general) if m.payload.get("message_reference")]
        assert "/report - a long report" in help_reply.content


async def test_the_rest_endpoint_is_put_back_and_one_process_reaches_one_api() -> None:
    before = Route.BASE
    async with FakeDiscord() as first, FakeDiscord() as second:
        build_world(first)
        async with running(first):
            assert Route.BASE == first.api_base_url
            settings = make_settings()
            engine = build_engine(settings)
            other = DiscordAdapter(settings, section(second))
            with pytest.raises(ConfigError, match="one process can reach one Discord API"):
                await other.start(engine)
            assert Route.BASE == first.api_base_url
        assert second.requests == []
    assert Route.BASE == before
