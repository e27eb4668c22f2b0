"""The plugin API: what a plugin can add to a bot, and the services it is handed.

A plugin is a module (or a ``parley.plugins`` entry point) with
``setup(registry: Plugin, config) -> None``; importing it registers nothing. ``config``
is its ``[plugins.NAME]`` table validated by the pydantic model the module exposes as
``Config`` (None without one). Through the :class:`Plugin` handle it adds:

- commands (``/name args``), with help, usage and an admin-only flag;
- pre-hooks, run on each message before the model: answer it (:class:`Reply`), add
  context for the model (:class:`AddContext`), or stay silent and store nothing
  (:data:`SILENT`);
- post-hooks, run in the background after a reply is stored;
- context providers, whose text goes into the prompt within a token budget;
- its own start/stop code and background tasks, and services: storage, outbound
  ``send``, pause/resume per conversation, linked accounts, forgetting a user.

Plugins are contained: a failure is logged and counted with the plugin's name and the
user gets a short apology (see the engine). Loading is in :mod:`core.plugin_loader`.

This module is the plugin API's one import: the registry and a plugin's handle live
here, the handlers' vocabulary in :mod:`core.plugin_types` and the services in
:mod:`core.plugin_services`, re-exported below.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import shlex
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from core.errors import ParleyError
from core.forget import ForgetsUsers, conversation_refs
from core.lifecycle import ServiceBase
from core.memory.base import UserRef
from core.plugin_services import Bucket, PluginServices, Storage
from core.plugin_types import (
    APP,
    SILENT,
    AddContext,
    Caller,
    Command,
    CommandContext,
    CommandError,
    CommandHandler,
    ContextProvider,
    Exchange,
    ForgetHook,
    Hooked,
    Lifecycle,
    PostHook,
    PreHook,
    PreHookResult,
    Reply,
    Route,
    RouteHandler,
    SignalHandler,
    Silence,
)
from core.types import ConversationKey, IncomingMessage

__all__ = [
    "APP", "SILENT", "AddContext", "Caller", "Command", "CommandContext", "CommandError",
    "CommandHandler", "ContextProvider", "Exchange", "ForgetHook", "Hooked", "Lifecycle",
    "Plugin", "PluginRegistry", "PluginServices", "PluginStartError", "PostHook", "PreHook",
    "PreHookResult", "Reply", "Route", "RouteHandler", "SignalHandler", "Silence",
]

log = logging.getLogger(__name__)


class Plugin:
    """One plugin's handle: what ``setup(registry, config)`` receives as ``registry``."""

    def __init__(self, registry: PluginRegistry, name: str) -> None:
        self.registry = registry
        self.name = name
        self.services = registry.services
        self.storage = Storage(self.services.store, name, self.services.conversation_ttl)
        self._starts: list[Lifecycle] = []
        self._stops: list[Lifecycle] = []
        self._tasks: set[asyncio.Task[None]] = set()

    # -- what a plugin adds ---------------------------------------------------------
    def add_command(self, name: str, handler: CommandHandler, help: str = "", *,
                    usage: str = "", admin: bool = False) -> None:
        """Answer ``/name args`` with ``handler``. ``usage`` documents the arguments
        (``"NdM"``); ``admin=True`` limits it to the channel's admins."""
        self.registry._add_command(Command(
            name, handler, help or (inspect.getdoc(handler) or ""), usage, admin, self.name))

    def command(self, name: str, help: str = "", *, usage: str = "",
                admin: bool = False) -> Callable[[CommandHandler], CommandHandler]:
        """Decorator form of :meth:`add_command`."""

        def decorate(handler: CommandHandler) -> CommandHandler:
            self.add_command(name, handler, help, usage=usage, admin=admin)
            return handler

        return decorate

    def add_pre_hook(self, hook: PreHook, *, when_paused: bool = False) -> None:
        """Run ``hook`` on each message before the model (see the module docstring).
        While the bot is paused in a conversation only hooks with ``when_paused`` run."""
        self.registry._pre_hooks.append(Hooked(self.name, hook, when_paused))
        if when_paused:
            self.registry.checks_pauses = True

    def add_post_hook(self, hook: PostHook) -> None:
        """Run ``hook(exchange)`` in the background after a reply is stored."""
        self.registry._post_hooks.append(Hooked(self.name, hook))

    def add_context_provider(self, provider: ContextProvider, *,
                             max_tokens: int | None = None) -> None:
        """Add what ``provider`` returns to the prompt (cut to ``max_tokens`` and to
        what is left of ``[plugins] context_tokens``)."""
        self.registry._providers.append(Hooked(self.name, provider, max_tokens=max_tokens))

    def add_route(self, method: str, path: str, handler: RouteHandler) -> None:
        """Serve ``method path`` (aiohttp's ``{name}`` placeholders) on the web channel's
        server with ``handler(request, caller)``; the server's API keys apply to it."""
        self.registry._routes.append(Route(method.upper(), path, handler, self.name))

    def on_forget(self, hook: ForgetHook) -> None:
        """Call ``hook(channel, user_id)`` when a user asks to be forgotten, to delete
        what this plugin keeps about them beyond :meth:`Storage.user` (which goes anyway)."""
        self.registry._forget_hooks.append(Hooked(self.name, hook))

    def on(self, signal: str, handler: SignalHandler) -> None:
        """Call ``handler(message, data)`` whenever a plugin emits ``signal`` (e.g. the FAQ's
        ``faq.miss``); names are ``plugin.event`` by convention."""
        self.registry._signals.setdefault(signal, []).append(Hooked(self.name, handler))

    async def emit(self, signal: str, message: IncomingMessage,
                   data: Mapping[str, Any] | None = None) -> None:
        """Tell the plugins listening to ``signal`` (see :meth:`on`)."""
        await self.registry.emit(signal, message, data or {})

    def on_start(self, fn: Lifecycle) -> None:
        """Run ``fn`` when the bot starts (open clients, start tasks)."""
        self._starts.append(fn)

    def on_stop(self, fn: Lifecycle) -> None:
        """Run ``fn`` when the bot stops, in reverse order of registration."""
        self._stops.append(fn)

    # -- services -------------------------------------------------------------------
    def spawn(self, coro: Awaitable[None], what: str = "task") -> asyncio.Task[None]:
        """Run ``coro`` in the background; cancelled when the bot stops, a failure is
        logged and counted with this plugin's name."""
        task = asyncio.ensure_future(self.registry.contained(self.name, what, coro))
        self._tasks.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            if inspect.iscoroutine(coro):
                coro.close()  # cancelled before it ever ran: no "never awaited" warning

        task.add_done_callback(done)
        return task

    async def send(self, key: ConversationKey, text: str) -> None:
        """Send ``text`` into a conversation on any channel an adapter serves."""
        await self.services.outbox.send(key, text)

    async def pause(self, key: ConversationKey, reason: str = "") -> None:
        """Stop the bot answering in ``key`` (across front ends, until :meth:`resume`)."""
        self.registry.checks_pauses = True
        await self.services.pauses.pause(key, by=self.name, reason=reason)

    async def resume(self, key: ConversationKey) -> bool:
        """Let the bot answer in ``key`` again; whether it was paused."""
        return await self.services.pauses.resume(key)

    async def paused(self, key: ConversationKey) -> bool:
        """Whether the bot is paused in ``key``."""
        return await self.services.pauses.paused(key) is not None

    def conversation_state(self, key: ConversationKey) -> Bucket:
        """This plugin's state for one conversation (:meth:`Storage.conversation`)."""
        return self.storage.conversation(key)

    def path(self, relative: str) -> Path:
        """A path from this plugin's config, resolved against the bot file's folder."""
        candidate = Path(relative).expanduser()
        return candidate if candidate.is_absolute() else self.services.base_dir / candidate

    def uses_pauses(self) -> None:
        """Declare that this plugin pauses conversations, so the engine checks pauses."""
        self.registry.checks_pauses = True


