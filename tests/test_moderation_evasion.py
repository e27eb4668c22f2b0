"""A user cannot shed moderation's limits: ``/forget`` erases what moderation kept about
them but not an active mute, and commands count against the flood limits as messages do.
Both state backends: in this process and on a real redis-server."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from core.app import build_engine
from core.config import parse_settings
from core.engine import collect
from core.moderation.moderator import FilterModerator
from core.moderation.state import Limits, MemoryState, ModerationState
from core.moderation.state_redis import RedisState
from core.testing import ChatHarness
from core.types import IncomingMessage, ReplyKind

REPO = Path(__file__).resolve().parents[1]
LIMITS = Limits(user_rate=100, user_window=60, conversation_rate=100, conversation_window=60)


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Memory settings for a bot whose moderation state is in process, or in Redis."""
    if request.param == "memory":
        return {"backend": "embedded"}
    return {"backend": "redis", "url": request.getfixturevalue("redis_url"),
            "key_prefix": request.getfixturevalue("memory_prefix")}


def state_for(memory: dict[str, Any]) -> ModerationState:
    if memory["backend"] == "embedded":
        return MemoryState()
    return RedisState(memory["url"], prefix=memory["key_prefix"], bot="ebot")


@pytest.fixture
async def state(backend: dict[str, Any]) -> AsyncIterator[ModerationState]:
    made = state_for(backend)
    await made.start()
    try:
        yield made
    finally:
        await made.stop()


def entry(user: str) -> dict[str, str]:
    return {"channel": "web", "user": user, "conversation": f"dm-{user}", "message": "m1",
            "action": "mute", "policy": "insult:terms:x", "hash": "0" * 32}


async def test_forget_user_erases_the_audit_but_keeps_an_active_mute(
    state: ModerationState,
) -> None:
    await state.record(entry("alice"), mute_user="web:alice", mute_seconds=600, escalate=True)
    await state.record(entry("bob"), escalate=True)
    assert (await state.admit("web:alice", "web:dm-alice", LIMITS)).muted_for > 0

    forget_user = state.forget_user  # type: ignore[attr-defined]
    assert await forget_user("web:alice", ["web:dm-alice"]) == 2  # her audit, her escalation

    # What she said and did is gone from the logs; others' entries stay.
    assert [e["user"] for e in await state.read_audit(10)] == ["bob"]
    assert [e["user"] for e in await state.read_escalations(10)] == ["bob"]
    # The mute is enforcement, not a record of her: it runs its course.
    admission = await state.admit("web:alice", "web:dm-alice", LIMITS)
    assert 590 < admission.muted_for <= 600
    assert await state.unmute("web:alice")  # a moderator can still lift it


async def test_forget_user_keeps_the_score_and_the_flood_windows(state: ModerationState
                                                                  ) -> None:
    # Otherwise /forget would be a way out of them: a user one offence short of a mute
    # would start from nothing, and one /forget every few messages would empty the window.
    await state.add_points("web:alice", 4.0, half_life=3600)
    for _ in range(3):
        await state.admit("web:alice", "web:dm-alice", LIMITS)
    await state.forget_user("web:alice", ["web:dm-alice"])  # type: ignore[attr-defined]
    assert await state.add_points("web:alice", 0.0, half_life=3600) == pytest.approx(
        4.0, rel=1e-3)
    admission = await state.admit("web:alice", "web:dm-alice", LIMITS)
    assert (admission.user_count, admission.conversation_count) == (4, 4)


def community(memory: dict[str, Any], user_rate: int = 1000) -> ChatHarness:
    return ChatHarness.from_file(
        REPO / "config" / "community.toml", env={"REDIS_URL": "redis://127.0.0.1:1/0",
                                                 "DISCORD_TOKEN": "x", "TELEGRAM_TOKEN": "1:a"},
        memory_url=memory.get("url"), key_prefix=memory.get("key_prefix"), channel="discord",
        plugins={"modules": ["plugins.community"], "admins": {"discord": ["mod-1"]}},
        memory=memory,
        moderation={"backend": "filters", "user_rate": user_rate, "conversation_rate": 1000})


async def test_a_muted_user_s_forget_does_not_lift_the_mute(backend: dict[str, Any]) -> None:
    async with community(backend) as bot:
        await bot.send("hello there", user="troll")
        assert (await bot.send("/mute troll 5 spamming", user="mod-1")).text == (
            "Muted for 5 minute(s).")
        assert (await bot.send("hello", user="troll")).code == "moderated"
        gone = await bot.send("/forget", user="troll")  # commands stay open to the muted
        assert gone.text.startswith("Done: I deleted everything I kept about you")
        # The audit no longer names them (the mute's entry, the refusals) ...
        assert "troll" not in (await bot.send("/audit 20", user="mod-1")).text

        # ... but they are still muted (and that refusal is audited afresh) ...
        still = await bot.send("hello again", user="troll")
        assert (still.kind, still.code) == ("notice", "moderated")
        assert "muted" in still.text
        assert "discord:troll mute muted" in (await bot.send("/audit 1", user="mod-1")).text
        # ... until a moderator lifts it (or it ends).
        assert (await bot.send("/unmute troll", user="mod-1")).text == "Unmuted."
        assert (await bot.send("hello once more", user="troll")).kind == "final"


