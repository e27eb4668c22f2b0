"""``parley forget``: delete everything a bot keeps about one user of one channel.

Memory (the conversations the user took part in, with their dedupe records and stored
replies, their facts and indexes), the shared moderation state (their rate window,
violation score, mute, and their audit and escalation entries) and, with the ``redis``
generation backend, the dead-lettered generation jobs of their messages. Only stores another
process can reach are covered: a bot whose memory is ``embedded`` keeps its data inside
its own ``parley run``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from core.config import BotSettings
from core.errors import ConfigError, GenerationError
from core.memory.base import UserRef, memory_backends


@runtime_checkable
class ForgetsUsers(Protocol):
    """A moderation state that can delete what it keeps about a user."""

    async def forget_user(self, user: str) -> int:
        """Delete the state of ``user`` (``{channel}:{user_id}``); how many records went."""
        ...


@dataclass(frozen=True, slots=True)
class Forgotten:
    """How many records went, by store."""

    memory: int
    moderation: int
    dead_letters: int = 0


async def forget(settings: BotSettings, channel: str, user_id: str) -> Forgotten:
    """Delete what ``settings``' bot keeps about ``user_id`` on ``channel``."""
    if settings.memory.backend == "embedded":
        raise ConfigError(
            f"{settings.source}: memory.backend: \"embedded\" keeps conversations inside "
            "the running `parley run`, out of reach of this command (use the redis backend)"
        )
    from core.moderation.moderator import make_state

    memory = memory_backends().get(settings.memory.backend,
                                   where=f"{settings.source}: memory.backend")(settings)
    await memory.start()
    try:
        in_memory = await memory.forget_user(UserRef(settings.bot.name, channel, user_id))
    finally:
        await memory.stop()
    state = make_state(settings)
    in_moderation = 0
    if isinstance(state, ForgetsUsers) and not getattr(state, "in_process", False):
        await state.start()
        try:
            in_moderation = await state.forget_user(f"{channel}:{user_id}")
        finally:
            await state.stop()
    return Forgotten(in_memory, in_moderation, await _dead_letters(settings, channel, user_id))


async def _dead_letters(settings: BotSettings, channel: str, user_id: str) -> int:
    """Delete the user's dead-lettered generation jobs (they hold whole prompts)."""
    if settings.generation.backend != "redis":
        return 0
    from core.generation.base import backend_settings
    from core.generation.fleet.jobs import QueueKeys, forget_dead_letters
    from core.generation.fleet.settings import FleetSettings
    from core.redis_client import connect, failures_as, redact

    gen = backend_settings(settings.generation, FleetSettings, source=settings.source)
    if not gen.url:
        return 0

    client = connect(gen.url, timeout=settings.memory.timeout,
                     where=f"{settings.source}: generation.url")
    try:
        async with failures_as(GenerationError, f"redis at {redact(gen.url)}",
                               "forgetting dead letters"):
            # The engine names a job's user "{channel}:{user_id}" and its tenant the bot.
            return await forget_dead_letters(client, QueueKeys(gen.queue), settings.bot.name,
                                             f"{channel}:{user_id}")
    finally:
        await client.aclose()
