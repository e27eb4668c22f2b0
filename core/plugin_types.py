"""The plugin API's vocabulary: what handlers receive and return, and what a registry holds.

Command handlers get a :class:`CommandContext` and answer with text (or raise
:class:`CommandError`); pre-hooks answer a message (:class:`Reply`), add to the prompt
(:class:`AddContext`) or stay silent (:data:`SILENT`); post-hooks see an
:class:`Exchange`; HTTP routes get a :class:`Caller`. The registry keeps each
registration with the plugin it belongs to (:class:`Command`, :class:`Hooked`,
:class:`Route`). Import them from :mod:`core.plugins`, the plugin API's one module.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from core.errors import ParleyError
from core.types import ConversationKey, IncomingMessage, Turn

if TYPE_CHECKING:
    from aiohttp import web

    from core.engine import Engine
    from core.memory.base import MemoryStore
    from core.plugins import PluginRegistry

APP = "app"  # the owner of what is registered on the registry itself, not via a plugin


class CommandError(ParleyError):
    """Raised by a command handler: its message is shown to the user (e.g. the usage)."""


@dataclass(frozen=True, slots=True)
class CommandContext:
    """What a command handler gets: the message, its arguments, the bot's services."""

    message: IncomingMessage
    args: str
    memory: MemoryStore
    registry: PluginRegistry
    argv: tuple[str, ...] = ()  # ``args`` split like a shell would (quotes group words)
    admin: bool = False  # whether the sender is an admin of this channel
    deferred: list[Callable[[], Awaitable[object]]] = field(default_factory=list)

    @property
    def key(self) -> ConversationKey:
        """The conversation the command was sent in."""
        return self.message.key

    def after_reply(self, fn: Callable[[], Awaitable[object]]) -> None:
        """Run ``fn()`` once the engine has recorded this command's answer (what must
        come last, e.g. deleting the records that answering this very message wrote)."""
        self.deferred.append(fn)


@dataclass(frozen=True, slots=True)
class Reply:
    """A pre-hook's answer. ``store=False`` answers without remembering the exchange;
    ``metadata`` travels on the reply event (e.g. which FAQ entry answered)."""

    text: str
    metadata: Mapping[str, str] = field(default_factory=dict)
    store: bool = True


@dataclass(frozen=True, slots=True)
class AddContext:
    """Text for the model's prompt: as instructions (``system``) or as the user's own
    words (``user``, placed before the history, never as system text). With
    ``after_history`` it comes after the history instead, as the last words the model
    reads before it answers (a character card's post-history instructions);
    :mod:`core.prompt` says how."""

    text: str
    role: Literal["system", "user"] = "system"
    after_history: bool = False


@dataclass(frozen=True, slots=True)
class Exchange:
    """What a post-hook sees: the message, the reply stored for it, and the turns the
    conversation held before it (as the engine loaded them for this message)."""

    message: IncomingMessage
    reply: str
    history: tuple[Turn, ...] = ()


class Silence:
    """A pre-hook's "say nothing": no reply, nothing stored. Use :data:`SILENT`."""

    def __repr__(self) -> str:
        return "SILENT"


SILENT = Silence()

CommandHandler = Callable[[CommandContext], Awaitable[str]]
PreHookResult = Reply | AddContext | Silence | str | None
PreHook = Callable[[IncomingMessage], Awaitable[PreHookResult]]
PostHook = Callable[["Exchange"], Awaitable[None]]
ContextProvider = Callable[[IncomingMessage], Awaitable["str | AddContext | None"]]
ForgetHook = Callable[[str, str], Awaitable[int]]
SignalHandler = Callable[[IncomingMessage, Mapping[str, Any]], Awaitable[None]]
Lifecycle = Callable[[], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Caller:
    """Who an HTTP route of a plugin serves: the bot's engine, and the tenant of the
    request's API key (None when the server has no keys)."""

    engine: Engine
    tenant: str | None = None


RouteHandler = Callable[["web.Request", Caller], Awaitable["web.StreamResponse"]]


@dataclass(frozen=True, slots=True)
class Route:
    """An HTTP route a plugin serves on the web channel's server (behind its API keys)."""

    method: str
    path: str
    handler: RouteHandler
    plugin: str = APP

F = TypeVar("F")


@dataclass(frozen=True, slots=True)
class Command:
    """A ``/name`` the bot answers itself, without the model."""

    name: str
    handler: CommandHandler
    help: str
    usage: str = ""
    admin: bool = False
    plugin: str = APP


@dataclass(frozen=True, slots=True)
class Hooked(Generic[F]):
    """A registered hook or provider and the plugin it belongs to."""

    plugin: str
    fn: F
    when_paused: bool = False  # pre-hooks: also run while the bot is paused
    max_tokens: int | None = None  # context providers: their own cap