async def test_forget_does_not_empty_the_flood_window(backend: dict[str, Any]) -> None:
    async with community(backend, user_rate=3) as bot:
        assert (await bot.send("hello", user="flooder")).kind == "final"
        assert (await bot.send("hello", user="flooder")).kind == "final"
        assert (await bot.send("/forget", user="flooder")).code == "command"
        assert (await bot.send("hello", user="flooder")).code == "slow_down"


# -- commands and flood control ----------------------------------------------------------

def flood_bot(memory: dict[str, Any]) -> Any:
    return parse_settings({
        "bot": {"name": "ebot"}, "generation": {"backend": "echo"}, "memory": memory,
        "moderation": {"backend": "filters", "user_rate": 3, "user_window": 60,
                       "mute_seconds": 600},
    })


def msg(text: str, user: str = "u1", conv: str = "c1") -> IncomingMessage:
    return IncomingMessage(bot="ebot", channel="web", conversation_id=conv, user_id=user,
                           message_id=uuid.uuid4().hex, text=text)


@pytest.mark.parametrize("text", ["/help", "/reset", "/help me please", "/nosuchcommand"])
async def test_commands_count_against_the_flood_limits(backend: dict[str, Any], text: str
                                                       ) -> None:
    settings = flood_bot(backend)
    async with build_engine(settings) as engine:
        replies = [await collect(engine.handle(msg(text))) for _ in range(5)]
        assert [r.code for r in replies[:3]] != ["slow_down"] * 3
        refused = replies[3:]
        # Refused as a message over the limit is: the same "slow down", told at once.
        assert {(r.kind, r.code, r.text) for r in refused} == {
            (ReplyKind.ERROR, "slow_down", settings.moderation.flood_reply)}
        # Commands and messages share one count.
        assert (await collect(engine.handle(msg("hello")))).code == "slow_down"
        assert (await collect(engine.handle(msg("hello", user="u2")))).kind is ReplyKind.FINAL


@pytest.mark.parametrize("text", ["/help", "/reset", "/help me please", "/nosuchcommand"])
async def test_a_muted_user_s_commands_count_against_the_flood_limits(
    backend: dict[str, Any], text: str,
) -> None:
    settings = flood_bot(backend)
    async with build_engine(settings) as engine:
        moderator = engine.moderator
        assert isinstance(moderator, FilterModerator)
        await moderator.state.record({"note": "muted by a moderator"}, mute_user="web:u1",
                                     mute_seconds=600)
        replies = [await collect(engine.handle(msg(text))) for _ in range(6)]
        # Within the limits a bare command is answered (the mute leaves commands open)
        # and one with arguments is told of the mute; beyond them, "slow down".
        assert "slow_down" not in [r.code for r in replies[:3]]
        assert {(r.kind, r.code) for r in replies[3:]} == {(ReplyKind.ERROR, "slow_down")}


async def test_a_bare_command_is_refused_when_the_flood_count_fails_closed(
    redis_server: Any, memory_prefix: str,
) -> None:
    # With the flood count out of reach and fail_input = "closed", a message is refused
    # by its flood step; a bare command meets no filter after admission, so admission
    # refuses it (it was answered, without limits, while the state was down).
    redis_server.start()
    settings = parse_settings({
        "bot": {"name": "ebot"}, "generation": {"backend": "echo"},
        "memory": {"backend": "embedded"},
        "moderation": {"backend": "filters", "state": "redis", "url": redis_server.url,
                       "key_prefix": memory_prefix, "fail_input": "closed"},
    })
    async with build_engine(settings) as engine:
        assert (await collect(engine.handle(msg("/help")))).code == "command"
        redis_server.kill()
        try:
            for text in ("hello", "/help", "/reset", "/help me please"):
                refused = await collect(engine.handle(msg(text)))
                assert (refused.kind, refused.code, refused.text) == (
                    ReplyKind.NOTICE, "moderated", settings.moderation.failure_reply), text
        finally:
            redis_server.restart()