class PluginRegistry(ServiceBase):
    """Everything the plugins contributed to one bot, and their lifecycle.

    Starting it starts the plugins' storage, then each plugin's ``on_start`` in load
    order; stopping cancels their tasks and runs ``on_stop`` in reverse.
    """

    def __init__(self, services: PluginServices | None = None, *,
                 context_tokens: int = 512,
                 on_failure: Callable[[str, str, BaseException], None] | None = None) -> None:
        self.services = services or PluginServices()
        self.context_tokens = context_tokens
        self.checks_pauses = False
        self._on_failure = on_failure
        self._plugins: dict[str, Plugin] = {}
        self._commands: dict[str, Command] = {}
        self._pre_hooks: list[Hooked[PreHook]] = []
        self._post_hooks: list[Hooked[PostHook]] = []
        self._providers: list[Hooked[ContextProvider]] = []
        self._forget_hooks: list[Hooked[ForgetHook]] = []
        self._signals: dict[str, list[Hooked[SignalHandler]]] = {}
        self._routes: list[Route] = []
        self._app = Plugin(self, APP)

    def plugin(self, name: str) -> Plugin:
        """The handle of plugin ``name`` (created on first use; names are unique)."""
        if name == APP:
            return self._app
        handle = self._plugins.get(name)
        if handle is None:
            handle = self._plugins[name] = Plugin(self, name)
        return handle

    @property
    def plugin_names(self) -> list[str]:
        """The plugins loaded, in load order."""
        return list(self._plugins)

    # The registry's own registration methods register for the application itself.
    def add_command(self, name: str, handler: CommandHandler, help: str = "", *,
                    usage: str = "", admin: bool = False) -> None:
        """:meth:`Plugin.add_command`, owned by the application."""
        self._app.add_command(name, handler, help, usage=usage, admin=admin)

    def command(self, name: str, help: str = "") -> Callable[[CommandHandler], CommandHandler]:
        """:meth:`Plugin.command`, owned by the application."""
        return self._app.command(name, help)

    def add_pre_hook(self, hook: PreHook) -> None:
        """:meth:`Plugin.add_pre_hook`, owned by the application."""
        self._app.add_pre_hook(hook)

    def add_context_provider(self, provider: ContextProvider) -> None:
        """:meth:`Plugin.add_context_provider`, owned by the application."""
        self._app.add_context_provider(provider)

    def _add_command(self, command: Command) -> None:
        key = command.name.lower().lstrip("/")
        if not key.isidentifier():
            raise ValueError(f"command name {command.name!r} must be a word")
        if key in self._commands:
            raise ValueError(f"command /{key} is already registered "
                             f"(by {self._commands[key].plugin})")
        self._commands[key] = Command(key, command.handler, command.help, command.usage,
                                      command.admin, command.plugin)

    @property
    def commands(self) -> Sequence[Command]:
        """The registered commands, by name."""
        return [self._commands[name] for name in sorted(self._commands)]

    @property
    def pre_hooks(self) -> Sequence[Hooked[PreHook]]:
        """The pre-hooks, in registration order."""
        return tuple(self._pre_hooks)

    @property
    def post_hooks(self) -> Sequence[Hooked[PostHook]]:
        """The post-hooks, in registration order."""
        return tuple(self._post_hooks)

    @property
    def context_providers(self) -> Sequence[Hooked[ContextProvider]]:
        """The context providers, in registration order."""
        return tuple(self._providers)

    @property
    def routes(self) -> Sequence[Route]:
        """The plugins' HTTP routes, in registration order."""
        return tuple(self._routes)

    def match_command(self, text: str) -> tuple[Command, str] | None:
        """The command ``text`` invokes and its argument text, or None.

        ``/name@botname args`` (Telegram's form in groups) is accepted.
        """
        name, args = _command_parts(text)
        command = self._commands.get(name) if name else None
        return (command, args) if command else None

    @staticmethod
    def looks_like_command(text: str) -> bool:
        """Whether ``text`` is shaped like a command (``/word ...``), known or not."""
        return _command_parts(text)[0] is not None

    def is_admin(self, channel: str, user_id: str) -> bool:
        """Whether ``user_id`` is an admin of ``channel`` (``[plugins] admins``)."""
        return user_id in self.services.admins.get(channel, ())

    @staticmethod
    def split_args(args: str) -> tuple[str, ...]:
        """``args`` split like a shell would; unbalanced quotes split on spaces."""
        try:
            return tuple(shlex.split(args))
        except ValueError:
            return tuple(args.split())

    async def forget_user(self, channel: str, user_id: str) -> int:
        """Delete everything the bot keeps about a user and every account linked to it
        (see :meth:`forget_user_by_store`); how many records went."""
        return sum((await self.forget_user_by_store(channel, user_id)).values())

    async def forget_user_by_store(self, channel: str, user_id: str) -> dict[str, int]:
        """Delete everything the bot keeps about a user and every account linked to it:
        what plugins' forget hooks delete, every plugin's per-user storage, what the
        hooks of the bot's forget service delete (adapters' stores; see
        :mod:`core.forget`), plugins' state of the conversations they took part in, memory,
        the moderation state, their links. Returns how many records went, by store."""
        services = self.services
        identities = await services.accounts.linked((channel, user_id))
        state = getattr(services.moderator, "state", None)
        counts: Counter[str] = Counter()
        for who_channel, who in identities:
            user = UserRef(services.bot, who_channel, who)
            for hook in self._forget_hooks:
                counts["plugins"] += await hook.fn(who_channel, who)
            counts["plugins"] += await services.store.drop(*(
                self.plugin(name).storage.user(who_channel, who).name
                for name in [APP, *self._plugins]))
            # The hooks learn the user's conversations from memory, which forgets last.
            memory = services.memory
            conversations = await memory.conversations(user) if memory is not None else []
            counts.update(await services.forgetting.run(user, conversations))
            # Plugins' state of those conversations goes with them (and any pause).
            counts["plugins"] += await services.store.drop(*(
                self.plugin(name).storage.conversation(key).name
                for name in [APP, *self._plugins] for key in conversations))
            for key in conversations:
                counts["plugins"] += int(await services.pauses.resume(key))
            if memory is not None:
                counts["memory"] += await memory.forget_user(user)
            if isinstance(state, ForgetsUsers):
                counts["moderation"] += await state.forget_user(
                    f"{who_channel}:{who}", conversation_refs(conversations))
        counts["links"] += await services.accounts.unlink(identities)
        return dict(counts)

    async def emit(self, signal: str, message: IncomingMessage, data: Mapping[str, Any]) -> None:
        """Call every handler of ``signal`` (see :meth:`Plugin.on`), each contained."""
        for hooked in self._signals.get(signal, ()):
            await self.contained(hooked.plugin, f"signal {signal}", hooked.fn(message, data))

    async def contained(self, plugin: str, what: str, coro: Awaitable[None]) -> None:
        """Await ``coro``; a failure is logged and counted with the plugin's name."""
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.failed(plugin, what, exc)

    def failed(self, plugin: str, what: str, exc: BaseException) -> None:
        """Report a plugin's failure (log line, and the metric the engine counts)."""
        # The exception's type, not its text: it may quote the user's message.
        timed_out = isinstance(exc, TimeoutError)
        log.error("bot %s: plugin %s: %s failed (%s)", self.services.bot, plugin, what,
                  "timed out" if timed_out else type(exc).__name__,
                  exc_info=None if timed_out else (type(exc), exc, exc.__traceback__))
        if self._on_failure is not None:
            self._on_failure(plugin, what, exc)

    async def _start(self) -> None:
        await self.services.store.start()
        for handle in [self._app, *self._plugins.values()]:
            for fn in handle._starts:
                try:
                    await fn()
                except Exception as exc:
                    raise PluginStartError(f"plugin {handle.name}: start failed: "
                                           f"{type(exc).__name__}: {exc}") from exc

    async def _stop(self) -> None:
        try:
            for handle in reversed([self._app, *self._plugins.values()]):
                for task in list(handle._tasks):
                    task.cancel()
                if handle._tasks:
                    await asyncio.gather(*handle._tasks, return_exceptions=True)
                for fn in reversed(handle._stops):
                    try:
                        await fn()
                    except Exception as exc:
                        self.failed(handle.name, "stop", exc)
        finally:
            await self.services.store.stop()


class PluginStartError(ParleyError):
    """A plugin's start code failed; the bot does not start."""


def _command_parts(text: str) -> tuple[str | None, str]:
    if not text.startswith("/"):
        return None, ""
    head, _, args = text[1:].partition(" ")
    name = head.split("@", 1)[0].lower()
    # "/path/to/file" or "/ hello" is not a command: it goes to the model.
    return (name if name.isidentifier() else None), args.strip()
