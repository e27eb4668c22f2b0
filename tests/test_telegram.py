"""The Telegram channel: the real python-telegram-bot client against the loopback fake.

Nothing of the adapter is replaced: PTB talks HTTP to bots.testing.telegram.FakeTelegram
on 127.0.0.1; the engine is the real one (echo generator, embedded memory), except where
a test needs a reply of a given shape or pace, which a small generator supplies.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import regex

from bots.base import utf16_length
from bots.telegram.adapter import TelegramAdapter
from bots.testing.telegram import FakeTelegram
from core.app import build_engine
from core.config import BotSettings, parse_settings
from core.engine import Engine
from core.errors import ConfigError
from core.generation.base import GenerationRequest, TokenDelta
from core.generation.echo import EchoGenerator
from core.plugin_services import DeliveryError
from core.types import ConversationKey, IncomingMessage

BOT = "tgtest"
SOURCE = "config/tgtest.toml"
# Short limits so the suite stays fast; the pacing logic is the same as with the real ones.
FAST = {
    "chat_interval": 0.02,
    "group_interval": 0.04,
    "global_per_second": 1000.0,
    "edit_interval": 0.02,
    "group_edit_interval": 0.04,
    "typing_interval": 0.05,
    "retry_backoff": 0.01,
}


def make_settings(generation: str = "echo", **bot: Any) -> BotSettings:
    return parse_settings(
        {"bot": {"name": BOT, **bot}, "generation": {"backend": generation,
                                                     "max_new_tokens": 2000},
         "memory": {"backend": "embedded"}},
        source=SOURCE,
    )


def section(telegram: FakeTelegram, **overrides: Any) -> dict[str, Any]:
    limits = {**FAST, **overrides.pop("limits", {})}
    return {"token": telegram.token, "api_base_url": telegram.base_url, "poll_timeout": 1,
            "limits": limits, **overrides}


@asynccontextmanager
async def running(
    telegram: FakeTelegram, engine: Engine | None = None, **overrides: Any
) -> AsyncIterator[TelegramAdapter]:
    settings = make_settings()
    engine = engine or build_engine(settings)
    async with engine:
        adapter = TelegramAdapter(settings, section(telegram, **overrides))
        await adapter.start(engine)
        try:
            yield adapter
        finally:
            await adapter.stop()


class Scripted(EchoGenerator):
    """Answers every message with ``reply``, ``words_per_delta`` words at a time."""

    def __init__(self, reply: str, *, delay: float = 0.0, words_per_delta: int = 1) -> None:
        super().__init__()
        self.reply = reply
        self.delay = delay
        self.words_per_delta = words_per_delta

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        words = regex.findall(r"\s*\S+", self.reply)
        for i in range(0, len(words), self.words_per_delta):
            await asyncio.sleep(self.delay)
            yield TokenDelta("".join(words[i : i + self.words_per_delta]))
        yield TokenDelta("", finish_reason="stop")


def engine_with(generator: EchoGenerator) -> Engine:
    engine = build_engine(make_settings())
    engine.generator = generator
    return engine


async def answered(telegram: FakeTelegram, chat_id: int, count: int = 1) -> list[str]:
    """The chat's messages once there are ``count`` and no call came for a moment."""
    await telegram.wait_for(lambda: len(telegram.texts(chat_id)) >= count)
    seen = -1
    while seen != len(telegram.calls):
        seen = len(telegram.calls)
        await asyncio.sleep(0.15)
    return telegram.texts(chat_id)


# -- private chats, groups, commands ----------------------------------------------------


async def test_a_private_message_is_answered_through_the_engine() -> None:
    async with FakeTelegram() as telegram, running(telegram) as adapter:
        telegram.message("Hello there, bot!", chat_id=42)
        assert await answered(telegram, 42) == ["Hello there, bot!"]
        turns = (await adapter._engine.memory.load(  # type: ignore[union-attr]
            ConversationKey(BOT, "telegram", "42"), "42")).turns
        assert [(t.role, t.text) for t in turns] == [
            ("user", "Hello there, bot!"), ("assistant", "Hello there, bot!")]
        assert turns[0].message_id == "tg:42:1"
        assert telegram.pending == 0  # confirmed through getUpdates' offset