async def test_a_mute_is_never_shortened_by_a_shorter_one(state: ModerationState) -> None:
    # A moderator's day-long mute, then an automatic one of the policy's minutes: the
    # longer stands, in process and on Redis alike (Redis's SET PX replaced it).
    await state.record(entry("dave"), mute_user="web:dave", mute_seconds=86_400)
    await state.record(entry("dave"), mute_user="web:dave", mute_seconds=300)
    assert (await state.admit("web:dave", "web:dm-dave", LIMITS)).muted_for > 86_000
    # A longer one still lengthens a shorter one.
    await state.record(entry("erin"), mute_user="web:erin", mute_seconds=300)
    await state.record(entry("erin"), mute_user="web:erin", mute_seconds=3_600)
    assert (await state.admit("web:erin", "web:dm-erin", LIMITS)).muted_for > 3_500


async def test_a_muted_user_flooding_commands_cannot_shorten_their_mute(
    backend: dict[str, Any],
) -> None:
    # Each refused command over the limit scores a point; at the policy's mute_at that is
    # an automatic mute of mute_seconds (600 here), which must not cut a moderator's day.
    settings = flood_bot(backend)
    async with build_engine(settings) as engine:
        moderator = engine.moderator
        assert isinstance(moderator, FilterModerator)
        await moderator.state.record({"note": "muted by a moderator"}, mute_user="web:u1",
                                     mute_seconds=86_400)
        for _ in range(12):
            await collect(engine.handle(msg("/help")))
        admission = await moderator.state.admit("web:u1", "web:c1", LIMITS)
        assert admission.muted_for > 86_000


async def test_in_process_state_lets_a_forgotten_user_s_spent_score_and_mute_go() -> None:
    # docs/guarantees.md: after /forget the score stays only until it has decayed below
    # a hundredth of a point, and a mute until it ends, in both states. In process they
    # stayed until a restart (the score was never dropped at all).
    now = [1_000.0]
    state = MemoryState(clock=lambda: now[0])
    await state.add_points("web:fay", 1.0, half_life=60)  # below 0.01 after ~399 s
    await state.record(entry("fay"), mute_user="web:fay", mute_seconds=100)
    await state.forget_user("web:fay")
    assert "web:fay" in state.dump()  # both still running their course
    now[0] += 120
    await state.forget_user("web:fay")
    assert "web:fay" in state.dump()  # the mute is over, but the score has not decayed
    now[0] += 300
    await state.forget_user("web:fay")
    assert "web:fay" not in state.dump()
    assert await state.add_points("web:fay", 1.0, half_life=60) == 1.0  # a fresh start


# -- abandoned attempts and flood control ------------------------------------------------

async def generate_then_hang_up(engine: Any, message: IncomingMessage) -> Any:
    """Send ``message`` and hang up once its reply starts streaming (as a web or NPC
    client disconnects): True if a generation ran, else the message's answer."""
    events = engine.handle(message)
    try:
        async for event in events:
            if event.kind is ReplyKind.DELTA:
                return True
            if event.is_last:
                return event
    finally:
        await events.aclose()
    raise AssertionError("the stream ended without an answer")


async def test_each_attempt_to_answer_a_message_counts_but_a_replay_does_not(
    backend: dict[str, Any],
) -> None:
    # The client picks the message id and frees it by hanging up: the flood windows
    # count one message id once, so without counting each started generation one id
    # would buy unlimited generations in one window.
    settings = flood_bot(backend)
    async with build_engine(settings) as engine:
        again = msg("tell me a long story about dragons please")
        outcomes = [await generate_then_hang_up(engine, again) for _ in range(6)]
        assert outcomes[:3] == [True, True, True]  # user_rate = 3
        refused = outcomes[3]
        assert (refused.kind, refused.code, refused.text) == (
            ReplyKind.NOTICE, "moderated", settings.moderation.flood_reply)
        # Still over the limit: refused at once, before the lane.
        assert [(o.kind, o.code) for o in outcomes[4:]] == [(ReplyKind.ERROR, "slow_down")] * 2
        assert (await collect(engine.handle(msg("hello")))).code == "slow_down"

        # Copies sent at once wait in the lane behind the first, admitted as redeliveries:
        # each that starts a generation once the one before hung up counts all the same.
        other = msg("tell me a long story about dragons please", user="u2", conv="c2")
        at_once = await asyncio.gather(*(generate_then_hang_up(engine, other)
                                         for _ in range(6)))
        assert at_once.count(True) == 3

        # A network retry of an answered message is answered from memory, not counted.
        first = msg("hello there", user="u3", conv="c3")
        assert (await collect(engine.handle(first))).kind is ReplyKind.FINAL
        replays = [await collect(engine.handle(first)) for _ in range(5)]
        assert {(r.kind, r.code, r.text) for r in replays} == {
            (ReplyKind.FINAL, "duplicate", "hello there")}
        assert [(await collect(engine.handle(msg(f"hi {i}", user="u3", conv="c3")))).kind
                for i in range(3)] == [ReplyKind.FINAL] * 2 + [ReplyKind.ERROR]
