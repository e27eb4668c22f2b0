"""The engine's pipeline, driven through real backends (embedded memory, echo generator)."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from core.app import build_engine
from core.config import parse_settings
from core.engine import Engine, collect
from core.errors import GenerationError, GeneratorBusy
from core.generation.base import GenerationRequest, TokenDelta
from core.generation.echo import EchoGenerator
from core.plugins import PluginRegistry
from core.types import ConversationKey, IncomingMessage, ReplyEvent, ReplyKind


def settings(**sections: Any) -> Any:
    raw: dict[str, Any] = {
        "bot": {"name": "tbot", "max_message_chars": 500},
        "generation": {"backend": "echo"},
        "memory": {"backend": "embedded", "window": 50},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return parse_settings(raw)


def message(text: str, conversation: str = "c1", *, message_id: str | None = None,
            user: str = "u1") -> IncomingMessage:
    return IncomingMessage(
        bot="tbot", channel="test", conversation_id=conversation, user_id=user,
        message_id=message_id or uuid.uuid4().hex, text=text,
    )


async def events_of(engine: Engine, msg: IncomingMessage) -> list[ReplyEvent]:
    return [event async for event in engine.handle(msg)]


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    async with build_engine(settings()) as eng:
        yield eng


async def turns(engine: Engine, conversation: str = "c1") -> list[tuple[str, str]]:
    snap = await engine.memory.load(ConversationKey("tbot", "test", conversation), "u1")
    return [(t.role, t.text) for t in snap.turns]


async def test_one_message_end_to_end(engine: Engine) -> None:
    events = await events_of(engine, message("hello there friend"))
    kinds = [e.kind for e in events]
    assert kinds[0] is ReplyKind.TYPING
    assert kinds[-1] is ReplyKind.FINAL
    assert kinds.count(ReplyKind.DELTA) >= 2  # streamed, not one lump
    assert "".join(e.text for e in events if e.kind is ReplyKind.DELTA).strip() == events[-1].text
    assert events[-1].text == "hello there friend"
    assert events[-1].action == "allow"
    assert await turns(engine) == [("user", "hello there friend"),
                                   ("assistant", "hello there friend")]


async def test_history_reaches_the_generator(engine: Engine) -> None:
    await collect(engine.handle(message("first")))
    snap = await engine.memory.load(ConversationKey("tbot", "test", "c1"), "u1")
    request = await engine.build_request(message("second"), snap)
    assert [(m.role, m.content) for m in request.messages[1:]] == [
        ("user", "first"), ("assistant", "first"), ("user", "second")]
    assert request.messages[0].role == "system"
    assert request.tenant == "tbot"


async def test_redelivered_message_is_answered_once_and_replayed(engine: Engine) -> None:
    first = await collect(engine.handle(message("once", message_id="m-1")))
    again = await events_of(engine, message("once", message_id="m-1"))
    assert first.kind is ReplyKind.FINAL
    assert [(e.kind, e.code, e.text) for e in again] == [
        (ReplyKind.FINAL, "duplicate", first.text)]  # the stored reply, not an empty notice
    assert len(await turns(engine)) == 2
    command = await collect(engine.handle(message("/help", message_id="m-2")))
    replayed = await collect(engine.handle(message("/help", message_id="m-2")))
    assert (replayed.kind, replayed.text, replayed.code) == (
        ReplyKind.NOTICE, command.text, "duplicate")


async def test_help_and_reset_commands(engine: Engine) -> None:
    await collect(engine.handle(message("remember me")))
    help_reply = await collect(engine.handle(message("/help")))
    assert help_reply.kind is ReplyKind.NOTICE
    assert "/help" in help_reply.text and "/reset" in help_reply.text
    reset = await collect(engine.handle(message("/reset")))
    assert reset.kind is ReplyKind.NOTICE
    assert await turns(engine) == []


@pytest.mark.parametrize(
    ("text", "reason"),
    [("", "empty"), ("   \n ", "empty"), ("x" * 501, "too long"),
     ("bad\x00byte", "control character"), ("esc\x1b[31m", "control character"),
     ("bad \udcff utf8", "UTF-8")],
)
async def test_bad_input_is_refused_and_nothing_stored(engine: Engine, text: str,
                                                       reason: str) -> None:
    events = await events_of(engine, message(text))
    assert len(events) == 1
    assert events[0].kind is ReplyKind.ERROR
    assert events[0].code == "invalid_input"
    assert reason in events[0].text
    assert await turns(engine) == []


async def test_fifty_conversations_at_once_keep_their_order() -> None:
    class JitteryEcho(EchoGenerator):
        """Echo with random pauses, so conversations really interleave."""

        async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
            async for delta in super().stream(request):
                await asyncio.sleep(random.random() * 0.005)
                yield delta

    base = settings()
    registry = PluginRegistry()
    from core import commands
    from core.memory.embedded import create as embedded

    commands.setup(registry)
    engine = Engine(base, memory=embedded(base), generator=JitteryEcho(base),
                    moderator=build_engine(base).moderator, plugins=registry)
    async with engine:
        per_conv = 4
        tasks = [
            asyncio.create_task(collect(engine.handle(
                message(f"conv{c} msg{i}", f"c{c}", user=f"u{c}"))))
            for i in range(per_conv) for c in range(50)
        ]
        replies = await asyncio.gather(*tasks)
        assert all(r.kind is ReplyKind.FINAL for r in replies)
        assert sorted(r.text for r in replies) == sorted(
            f"conv{c} msg{i}" for i in range(per_conv) for c in range(50))
        for c in range(50):
            stored = await turns(engine, f"c{c}")
            assert [t for role, t in stored if role == "user"] == [
                f"conv{c} msg{i}" for i in range(per_conv)]
            assert len(stored) == 2 * per_conv
        assert len(engine.lanes) == 0  # idle conversations leave nothing behind


class Failing:
    """A generator whose far end is broken in a chosen way."""

    def __init__(self, error: Exception | None = None, text: str = "") -> None:
        self.error = error
        self.text = text
        self.closed = asyncio.Event()

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        try:
            if self.error is not None:
                yield TokenDelta("partial ")
                raise self.error
            for word in self.text.split(" ") if self.text else []:
                yield TokenDelta(word + " ")
                await asyncio.sleep(0)
            yield TokenDelta("", "stop")
        finally:
            self.closed.set()


def engine_with(generator: Any) -> Engine:
    base = settings()
    built = build_engine(base)
    return Engine(base, memory=built.memory, generator=generator, moderator=built.moderator,
                  plugins=built.plugins)


@pytest.mark.parametrize(
    ("error", "code"),
    [(GeneratorBusy("queue full"), "busy"), (GenerationError("CUDA fell over"),
                                             "generation_failed")],
)
async def test_generator_failure_becomes_an_apology(error: Exception, code: str) -> None:
    async with engine_with(Failing(error)) as engine:
        last = await collect(engine.handle(message("hi")))
        assert last.kind is ReplyKind.ERROR and last.code == code
        assert last.text.startswith("Sorry")
        assert await turns(engine) == []
        assert engine.metrics.errors.labels("tbot", "generation")._value.get() == 1


async def test_empty_model_reply_is_not_stored() -> None:
    async with engine_with(Failing(text="")) as engine:
        last = await collect(engine.handle(message("hi")))
        assert (last.kind, last.code) == (ReplyKind.ERROR, "empty_reply")
        assert await turns(engine) == []


async def test_closing_the_stream_cancels_generation_and_stores_nothing() -> None:
    generator = Failing(text=" ".join(["word"] * 1000))
    async with engine_with(generator) as engine:
        stream = engine.handle(message("tell me a long story"))
        seen = 0
        async for event in stream:
            if event.kind is ReplyKind.DELTA:
                seen += 1
                if seen == 3:
                    break
        await stream.aclose()
        await asyncio.wait_for(generator.closed.wait(), 1)
        assert await turns(engine) == []
        # The conversation is free again: the next message is answered.
        engine.generator = EchoGenerator(engine.settings)
        assert (await collect(engine.handle(message("again")))).text == "again"


async def test_plugins_answer_directly_and_add_context() -> None:
    async with build_engine(settings()) as engine:
        async def faq(msg: IncomingMessage) -> str | None:
            return "We open at 9." if "opening" in msg.text else None

        async def shop_context(msg: IncomingMessage) -> str | None:
            return "The shop is called Bits & Bobs."

        engine.plugins.add_pre_hook(faq)
        engine.plugins.add_context_provider(shop_context)
        answer = await collect(engine.handle(message("what are your opening hours?")))
        assert (answer.kind, answer.text) == (ReplyKind.FINAL, "We open at 9.")
        assert await turns(engine) == [("user", "what are your opening hours?"),
                                       ("assistant", "We open at 9.")]
        snap = await engine.memory.load(ConversationKey("tbot", "test", "c1"), "u1")
        request = await engine.build_request(message("hello"), snap)
        assert "Bits & Bobs" in request.messages[0].content


async def test_metrics_count_outcomes(engine: Engine) -> None:
    await collect(engine.handle(message("hi", message_id="a")))
    await collect(engine.handle(message("hi", message_id="a")))
    await collect(engine.handle(message("")))
    text = engine.metrics.render().decode()
    assert 'parley_messages_total{bot="tbot",channel="test",outcome="answered"} 1.0' in text
    assert 'outcome="duplicate"} 1.0' in text
    assert 'outcome="invalid"} 1.0' in text


async def test_redis_killed_mid_conversation_apologises_then_recovers(
    redis_server: Any, redis_url: str, memory_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = settings(memory={"backend": "redis", "url": redis_url, "key_prefix": memory_prefix,
                              "timeout": 0.5})
    async with build_engine(config) as engine:
        assert (await collect(engine.handle(message("before")))).text == "before"
        redis_server.kill()
        try:
            events = await asyncio.wait_for(events_of(engine, message("during")), 5)
            assert [e.kind for e in events] == [ReplyKind.ERROR]
            assert events[0].code == "memory_unavailable"
            assert events[0].text.startswith("Sorry")
            assert "memory failed" in caplog.text
            assert engine.metrics.errors.labels("tbot", "memory")._value.get() == 1
        finally:
            redis_server.restart()
        # A fresh server (it keeps nothing on disk): the bot answers again and remembers.
        assert (await collect(engine.handle(message("after")))).text == "after"
        assert await turns(engine) == [("user", "after"), ("assistant", "after")]


async def test_a_restarted_generation_shows_one_answer() -> None:
    class Reclaimed(Failing):
        """A remote generation whose worker died after two words; another started over."""

        async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
            for delta in (TokenDelta("half "), TokenDelta("said "),
                          TokenDelta("The ", restart=True), TokenDelta("answer."),
                          TokenDelta("", "stop")):
                yield delta

    async with engine_with(Reclaimed()) as engine:
        events = await events_of(engine, message("hi"))
        kinds = [e.kind for e in events]
        assert kinds == [ReplyKind.TYPING, ReplyKind.DELTA, ReplyKind.DELTA, ReplyKind.RESET,
                         ReplyKind.DELTA, ReplyKind.DELTA, ReplyKind.FINAL]
        after_reset = events[kinds.index(ReplyKind.RESET) + 1:-1]
        assert "".join(e.text for e in after_reset) == "The answer."
        assert events[-1].text == "The answer."
        assert await turns(engine) == [("user", "hi"), ("assistant", "The answer.")]


def test_reply_events_pickle_and_copy_with_or_without_metadata() -> None:
    # Events cross process boundaries (a --processes child, a remote worker's relay): the
    # shared empty metadata of an event without any must survive pickle and deepcopy as
    # itself, and stay read-only.
    import copy
    import pickle

    from core.types import NO_METADATA

    plain = ReplyEvent(ReplyKind.FINAL, "hello")
    tagged = ReplyEvent(ReplyKind.FINAL, "hello", metadata={"faq_entry": "returns"})
    for event in (plain, tagged):
        for again in (pickle.loads(pickle.dumps(event)), copy.deepcopy(event)):
            assert again == event
            assert dict(again.metadata) == dict(event.metadata)
    assert pickle.loads(pickle.dumps(plain)).metadata is NO_METADATA
    assert copy.deepcopy(plain).metadata is NO_METADATA
    assert plain.metadata == {} and len(plain.metadata) == 0 and "x" not in plain.metadata
    with pytest.raises(TypeError):
        plain.metadata["x"] = "y"  # type: ignore[index]