async def test_commands_are_registered_and_answered() -> None:
    async with FakeTelegram() as telegram, running(telegram, start_message="Welcome!"):
        assert [c["command"] for c in telegram.commands] == ["start", "help", "reset"]
        telegram.message("/start", chat_id=7)
        telegram.message("/help", chat_id=7)
        telegram.message("remember this", chat_id=7)
        telegram.message("/reset", chat_id=7)
        texts = await answered(telegram, 7, 4)
        assert texts[0] == "Welcome!"
        assert "/reset" in texts[1] and "/help" in texts[1]
        assert texts[2] == "remember this"
        assert "forgotten" in texts[3]


HELP = "HELP"


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("mention", ["hi there", HELP, "about that", HELP]),
        ("commands", [HELP, HELP]),
        ("always", ["just chatting", "hi there", HELP, "about that", HELP]),
    ],
)
async def test_group_rules(policy: str, expected: list[str]) -> None:
    group = -100123

    def say(text: str, **kwargs: Any) -> None:
        telegram.message(text, chat_id=group, user_id=5, chat_type="supergroup", **kwargs)

    async with FakeTelegram() as telegram, running(telegram, answer_in_groups=policy):
        say("just chatting")
        say("@parley_test_bot hi there")
        say("/help")
        say("/help@otherbot")  # never for this bot
        await answered(telegram, group)
        say("about that", reply_to=max(telegram.chats[group].messages))  # the bot's message
        say("/help@parley_test_bot")
        await answered(telegram, group, len(expected))
        await asyncio.sleep(0.2)  # nothing else comes
        texts = telegram.texts(group)
        assert [HELP if t.startswith("Commands:") else t for t in texts] == expected
        # Each answer in a group replies to the message it answers.
        sends = telegram.calls_to("sendMessage", chat_id=group)
        assert all(c.params["reply_parameters"]["message_id"] for c in sends)


async def test_a_forum_topic_is_a_conversation_of_its_own() -> None:
    heard: list[IncomingMessage] = []

    async def listen(message: IncomingMessage) -> None:
        heard.append(message)

    engine = build_engine(make_settings())
    engine.plugins.add_context_provider(listen)
    async with FakeTelegram() as telegram, running(
        telegram, engine, answer_in_groups="always"
    ) as bot:
        group = -100777
        telegram.message("in topic one", chat_id=group, chat_type="supergroup", thread_id=11)
        telegram.message("in topic two", chat_id=group, chat_type="supergroup", thread_id=22)
        await answered(telegram, group, 2)
        threads = [c.params.get("message_thread_id")
                   for c in telegram.calls_to("sendMessage", chat_id=group)]
        assert threads == [11, 22]
        memory = bot._engine.memory  # type: ignore[union-attr]
        one = await memory.load(ConversationKey(BOT, "telegram", f"{group}:11"), "1")
        assert [t.text for t in one.turns] == ["in topic one", "in topic one"]
        assert heard[0].metadata == {"chat_id": str(group), "group": "true", "thread_id": "11"}
        assert heard[0].user_name == "Ada"


# -- streaming and limits ---------------------------------------------------------------


