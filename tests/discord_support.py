"""Shared pieces of the Discord tests: a running bot on the fake Discord, and slow generators."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from bots.discord.adapter import DiscordAdapter
from bots.testing.discord import FakeDiscord
from core.app import build_engine
from core.config import BotSettings, parse_settings
from core.engine import Engine
from core.generation.base import GenerationRequest, TokenDelta
from core.lifecycle import ServiceBase

BOT = "discordtest"
SOURCE = "config/discordtest.toml"


def make_settings(**generation: Any) -> BotSettings:
    """An echo bot with embedded memory."""
    return parse_settings(
        {"bot": {"name": BOT, "max_message_chars": 8000},
         "generation": {"backend": "echo", "max_new_tokens": 4000, **generation},
         "memory": {"backend": "embedded"}},
        source=SOURCE,
    )


def section(discord: FakeDiscord, **overrides: Any) -> dict[str, Any]:
    """An ``[adapters.discord]`` table pointing at ``discord``, with fast pacing."""
    return {"token": discord.token, "api_base_url": discord.api_base_url,
            "gateway_url": discord.gateway_url, "guild_ready_timeout": 0.05,
            "edit_interval": 0.2, "ready_timeout": 10.0, **overrides}


@dataclass
class World:
    """A guild with two channels, a thread, two users and their DMs."""

    guild: int
    general: int
    quiet: int
    thread: int
    alice: int
    bob: int
    dm: int


def build_world(discord: FakeDiscord) -> World:
    guild = discord.add_guild("club")
    general = discord.add_channel(guild, "general")
    quiet = discord.add_channel(guild, "quiet")
    thread = discord.add_thread(general, "topic")
    alice = discord.add_user("alice")
    bob = discord.add_user("bob")
    return World(guild, general, quiet, thread, alice, bob, discord.open_dm(alice))


@asynccontextmanager
async def running(
    discord: FakeDiscord, engine: Engine | None = None, settings: BotSettings | None = None,
    **overrides: Any,
) -> AsyncIterator[DiscordAdapter]:
    """``engine`` (default: an echo bot) served on ``discord`` by a started adapter."""
    settings = settings or make_settings()
    engine = engine or build_engine(settings)
    adapter = DiscordAdapter(settings, section(discord, **overrides))
    async with engine:
        await adapter.start(engine)
        try:
            yield adapter
        finally:
            await adapter.stop()


class SlowGenerator(ServiceBase):
    """Streams ``reply`` (default: the user's text) a word every ``delay`` seconds.

    With ``restart_after``, the first attempt stops after that many words and a second
    one streams the whole reply again (as a reclaimed remote job does).
    """

    def __init__(self, delay: float, reply: str | None = None,
                 restart_after: int | None = None) -> None:
        self.delay = delay
        self.reply = reply
        self.restart_after = restart_after

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        words = (self.reply or request.messages[-1].content).split(" ")
        attempts = [words[: self.restart_after], words] if self.restart_after else [words]
        for n, attempt in enumerate(attempts):
            for i, word in enumerate(attempt):
                await asyncio.sleep(self.delay)
                yield TokenDelta(word if i == 0 else " " + word, restart=n > 0 and i == 0)
        yield TokenDelta("", finish_reason="stop")


def with_generator(settings: BotSettings, generator: Any) -> Engine:
    """An engine of ``settings`` whose generator is ``generator``."""
    engine = build_engine(settings)
    engine.generator = generator
    return engine


def contents(messages: list[Any]) -> list[str]:
    return [m.content for m in messages]
