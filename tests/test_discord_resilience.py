"""The Discord channel under rate limits, gateway reconnects, redelivery and bad frames."""

from __future__ import annotations

import asyncio
import json

import pytest

from bots.discord.adapter import DiscordUnavailable
from bots.testing.discord import FakeDiscord
from core.app import build_engine
from core.config import parse_settings
from tests.discord_support import (
    SlowGenerator,
    build_world,
    contents,
    make_settings,
    running,
    with_generator,
)


async def test_a_429_storm_and_forced_reconnects_lose_and_duplicate_nothing() -> None:
    async with FakeDiscord() as discord:
        w = build_world(discord)
        channels = [w.dm, w.general, w.thread]
        expected: dict[int, list[str]] = {c: [] for c in channels}

        def post_round(label: str) -> None:
            for n in range(4):
                for channel in channels:
                    text = f"{label} message {n} to {channel}"
                    discord.post(channel, w.alice, text)
                    expected[channel].append(text)

        def delivered() -> bool:
            return all(len(discord.sent(c)) >= len(expected[c]) for c in channels)

        async with running(discord, answer_in="always", edit_interval=0.05,
                           reidentify_delay=0.1):
            # More 429s in a row than discord.py retries by itself (5).
            discord.rate_limit(30, retry_after=0.02)
            post_round("storm")
            await discord.wait_until(delivered, within=30)
            assert discord.faults_left == 0  # every injected 429 was hit

            # op 7: the bot resumes; what was posted while it was away is replayed.
            discord.gateway.reconnect()
            post_round("away")
            await discord.wait_until(delivered, within=30)

            # op 9, resumable: the bot resumes the same session.
            discord.gateway.invalidate_session(resumable=True)
            post_round("resumable")
            await discord.wait_until(delivered, within=30)

            # op 9: a new session; the bot identifies again and keeps answering.
            discord.gateway.invalidate_session()
            await asyncio.sleep(0.05)
            await discord.gateway.wait_live()
            discord.rate_limit(8, retry_after=0.02)
            post_round("after")
            await discord.wait_until(delivered, within=30)
            assert discord.gateway.resumed == 2 and discord.gateway.identified == 2
        for channel in channels:
            # Every message answered exactly once, in the order it was posted.
            assert contents(discord.sent(channel)) == expected[channel]
        assert sum(r.status == 429 for r in discord.requests) == 38


async def test_discord_rate_limit_buckets_are_honoured_before_any_429() -> None:
    limit, window = 3, 0.3
    async with FakeDiscord(bucket=(limit, window)) as discord:
        w = build_world(discord)
        channels = [w.general, w.quiet]
        async with running(discord, answer_in="always", streaming=False):
            for n in range(8):
                for channel in channels:
                    discord.post(channel, w.alice, f"burst {n}")
            await discord.wait_until(
                lambda: all(len(discord.sent(c)) == 8 for c in channels), within=30)
        for channel in channels:
            assert contents(discord.sent(channel)) == [f"burst {n}" for n in range(8)]
            posts = [r.at for r in discord.requests
                     if r.method == "POST" and r.path.endswith(f"/channels/{channel}/messages")]
            # discord.py waited for the window when the headers said none were left.
            assert len(posts) == 8
        # (A "typing..." cut short when the reply went out can leave discord.py's count of
        # that route behind; typing is cosmetic and not what this test is about.)
        assert not [r for r in discord.requests
                    if r.status == 429 and r.path.endswith("/messages")]


async def test_a_message_delivered_again_after_a_resume_is_answered_once() -> None:
    async with FakeDiscord() as discord:
        w = build_world(discord)
        settings = make_settings()
        engine = build_engine(settings)
        async with running(discord, engine, settings):
            for n in range(3):
                discord.post(w.dm, w.alice, f"message {n}")
            await discord.wait_until(lambda: len(discord.sent(w.dm)) == 3)
            discord.gateway.redeliver_on_resume(3)  # Discord replays the last 3 events again
            discord.gateway.reconnect()
            await asyncio.sleep(0.05)
            await discord.gateway.wait_live()
            discord.post(w.dm, w.alice, "message 3")
            await discord.wait_until(lambda: len(discord.sent(w.dm)) >= 4)
            await asyncio.sleep(0.3)  # time enough for a duplicate to show up
            assert discord.gateway.resumed == 1 and discord.gateway.replayed == 3
        assert contents(discord.sent(w.dm)) == [f"message {n}" for n in range(4)]
        # The adapter knew them: the engine was not even asked again.
        outcomes = {s.labels["outcome"]: s.value for m in engine.metrics.registry.collect()
                    for s in m.samples if s.name == "parley_messages_total"}
        assert outcomes == {"answered": 4.0}