@pytest.mark.parametrize("chat_type", ["private", "supergroup"])
async def test_streaming_edits_stay_within_the_rate_budget(chat_type: str) -> None:
    reply = " ".join(f"word{i}" for i in range(60))
    engine = engine_with(Scripted(reply, delay=0.01))
    limits = {"chat_interval": 0.1, "group_interval": 0.25, "edit_interval": 0.1,
              "group_edit_interval": 0.25}
    chat = 55 if chat_type == "private" else -10055
    async with FakeTelegram() as telegram, running(
        telegram, engine, limits=limits, answer_in_groups="always"
    ):
        telegram.message("go", chat_id=chat, chat_type=chat_type)
        await telegram.wait_for(lambda: telegram.texts(chat) == [reply])
        await asyncio.sleep(0.3)  # nothing more comes after the final text
        assert telegram.texts(chat) == [reply]
        sends = telegram.calls_to("sendMessage", chat_id=chat)
        edits = telegram.calls_to("editMessageText", chat_id=chat)
        assert len(sends) == 1 and len(edits) >= 2  # it streamed
        assert [c for c in telegram.calls if c.status != 200] == []  # every edit changed text
        assert telegram.calls_to("sendChatAction", chat_id=chat)[0].at <= sends[0].at
        interval = limits["chat_interval" if chat_type == "private" else "group_interval"]
        times = sorted(c.at for c in sends + edits)
        # Recorded at the fake, so a late arrival can shorten one gap by the loop's lag:
        # checked as rates, over the whole reply and in every window of 4 intervals.
        assert times[-1] - times[0] >= (len(times) - 2) * interval, times
        for t in times:
            assert sum(1 for u in times if t <= u < t + 4 * interval) <= 4 + 1, times
        assert len(edits) < 60 / 2  # coalesced: far fewer edits than the 60 deltas


async def test_without_streaming_the_reply_is_one_message() -> None:
    engine = engine_with(Scripted("one two three four five", delay=0.02))
    async with FakeTelegram() as telegram, running(telegram, engine, streaming=False):
        telegram.message("go", chat_id=8)
        assert await answered(telegram, 8) == ["one two three four five"]
        assert telegram.calls_to("editMessageText") == []
        assert len(telegram.calls_to("sendMessage")) == 1


def long_reply() -> str:
    emoji = "👩🏽‍💻"  # one grapheme cluster, 7 UTF-16 units
    prose = " ".join(f"{emoji}note{i}" for i in range(400))
    code = "\n".join(f"    value_{i} = compute({i})  # step {i}" for i in range(40))
    return f"{prose}\n\n```python\n{code}\n```\n\nThat is **all** of it."


@pytest.mark.parametrize("streaming", [True, False])
async def test_a_6000_character_reply_is_split_correctly(streaming: bool) -> None:
    reply = long_reply()
    assert len(reply) > 6000 and utf16_length(reply) > 2 * 4096 - 1000
    engine = engine_with(Scripted(reply, words_per_delta=40))
    async with FakeTelegram() as telegram, running(telegram, engine, streaming=streaming):
        telegram.message("long please", chat_id=9)
        await telegram.wait_for(lambda: any("That is" in t for t in telegram.texts(9)))
        await asyncio.sleep(0.2)
        texts = telegram.texts(9)
        assert len(texts) >= 2
        assert all(utf16_length(t) <= 4096 for t in texts)
        # Every emoji arrived whole: no part starts or ends inside a cluster.
        assert sum(t.count("👩🏽‍💻") for t in texts) == reply.count("👩🏽‍💻") == 400
        assert all(not regex.match(r"\p{M}|\u200d|\p{Sk}", t) for t in texts)
        # The code block went as code (HTML <pre>), and every line of it arrived once.
        pres = [c for c in telegram.calls_to("sendMessage") + telegram.calls_to(
            "editMessageText") if "<pre>" in str(c.params.get("text"))]
        assert pres
        lines = [ln for t in texts for ln in t.splitlines() if "value_" in ln]
        assert len(lines) == 40 and len(set(lines)) == 40
        assert texts[-1].endswith("That is all of it.")  # bold parsed away
        # Nothing but whitespace at the cuts and the Markdown the fake parsed is missing.
        visible = regex.sub(r"\*\*|```python|```", "", reply)
        assert "".join("".join(t.split()) for t in texts) == "".join(visible.split())


async def test_formatting_telegram_rejects_falls_back_to_plain_text() -> None:
    broken = "this **bold *and** italic* mix"
    engine = engine_with(Scripted(broken))
    async with FakeTelegram() as telegram, running(telegram, engine, streaming=False):
        telegram.message("format", chat_id=10)
        assert await answered(telegram, 10) == [broken]
        refused = [c for c in telegram.calls if c.status == 400]
        assert len(refused) == 1 and refused[0].params.get("parse_mode") == "HTML"


