"""A chat harness for bot authors' tests: the real engine, no model, throwaway memory.

    from core.testing import ChatHarness, ScriptedGenerator

    async def test_roll() -> None:
        async with ChatHarness.from_file("bot.toml") as bot:
            reply = await bot.send("/roll 2d6", user="u1")
            assert reply.kind == "notice"

The harness loads the bot's file (plugins, their tables, moderation, admins), then runs
it on the echo generator (the user's words come back) or a :class:`ScriptedGenerator`,
with embedded memory unless told ``memory_url`` (and ``key_prefix``). Messages the bot
sends on its own (``send(conversation, text)``) are kept in :attr:`ChatHarness.outbox`.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from core.app import build_engine
from core.config import BotSettings, load_settings, parse_settings
from core.engine import Engine
from core.generation.base import GenerationRequest, TokenDelta
from core.lifecycle import ServiceBase
from core.types import ConversationKey, IncomingMessage, ReplyEvent, ReplyKind


class ScriptedGenerator(ServiceBase):
    """A generator that answers with scripted text: a list of replies used in turn (the
    last one repeats), or a function of the request. It keeps every request it got."""

    def __init__(self, replies: Sequence[str] | Callable[[GenerationRequest], str]) -> None:
        self._replies = replies
        self._count = 0
        self.requests: list[GenerationRequest] = []

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        """The scripted reply, word by word."""
        self.requests.append(request)
        if callable(self._replies):
            text = self._replies(request)
        else:
            text = self._replies[min(self._count, len(self._replies) - 1)]
        self._count += 1
        words = text.split(" ")
        for i, word in enumerate(words):
            yield TokenDelta(word if i == 0 else " " + word,
                             finish_reason="stop" if i == len(words) - 1 else None)


@dataclass(frozen=True, slots=True)
class ChatReply:
    """The events the engine yielded for one message, and handy views of the last one."""

    events: tuple[ReplyEvent, ...]

    @property
    def last(self) -> ReplyEvent:
        """The event that ended the stream."""
        return self.events[-1]

    @property
    def text(self) -> str:
        """What the user finally sees."""
        return self.last.text

    @property
    def kind(self) -> str:
        """``final``, ``notice`` or ``error``."""
        return self.last.kind.value

    @property
    def code(self) -> str | None:
        """The last event's code (``command``, ``unknown_command``, ``silent``, ...)."""
        return self.last.code

    @property
    def metadata(self) -> Mapping[str, str]:
        """The last event's metadata (e.g. ``faq_entry``)."""
        return self.last.metadata

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True)
class Sent:
    """A message the bot sent on its own (through the outbox)."""

    key: ConversationKey
    text: str


@dataclass
class ChatHarness:
    """One bot, started, to chat with in a test (``async with``)."""

    engine: Engine
    channel: str = "test"
    outbox: list[Sent] = field(default_factory=list)

    @classmethod
    def from_settings(
        cls, settings: BotSettings, *, generator: ScriptedGenerator | None = None,
        channel: str = "test", channels: Sequence[str] = (),
    ) -> ChatHarness:
        """A harness for already-validated ``settings`` (used as they are)."""
        engine = build_engine(settings)
        if generator is not None:
            engine.generator = generator
            engine.plugins.services.generator = generator
        harness = cls(engine, channel)
        for name in {channel, *channels}:
            engine.plugins.services.outbox.register(name, harness._deliver)
        return harness

    @classmethod
    def from_file(
        cls, path: str | Path, *, generator: ScriptedGenerator | None = None,
        memory_url: str | None = None, key_prefix: str | None = None, channel: str = "test",
        channels: Sequence[str] = (), env: Mapping[str, str] | None = None,
        **overrides: Mapping[str, Any],
    ) -> ChatHarness:
        """The bot in ``path`` on the echo (or ``generator``), with embedded memory (or
        Redis at ``memory_url``); ``overrides`` replace whole sections, e.g.
        ``plugins={...}``."""
        settings = load_settings(path, env=env)
        return cls.from_settings(
            _test_settings(settings, memory_url, key_prefix, overrides), generator=generator,
            channel=channel, channels=channels)

    @classmethod
    def from_dict(
        cls, raw: Mapping[str, Any], *, source: str = "<test>",
        generator: ScriptedGenerator | None = None, memory_url: str | None = None,
        key_prefix: str | None = None, channel: str = "test", channels: Sequence[str] = (),
    ) -> ChatHarness:
        """The bot described by ``raw`` (a parsed TOML mapping; ``source`` is its file,
        for relative paths), on the echo (or ``generator``) and test memory."""
        settings = parse_settings(raw, source=source)
        return cls.from_settings(_test_settings(settings, memory_url, key_prefix, {}),
                                 generator=generator, channel=channel, channels=channels)

    async def __aenter__(self) -> Self:
        await self.engine.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.engine.stop()

    async def send(self, text: str, *, user: str = "u1", conversation: str | None = None,
                   channel: str | None = None, user_name: str | None = None) -> ChatReply:
        """Send ``text`` as ``user`` (into their own conversation unless one is named)
        and return every reply event."""
        channel = channel or self.channel
        message = IncomingMessage(
            bot=self.engine.name, channel=channel, conversation_id=conversation or user,
            user_id=user, message_id=uuid.uuid4().hex, text=text,
            user_name=user_name)
        events = [event async for event in self.engine.handle(message)]
        return ChatReply(tuple(events))

    async def _deliver(self, key: ConversationKey, text: str) -> None:
        self.outbox.append(Sent(key, text))


def _test_settings(settings: BotSettings, memory_url: str | None, key_prefix: str | None,
                   overrides: Mapping[str, Mapping[str, Any]]) -> BotSettings:
    data = settings.model_dump(exclude={"source"})
    data["plugins"] = {**settings.plugins.model_dump(), **settings.plugins.tables}
    if data["generation"]["backend"] != "echo":
        data["generation"] = {"backend": "echo", "max_new_tokens": 256}
    data["memory"]["backend"] = "redis" if memory_url else "embedded"
    if memory_url:
        data["memory"]["url"] = memory_url
    if key_prefix:
        data["memory"]["key_prefix"] = key_prefix
    data.update({k: dict(v) for k, v in overrides.items()})
    data["adapters"] = {}
    return parse_settings(data, source=settings.source, env={})


__all__ = ["ChatHarness", "ChatReply", "ReplyKind", "ScriptedGenerator", "Sent"]