async def test_malformed_gateway_events_are_ignored() -> None:
    async with FakeDiscord() as discord:
        w = build_world(discord)
        async with running(discord):
            discord.gateway.send_raw("this is not json")
            discord.gateway.send_raw("[1, 2, 3]")
            discord.gateway.send_raw(json.dumps({"op": "zero"}))
            discord.gateway.send_raw(
                json.dumps({"op": 0, "t": "MESSAGE_CREATE", "s": None, "d": "x"}))
            discord.dispatch("MESSAGE_CREATE", {"id": "not-a-snowflake", "content": 3})
            discord.dispatch("INTERACTION_CREATE", {"type": 2})
            discord.dispatch("GUILD_CREATE", {"name": "no id"})
            discord.dispatch("NO_SUCH_EVENT", {})
            discord.post(w.dm, w.alice, "still there?")
            await discord.wait_until(lambda: contents(discord.sent(w.dm)) == ["still there?"])
        assert discord.gateway.connections == 1  # nothing made the bot reconnect


async def test_a_reply_discord_refuses_is_logged_and_counted_and_the_bot_goes_on() -> None:
    async with FakeDiscord() as discord:
        w = build_world(discord)
        settings = make_settings()
        engine = build_engine(settings)
        async with running(discord, engine, settings, answer_in="always", streaming=False):
            discord.fail(2, path=f"/channels/{w.quiet}/messages", status=403)
            discord.post(w.quiet, w.alice, "the bot may not write here")
            discord.post(w.general, w.alice, "but here it may")
            discord.post(w.general, w.alice, "")  # a picture without words: not answered
            await discord.wait_until(lambda: discord.faults_left == 0
                                     and bool(discord.sent(w.general)))
            discord.post(w.quiet, w.alice, "and now it may here too")
            await discord.wait_until(lambda: bool(discord.sent(w.quiet)))
            await asyncio.sleep(0.2)  # time enough for anything else to show up
        assert contents(discord.sent(w.general)) == ["but here it may"]
        assert contents(discord.sent(w.quiet)) == ["and now it may here too"]
        errors = {s.labels["stage"]: s.value for m in engine.metrics.registry.collect()
                  for s in m.samples if s.name == "parley_errors_total"}
        assert errors == {"discord_send": 1.0}
        # The refused reply and its apology were both tried.
        refused = [r for r in discord.requests if r.status == 403]
        assert [r.body["content"] for r in refused] == [
            "the bot may not write here", "Sorry, I couldn't deliver my answer. Please try again."]


async def test_a_failed_command_sync_does_not_keep_the_bot_from_answering() -> None:
    async with FakeDiscord() as discord:
        w = build_world(discord)
        discord.fail(1, path="/commands", status=403)
        async with running(discord):
            discord.post(w.dm, w.alice, "commands or not")
            await discord.wait_until(lambda: bool(discord.sent(w.dm)))
        assert discord.commands == []
        assert contents(discord.sent(w.dm)) == ["commands or not"]


async def test_a_gateway_lost_for_good_ends_the_adapter_with_an_error() -> None:
    async with FakeDiscord() as discord:
        w = build_world(discord)
        async with running(discord, reidentify_delay=0.0) as adapter:
            discord.post(w.dm, w.alice, "before")
            await discord.wait_until(lambda: bool(discord.sent(w.dm)))
            discord.gateway.token = "revoked"  # the next IDENTIFY is refused (4004)
            discord.gateway.invalidate_session()
            with pytest.raises(DiscordUnavailable, match="gateway connection ended"):
                await asyncio.wait_for(adapter.wait(), 10)


async def test_a_flood_in_one_channel_is_refused_before_it_queues() -> None:
    async with FakeDiscord() as discord:
        w = build_world(discord)
        settings = parse_settings(
            {"bot": {"name": "flooded", "max_queued": 2},
             "generation": {"backend": "echo"}, "memory": {"backend": "embedded"}},
            source="config/flooded.toml")
        engine = with_generator(settings, SlowGenerator(delay=0.05))
        async with running(discord, engine, settings, streaming=False):
            for n in range(8):
                discord.post(w.dm, w.alice, f"flood {n}")
            await discord.wait_until(lambda: len(discord.sent(w.dm)) == 8)
        answers = contents(discord.sent(w.dm))
        # One answered while two waited; the rest were told at once, before those three.
        assert answers[-3:] == ["flood 0", "flood 1", "flood 2"]
        assert answers[:5] == [engine.apologies.slow_down] * 5