async def test_html_in_a_reply_is_shown_as_written() -> None:
    async with FakeTelegram() as telegram, running(telegram):
        text = 'see <b>this</b> & <a href="x">that</a>, 1 < 2'
        telegram.message(text, chat_id=15)
        assert await answered(telegram, 15) == [text]
        assert [c for c in telegram.calls if c.status != 200] == []  # escaped, not refused


async def test_a_429_storm_loses_duplicates_and_reorders_nothing() -> None:
    async with FakeTelegram() as telegram, running(telegram) as adapter:
        telegram.storm(0.5, retry_after=0.02, seed=7)
        chats = [201, 202, 203]
        for i in range(10):
            for chat in chats:
                telegram.message(f"chat {chat} message {i}", chat_id=chat)
        expected = {chat: [f"chat {chat} message {i}" for i in range(10)] for chat in chats}
        # Equal, not just ten each: a last edit may still be waiting out 429s in a row.
        with contextlib.suppress(TimeoutError):
            await telegram.wait_for(
                lambda: all(telegram.texts(c) == expected[c] for c in chats), within=60)
        await asyncio.sleep(0.2)
        for chat in chats:
            assert telegram.texts(chat) == expected[chat]
        storms = [c for c in telegram.calls if c.status == 429]
        assert len(storms) > 10  # the storm was real
        assert adapter._outbox == {}


async def test_a_429_on_an_edit_waits_and_retries_the_same_edit() -> None:
    engine = engine_with(Scripted("a b c d e f g h", delay=0.03))
    async with FakeTelegram() as telegram, running(telegram, engine):
        telegram.fail("editMessageText", status=429, retry_after=0.2, times=1)
        telegram.message("go", chat_id=11)
        await telegram.wait_for(lambda: telegram.texts(11) == ["a b c d e f g h"])
        refused = [c for c in telegram.calls if c.status == 429]
        assert len(refused) == 1
        after = [c for c in telegram.calls_to("editMessageText") if c.at > refused[0].at]
        assert after and after[0].at - refused[0].at >= 0.2 * 0.9


async def test_typing_is_repeated_while_the_reply_is_slow_to_start() -> None:
    class SlowStart(Scripted):
        async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
            await asyncio.sleep(0.5)
            async for delta in super().stream(request):
                yield delta

    engine = engine_with(SlowStart("at last"))
    async with FakeTelegram() as telegram, running(telegram, engine):
        telegram.message("take your time", chat_id=12)
        assert await answered(telegram, 12) == ["at last"]
        first = telegram.calls_to("sendMessage", chat_id=12)[0].at
        typing = [c.at for c in telegram.calls_to("sendChatAction", chat_id=12)]
        assert len([t for t in typing if t < first]) >= 3  # every typing_interval (0.05 s)
        assert all(t < first for t in typing)  # and none once the reply shows


async def test_a_reset_replaces_what_was_shown() -> None:
    class Restarting(Scripted):
        async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
            for word in ("abandoned", " attempt", " text"):
                await asyncio.sleep(0.05)
                yield TokenDelta(word)
            yield TokenDelta("the", restart=True)  # a worker died; another started over
            for word in (" second", " answer"):
                await asyncio.sleep(0.05)
                yield TokenDelta(word)
            yield TokenDelta("", finish_reason="stop")

    engine = engine_with(Restarting(""))
    async with FakeTelegram() as telegram, running(telegram, engine):
        telegram.message("go", chat_id=13)
        await telegram.wait_for(lambda: telegram.texts(13) == ["the second answer"])
        shown = [c.params["text"] for c in telegram.calls_to("sendMessage", chat_id=13)
                 + telegram.calls_to("editMessageText", chat_id=13)]
        assert any("abandoned" in t for t in shown)  # it was on screen, and is gone
        assert len(telegram.calls_to("sendMessage", chat_id=13)) == 1


