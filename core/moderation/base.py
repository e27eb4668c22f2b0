"""The contract of a moderator, and the pass-through one used until filters land."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from core.config import BotSettings
from core.registry import Registry
from core.types import IncomingMessage


class Action(StrEnum):
    """What moderation did with a message."""

    ALLOW = "allow"
    MASK = "mask"  # answered, with parts of the text replaced before memory and model
    WARN = "warn"  # answered, and the user warned
    BLOCK = "block"  # not answered; ``Verdict.reply`` is shown instead
    MUTE = "mute"  # not answered; the user is muted for a while
    ESCALATE = "escalate"  # not answered by the bot; handed to people

    @property
    def answers(self) -> bool:
        """Whether the bot goes on to answer a message with this verdict."""
        return self in (Action.ALLOW, Action.MASK, Action.WARN)


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of the input checks; ``text`` is what the pipeline continues with."""

    action: Action
    text: str
    reply: str | None = None
    reason: str | None = None


class Moderator(Protocol):
    """Checks what users say before the bot acts, and what the bot says before users see it."""

    async def check_input(self, message: IncomingMessage) -> Verdict:
        """Decide what to do with an incoming message."""
        ...

    def guard(self, message: IncomingMessage, stream: AsyncIterator[str]) -> AsyncIterator[str]:
        """Pass on the reply's text pieces, holding back or replacing anything unsafe."""
        ...


class PassThroughModerator:
    """Allows everything; the seam where real filters plug in."""

    async def check_input(self, message: IncomingMessage) -> Verdict:
        """Allow the message unchanged."""
        return Verdict(Action.ALLOW, message.text)

    def guard(self, message: IncomingMessage, stream: AsyncIterator[str]) -> AsyncIterator[str]:
        """Return the stream unchanged."""
        return stream


ModeratorFactory = Callable[[BotSettings], Moderator]


def moderators() -> Registry[ModeratorFactory]:
    """A registry of moderators; ``passthrough`` is built in."""
    registry: Registry[ModeratorFactory] = Registry("moderator", "parley.moderators")
    registry.register("passthrough", lambda settings: PassThroughModerator())
    return registry
