"""The plugin API: commands, pre-hooks and context providers, and how plugins are loaded.

A plugin is a module with ``setup(registry: PluginRegistry) -> None``. Importing it
must register nothing; Parley calls ``setup`` for the modules named in the bot's
``[plugins] modules`` and for every ``parley.plugins`` entry point not disabled there.

Plugins are contained: the engine calls each command, pre-hook and context provider
under ``[plugins] timeout``; a failure is logged and counted with the plugin's name
(:meth:`PluginRegistry.plugin_of`) and the user gets a short apology.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from core.errors import ConfigError
from core.types import IncomingMessage

if TYPE_CHECKING:
    from core.memory.base import MemoryStore

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CommandContext:
    """What a command handler gets: the message, the text after the command, the memory."""

    message: IncomingMessage
    args: str
    memory: MemoryStore
    registry: PluginRegistry


CommandHandler = Callable[[CommandContext], Awaitable[str]]
PreHook = Callable[[IncomingMessage], Awaitable[str | None]]
ContextProvider = Callable[[IncomingMessage], Awaitable[str | None]]


@dataclass(frozen=True, slots=True)
class Command:
    """A ``/name`` the bot answers itself, without the model."""

    name: str
    handler: CommandHandler
    help: str


class PluginRegistry:
    """Everything plugins contributed to one bot."""

    def __init__(self) -> None:
        self._commands: dict[str, Command] = {}
        self._pre_hooks: list[PreHook] = []
        self._context_providers: list[ContextProvider] = []
        # Which plugin registered each callable, so a failure names its plugin.
        self._owners: dict[object, str] = {}
        self._loading: str | None = None

    @contextmanager
    def loading(self, plugin: str) -> Iterator[None]:
        """Attribute what is registered inside the block to ``plugin``."""
        previous, self._loading = self._loading, plugin
        try:
            yield
        finally:
            self._loading = previous

    def _own(self, target: object) -> None:
        if self._loading is not None:
            self._owners[target] = self._loading

    def plugin_of(self, target: object) -> str:
        """The name of the plugin that registered ``target`` (or its qualified name)."""
        owner = self._owners.get(target)
        if owner is not None:
            return owner
        module = getattr(target, "__module__", None) or "?"
        return f"{module}.{getattr(target, '__qualname__', type(target).__name__)}"

    def add_command(self, name: str, handler: CommandHandler, help: str = "") -> None:
        """Answer ``/name ...`` with ``handler``; names are case-insensitive and unique."""
        key = name.lower().lstrip("/")
        if not key.isidentifier():
            raise ValueError(f"command name {name!r} must be a word")
        if key in self._commands:
            raise ValueError(f"command /{key} is already registered")
        self._commands[key] = Command(key, handler, help or (inspect.getdoc(handler) or ""))
        self._own(handler)

    def command(
        self, name: str, help: str = ""
    ) -> Callable[[CommandHandler], CommandHandler]:
        """Decorator form of :meth:`add_command`."""

        def decorate(handler: CommandHandler) -> CommandHandler:
            self.add_command(name, handler, help)
            return handler

        return decorate

    def add_pre_hook(self, hook: PreHook) -> None:
        """Run ``hook`` on every message before the model; a string it returns is the answer."""
        self._pre_hooks.append(hook)
        self._own(hook)

    def add_context_provider(self, provider: ContextProvider) -> None:
        """Add the text ``provider`` returns to the bot's instructions for a message."""
        self._context_providers.append(provider)
        self._own(provider)

    @property
    def commands(self) -> Sequence[Command]:
        """The registered commands, by name."""
        return [self._commands[name] for name in sorted(self._commands)]

    @property
    def pre_hooks(self) -> Sequence[PreHook]:
        """The pre-hooks, in registration order."""
        return tuple(self._pre_hooks)

    @property
    def context_providers(self) -> Sequence[ContextProvider]:
        """The context providers, in registration order."""
        return tuple(self._context_providers)

    def match_command(self, text: str) -> tuple[Command, str] | None:
        """The command ``text`` invokes and its argument text, or None.

        ``/name@botname args`` (Telegram's form in groups) is accepted.
        """
        if not text.startswith("/"):
            return None
        head, _, args = text[1:].partition(" ")
        name = head.split("@", 1)[0].lower()
        command = self._commands.get(name)
        return (command, args.strip()) if command else None


def load_plugins(
    registry: PluginRegistry, modules: Sequence[str], disable: Sequence[str], *, source: str
) -> list[str]:
    """Call ``setup(registry)`` of each entry-point plugin and each module; returns names."""
    loaded: list[str] = []
    for ep in entry_points(group="parley.plugins"):
        if ep.name in disable:
            continue
        with registry.loading(ep.name):
            _setup(registry, ep.load(), f"entry point {ep.name!r}", source)
        loaded.append(ep.name)
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"{source}: plugins.modules: cannot import {name!r}: {exc}") from None
        with registry.loading(name):
            _setup(registry, module, f"module {name!r}", source)
        loaded.append(name)
    return loaded


def _setup(registry: PluginRegistry, target: object, what: str, source: str) -> None:
    setup = getattr(target, "setup", target if callable(target) else None)
    if not callable(setup):
        raise ConfigError(f"{source}: plugins: {what} has no setup(registry) function")
    setup(registry)
    log.info("loaded plugin %s", what)