async def test_a_crash_behind_the_adapter_gets_an_apology_and_the_chat_goes_on() -> None:
    class Crashing(Scripted):
        async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
            if "crash" in request.messages[-1].content:
                raise RuntimeError("a bug somewhere behind the engine")
            async for delta in super().stream(request):
                yield delta

    engine = engine_with(Crashing("fine again"))
    async with FakeTelegram() as telegram, running(telegram, engine):
        telegram.message("crash now", chat_id=14)
        telegram.message("and now?", chat_id=14)
        texts = await answered(telegram, 14, 2)
        assert texts == [engine.apologies.internal, "fine again"]  # the engine's words


async def test_plugins_send_through_the_outbox() -> None:
    async with FakeTelegram() as telegram, running(telegram) as adapter:
        outbox = adapter._engine.plugins.services.outbox  # type: ignore[union-attr]
        assert "telegram" in outbox.channels
        await outbox.send(ConversationKey(BOT, "telegram", "42"), "An agent will join you.")
        await outbox.send(ConversationKey(BOT, "telegram", "-100900:7"), "In the topic.")
        assert telegram.texts(42) == ["An agent will join you."]
        assert telegram.calls_to("sendMessage", chat_id=-100900)[0].params[
            "message_thread_id"] == 7
        with pytest.raises(DeliveryError, match="not a chat id"):
            await outbox.send(ConversationKey(BOT, "telegram", "general"), "?")
    assert "telegram" not in outbox.channels  # stopped: nothing is handed to it


# -- confirming updates ------------------------------------------------------------------


class Held(EchoGenerator):
    """Echoes; a message with "hold" or "cut" only once ``release`` is set (``began``
    says such a reply began)."""

    def __init__(self) -> None:
        super().__init__()
        self.began = asyncio.Event()
        self.release = asyncio.Event()

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        said = [m.content for m in request.messages if m.role == "user"][-1]
        if "hold" in said or "cut" in said:
            self.began.set()
            await self.release.wait()
        async for delta in super().stream(request):
            yield delta


async def test_an_update_is_confirmed_only_once_it_was_answered() -> None:
    generator = Held()
    async with FakeTelegram() as telegram, running(telegram, engine_with(generator)):
        telegram.message("hold on", chat_id=44)
        await asyncio.wait_for(generator.began.wait(), 30)
        polls = len(telegram.calls_to("getUpdates"))
        await telegram.wait_for(lambda: len(telegram.calls_to("getUpdates")) > polls + 2)
        # Polled again meanwhile, and the update in progress is still Telegram's: a
        # process that died now would get it again.
        assert telegram.pending == 1
        telegram.message("and another chat goes on", chat_id=45)
        # (Not answered(): polling does not pause while an update is held.)
        await telegram.wait_for(lambda: telegram.texts(45) == ["and another chat goes on"])
        polls = len(telegram.calls_to("getUpdates"))
        await telegram.wait_for(lambda: len(telegram.calls_to("getUpdates")) > polls + 2)
        assert telegram.pending == 2  # the newer one waits for the older one
        generator.release.set()
        assert await answered(telegram, 44) == ["hold on"]
        await telegram.wait_for(lambda: telegram.pending == 0)


async def test_at_stop_the_answered_updates_are_confirmed_and_a_cut_one_is_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("bots.telegram.adapter.SHUTDOWN_TIMEOUT", 0.1)  # for the held reply
    generator = Held()
    async with FakeTelegram() as telegram:
        async with running(telegram, engine_with(generator)):
            telegram.message("first", chat_id=46)
            telegram.message("second", chat_id=47)
            await answered(telegram, 46)
            await answered(telegram, 47)
            telegram.message("cut short", chat_id=48)
            await asyncio.wait_for(generator.began.wait(), 30)
        assert telegram.pending == 1  # "cut short" comes again after a restart
        generator.release.set()
        async with running(telegram, engine_with(generator)):
            assert await answered(telegram, 48) == ["cut short"]
        assert telegram.texts(46) == ["first"] and telegram.texts(47) == ["second"]
        assert telegram.pending == 0


