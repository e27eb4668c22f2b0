"""Forgetting a user: the contract every store of user data signs, and ``parley forget``.

What a bot keeps about a user lives in many places: memory (the conversations they took
part in, their facts), the moderation audit log, plugins' storage and linked accounts, an
adapter's own stores (the web widget's reply logs and feedback), dead-lettered
generation jobs. Nothing here knows their keys. Each part registers a
:data:`UserDataHook` with the bot's :class:`Forgetting` (adapters when they start, see
:class:`KeepsUserData` for ``parley forget``); the plugin registry's ``forget_user``
runs them for a user and every account linked to it, before memory forgets the
conversations the hooks were told about.

Moderation's enforcement is not the user's data to erase: a mute, the violation score
and the flood windows (which hold no text) outlive a forget until they expire, so that
``/forget`` is no way out of a mute or a limit (see ``docs/guarantees.md``).

``parley forget CONFIG --channel C --user U`` builds the same parts without running the
bot (plugins are set up, not started; adapters are constructed, not started) and calls
the same ``forget_user``. Only stores another process can reach are covered: a bot whose
memory is ``embedded`` keeps its data inside its own ``parley run``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from core.config import BotSettings
from core.errors import ConfigError, GenerationError
from core.memory.base import UserRef, memory_backends
from core.types import ConversationKey

# (the user, the conversations they took part in that memory still keeps) -> records gone
UserDataHook = Callable[[UserRef, Sequence[ConversationKey]], Awaitable[int]]


@runtime_checkable
class ForgetsUsers(Protocol):
    """A moderation state that can delete what it keeps about a user."""

    async def forget_user(self, user: str, conversations: Sequence[str] = ()) -> int:
        """Delete the records of ``user`` (``{channel}:{user_id}``) and of the
        ``conversations`` (``{channel}:{conversation_id}``) they took part in; how many
        went. What enforces the limits (a mute, the violation score, flood windows) is
        kept until it expires: forgetting must not lift a mute."""
        ...


class UserData(Protocol):
    """Stores of an adapter's own that hold user data, opened for forgetting."""

    async def start(self) -> None:
        """Connect."""

    async def stop(self) -> None:
        """Disconnect."""

    async def forget_user(self, user: UserRef, conversations: Sequence[ConversationKey]) -> int:
        """A :data:`UserDataHook`: delete what is kept about ``user`` and ``conversations``."""


@runtime_checkable
class KeepsUserData(Protocol):
    """An adapter that keeps user data outside memory. When running it registers a hook
    with ``engine.plugins.services.forgetting``; for ``parley forget`` it hands out
    its stores instead."""

    def user_data(self) -> UserData | None:
        """Its stores, reachable from another process (None: nothing out of process)."""


class Forgetting:
    """The bot's forget service: named hooks, run in registration order."""

    def __init__(self) -> None:
        self._hooks: dict[str, UserDataHook] = {}

    def register(self, name: str, hook: UserDataHook) -> Callable[[], None]:
        """Run ``hook`` whenever a user is forgotten; returns the undo."""
        if name in self._hooks:
            raise ValueError(f"a forget hook named {name!r} is registered already")
        self._hooks[name] = hook

        def unregister() -> None:
            if self._hooks.get(name) is hook:
                del self._hooks[name]

        return unregister

    async def run(self, user: UserRef,
                  conversations: Sequence[ConversationKey]) -> dict[str, int]:
        """Every hook for ``user``; records gone by hook name."""
        return {name: await hook(user, conversations) for name, hook in self._hooks.items()}


@dataclass(frozen=True, slots=True)
class Forgotten:
    """How many records went, by store."""

    by_store: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Records gone in all."""
        return sum(self.by_store.values())


async def forget(settings: BotSettings, channel: str, user_id: str) -> Forgotten:
    """Delete what ``settings``' bot keeps about ``user_id`` on ``channel`` (and every
    account linked to it)."""
    if settings.memory.backend == "embedded":
        raise ConfigError(
            f"{settings.source}: memory.backend: \"embedded\" keeps conversations inside "
            "the running `parley run`, out of reach of this command (use the redis backend)"
        )
    from core.app import _base_dir, build_adapters
    from core.moderation.moderator import make_state
    from core.plugin_loader import load_plugins
    from core.plugin_store import bucket_stores
    from core.plugins import PluginRegistry, PluginServices

    src = settings.source
    memory = memory_backends().get(settings.memory.backend, where=f"{src}: memory.backend")
    store = bucket_stores().get(settings.memory.backend, where=f"{src}: memory.backend")
    services = PluginServices(bot=settings.bot.name, store=store(settings),
                              memory=memory(settings), base_dir=_base_dir(src),
                              conversation_ttl=settings.memory.ttl)
    registry = PluginRegistry(services)
    load_plugins(registry, settings.plugins, source=src)  # their forget hooks; not started
    parts: list[UserData] = [services.store, services.memory]  # type: ignore[list-item]
    state = make_state(settings)
    if isinstance(state, ForgetsUsers) and not getattr(state, "in_process", False):
        parts.append(state)  # type: ignore[arg-type]
        services.forgetting.register("moderation", lambda user, conversations: state.forget_user(
            f"{user.channel}:{user.user_id}", conversation_refs(conversations)))
    services.forgetting.register("dead_letters", lambda user, _: _dead_letters(
        settings, user.channel, user.user_id))
    adapters = build_adapters(settings) if settings.adapters else []
    for name, adapter in zip(settings.adapters, adapters, strict=True):
        data = adapter.user_data() if isinstance(adapter, KeepsUserData) else None
        if data is not None:
            parts.append(data)
            services.forgetting.register(f"adapters.{name}", data.forget_user)
    async with AsyncExitStack() as stack:
        for part in parts:
            await part.start()
            stack.push_async_callback(part.stop)
        return Forgotten(await registry.forget_user_by_store(channel, user_id))


def conversation_refs(conversations: Sequence[ConversationKey]) -> list[str]:
    """Conversations as moderation names them: ``{channel}:{conversation_id}``."""
    return [f"{key.channel}:{key.conversation_id}" for key in conversations]


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
