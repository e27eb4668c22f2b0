"""Assembling a bot from its settings, and running its adapters until told to stop."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from aiohttp import web

from core import commands
from core.config import BotSettings
from core.engine import Engine, plugin_failure_counter
from core.errors import ConfigError, ParleyError
from core.generation.base import generator_backends
from core.lifecycle import stop_signals
from core.memory.base import memory_backends
from core.metrics import Metrics
from core.moderation.base import moderators
from core.plugin_loader import load_plugins
from core.plugin_store import bucket_stores
from core.plugins import PluginRegistry, PluginServices
from core.redis_client import RedisHub, SharesRedis
from core.registry import Registry

log = logging.getLogger(__name__)


class Adapter(Protocol):
    """A channel: turns platform events into ``engine.handle`` calls and renders replies.

    ``start`` returns once the adapter is serving; it must never block the engine.
    ``wait`` returns when the adapter has finished on its own (an interactive terminal
    closed by its user); adapters that only stop when told never return from it.
    """

    async def start(self, engine: Engine) -> None:
        """Begin serving ``engine``."""

    async def stop(self) -> None:
        """Stop serving; idempotent."""

    async def wait(self) -> None:
        """Return when the adapter has finished by itself."""


AdapterFactory = Callable[[BotSettings, Mapping[str, Any]], Adapter]


@runtime_checkable
class RouteProvider(Protocol):
    """An adapter with HTTP routes for the bot's web server to serve (e.g. a webhook)."""

    def http_routes(self) -> Sequence[web.RouteDef]:
        """The routes; empty if the adapter needs none as configured."""


@runtime_checkable
class RouteHost(Protocol):
    """An adapter that runs the bot's HTTP server and serves other adapters' routes."""

    def mount(self, routes: Sequence[web.RouteDef]) -> None:
        """Serve ``routes`` too, from the next start on."""


def adapter_registry() -> Registry[AdapterFactory]:
    """Adapters by name, from the ``parley.adapters`` entry points (bots/ registers them)."""
    return Registry("adapter", "parley.adapters")


def build_engine(settings: BotSettings, *, metrics: Metrics | None = None) -> Engine:
    """An engine with the memory, generator, moderator and plugins ``settings`` name.

    Its parts that talk to Redis share one connection and pipeline per URL (a
    :class:`~core.redis_client.RedisHub`, also ``engine.redis`` for the adapters), so a
    loop turn's memory, moderation, plugin-storage and reply-log calls go out in one write.
    """
    src = settings.source
    memory = memory_backends().get(settings.memory.backend, where=f"{src}: memory.backend")
    generator = generator_backends().get(
        settings.generation.backend, where=f"{src}: generation.backend"
    )
    moderator = moderators().get(settings.moderation.backend, where=f"{src}: moderation.backend")
    store = bucket_stores().get(settings.memory.backend, where=f"{src}: memory.backend")
    metrics = metrics or Metrics()
    parts = (memory(settings), generator(settings), moderator(settings))
    storage = store(settings)
    redis = RedisHub()
    for part in (*parts, storage):
        if isinstance(part, SharesRedis):
            part.share_redis(redis)
    services = PluginServices(
        bot=settings.bot.name, store=storage, memory=parts[0], generator=parts[1],
        moderator=parts[2], base_dir=_base_dir(src), conversation_ttl=settings.memory.ttl,
        window=settings.memory.window, admins=settings.plugins.admins, metrics=metrics,
    )
    plugins = PluginRegistry(services, context_tokens=settings.plugins.context_tokens,
                             on_failure=plugin_failure_counter(metrics, settings.bot.name))
    commands.setup(plugins)
    load_plugins(plugins, settings.plugins, source=src)
    return Engine(
        settings, memory=parts[0], generator=parts[1], moderator=parts[2], plugins=plugins,
        metrics=metrics, redis=redis,
    )


def _base_dir(source: str) -> Path:
    """The folder of the bot's file: plugin and data paths are relative to it."""
    return Path.cwd() if source.startswith("<") else Path(source).parent.resolve()


def build_adapters(settings: BotSettings, names: Sequence[str] | None = None) -> list[Adapter]:
    """The adapters configured under ``[adapters.NAME]`` (or just ``names``)."""
    registry = adapter_registry()
    chosen = list(names) if names is not None else list(settings.adapters)
    if not chosen:
        raise ConfigError(f"{settings.source}: adapters: no adapter configured")
    adapters = {
        name: registry.get(name, where=f"{settings.source}: adapters.{name}")(
            settings, settings.adapters.get(name, {})
        )
        for name in chosen
    }
    _mount_routes(settings, adapters)
    return list(adapters.values())


def _mount_routes(settings: BotSettings, adapters: Mapping[str, Adapter]) -> None:
    """Give the routes adapters offer (webhooks) to the adapter serving HTTP."""
    offered = {
        name: routes
        for name, adapter in adapters.items()
        if isinstance(adapter, RouteProvider) and (routes := adapter.http_routes())
    }
    if not offered:
        return
    hosts = [adapter for adapter in adapters.values() if isinstance(adapter, RouteHost)]
    if not hosts:
        name = next(iter(offered))
        raise ConfigError(
            f"{settings.source}: adapters.{name}: needs an HTTP server for its routes: "
            "configure [adapters.web] too"
        )
    for routes in offered.values():
        hosts[0].mount(routes)


class AdapterFailed(ParleyError):
    """An adapter stopped with an error while serving; ``parley run`` exits with it."""


async def serve(engine: Engine, adapters: Sequence[Adapter], *,
                freeze_heap: bool = False) -> None:
    """Run ``adapters`` on ``engine`` until SIGINT/SIGTERM or one of them finishes.

    Starts the engine, then the adapters in order; stops them in reverse order, engine
    last, whatever happened (a failed start undoes the starts before it). An adapter
    whose ``wait`` raises (its serving task crashed) stops them all and raises
    :class:`AdapterFailed`, instead of the process serving on without it.

    ``freeze_heap`` (for a process that only serves, as ``parley run``): once everything
    has started, what start-up built is moved out of the garbage collector's sight
    (:func:`freeze_startup_heap`).
    """
    started: list[Adapter] = []
    async with stop_signals() as stop, engine:
        try:
            for adapter in adapters:
                await adapter.start(engine)
                started.append(adapter)
            if freeze_heap:
                freeze_startup_heap()
            waiters: dict[asyncio.Future[Any], Adapter] = {
                asyncio.ensure_future(a.wait()): a for a in started}
            stopper: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
            try:
                done, _ = await asyncio.wait([stopper, *waiters],
                                             return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (stopper, *waiters):
                    task.cancel()
            for task in done:
                failed = waiters.get(task)
                error = None if failed is None or task.cancelled() else task.exception()
                if error is not None:
                    name = type(failed).__name__
                    log.error("adapter %s failed", name, exc_info=error)
                    raise AdapterFailed(f"adapter {name} failed: {type(error).__name__}")
        finally:
            for adapter in reversed(started):
                try:
                    await adapter.stop()
                except Exception:
                    log.exception("stopping adapter %r failed", adapter)


def freeze_startup_heap() -> int:
    """Collect once, then exclude every object alive now from later collections
    (:func:`gc.freeze`); returns how many were frozen.

    What start-up builds lives as long as the process: the moderation model's weights
    (hundreds of thousands of tuples), the term and pattern tables, the plugins. Without
    this, every full collection walks all of it again: on the pipeline benchmark about
    one a second, 24-31 ms each, with every message in flight waiting (a p99 of its own).
    After it, full collections take a few milliseconds.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