# -- malformed and unsupported updates --------------------------------------------------


async def test_malformed_and_unsupported_updates_are_ignored() -> None:
    async with FakeTelegram() as telegram, running(telegram):
        telegram.update({"message": "not a message at all"})
        telegram.update({"message": {"message_id": "x", "chat": 5}})
        telegram.update({"message": {"message_id": 3, "date": 0, "chat": {"id": 12,
                         "type": "private"}, "from": {"id": 12, "is_bot": False,
                         "first_name": "A"}, "sticker": {"file_id": "s"}}})
        telegram.update({"edited_message": {"message_id": 1, "date": 0, "edit_date": 1,
                         "chat": {"id": 12, "type": "private"}, "text": "edited"}})
        telegram.update({"message": {"message_id": 4, "date": 0, "chat": {"id": 12,
                         "type": "group", "title": "g"}, "from": {"id": 12, "is_bot": False,
                         "first_name": "A"}, "new_chat_members": [{"id": 9, "is_bot": False,
                         "first_name": "B"}]}})
        telegram.update({"unknown_kind": {"x": 1}})
        telegram.message("still here?", chat_id=12)
        assert await answered(telegram, 12) == ["still here?"]
        assert telegram.pending == 0


# -- config -----------------------------------------------------------------------------


def test_config_errors_name_the_file_and_key() -> None:
    settings = make_settings()
    with pytest.raises(ConfigError, match=r"config/tgtest.toml: adapters.telegram.token"):
        TelegramAdapter(settings, {})
    with pytest.raises(ConfigError, match=r"adapters.telegram: .*needs webhook_url"):
        TelegramAdapter(settings, {"token": "1:x", "mode": "webhook"})
    with pytest.raises(ConfigError, match=r"adapters.telegram: .*needs secret_token"):
        TelegramAdapter(settings, {"token": "1:x", "mode": "webhook",
                                   "webhook_url": "https://example.org/tg"})
    with pytest.raises(ConfigError, match=r"adapters.telegram.answer_in_groups"):
        TelegramAdapter(settings, {"token": "1:x", "answer_in_groups": "sometimes"})
    with pytest.raises(ConfigError) as refused:
        TelegramAdapter(settings, {"token": "1:x", "secret_token": "has spaces in it"})
    assert "has spaces" not in str(refused.value)  # secrets are never echoed


async def test_a_refused_token_is_a_config_error() -> None:
    async with FakeTelegram() as telegram:
        settings = make_settings()
        adapter = TelegramAdapter(settings, {**section(telegram), "token": "999:WRONG"})
        async with build_engine(settings) as engine:
            with pytest.raises(ConfigError, match=r"adapters\.telegram\.token: Telegram refused"):
                await adapter.start(engine)
            await adapter.stop()


async def test_the_pacer_keeps_each_chat_and_the_global_budget() -> None:
    from bots.telegram.config import TelegramLimits
    from bots.telegram.outbound import Pacer

    pacer = Pacer(TelegramLimits(chat_interval=0.1, group_interval=0.2, global_per_second=40))
    done: dict[int, list[float]] = {1: [], 2: [], -3: []}
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def calls(chat: int) -> None:
        for _ in range(4):
            await pacer.slot(chat, group=chat < 0)
            done[chat].append(loop.time())

    await asyncio.gather(*(calls(chat) for chat in done))
    # A slot is never early: the k-th call of a chat, and the k-th of all, come no sooner
    # than k intervals after the start.
    for chat, times in done.items():
        interval = 0.2 if chat < 0 else 0.1
        assert all(t - start >= k * interval - 1e-3 for k, t in enumerate(times)), times
    everything = sorted(t for times in done.values() for t in times)
    assert all(t - start >= k / 40 - 1e-3 for k, t in enumerate(everything))
    pacer.hold(1, 0.3)
    held = loop.time()
    await pacer.slot(1, group=False)
    assert loop.time() - held >= 0.3 - 1e-3  # a 429's retry_after holds the chat
