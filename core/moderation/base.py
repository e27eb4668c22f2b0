"""The contract of a moderator, the pass-through one, and the registry of moderators."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from core.config import BotSettings
from core.errors import ParleyError
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
    categories: tuple[str, ...] = ()  # what was found: insult, threat, pii, ...


class ReplyWithheld(ParleyError):
    """Raised by :meth:`Moderator.guard` when the reply must not be shown.

    What was already passed on was checked and is safe, but the answer as a whole is
    replaced: the engine tells the channel to drop what it showed and shows ``text``.
    """

    def __init__(self, text: str, reason: str, categories: tuple[str, ...] = ()) -> None:
        super().__init__(reason)
        self.text = text
        self.reason = reason
        self.categories = categories


class Moderator(Protocol):
    """Checks what users say before the bot acts, and what the bot says before users see it."""

    async def admit(self, message: IncomingMessage) -> Verdict | None:
        """Count ``message`` against the sender's rate limits before it waits for its
        conversation: ``None`` lets it on (to :meth:`check_input`), a refusal is answered
        at once with the verdict's ``reply``: as "slow down" (HTTP 429) for a ``flood``
        (in its ``categories``), as a refusal of :meth:`check_input` otherwise (a muted
        sender).
        """
        ...

    async def check_input(self, message: IncomingMessage) -> Verdict:
        """Decide what to do with an incoming message."""
        ...

    def guard(
        self, message: IncomingMessage, stream: AsyncIterator[str], *, system: str = ""
    ) -> AsyncIterator[str]:
        """Pass on the reply's text pieces, holding back or replacing anything unsafe.

        ``system`` is the request's system text, which the reply must not recite.
        Raises :class:`ReplyWithheld` when the reply is flagged part-way.
        """
        ...


class PassThroughModerator:
    """Allows everything; the seam where real filters plug in."""

    async def admit(self, message: IncomingMessage) -> Verdict | None:
        """Admit the message: no rate limits."""
        return None

    async def check_input(self, message: IncomingMessage) -> Verdict:
        """Allow the message unchanged."""
        return Verdict(Action.ALLOW, message.text)

    def guard(
        self, message: IncomingMessage, stream: AsyncIterator[str], *, system: str = ""
    ) -> AsyncIterator[str]:
        """Return the stream unchanged."""
        return stream


ModeratorFactory = Callable[[BotSettings], Moderator]


def moderators() -> Registry[ModeratorFactory]:
    """A registry of moderators; ``passthrough`` and ``filters`` are built in."""
    registry: Registry[ModeratorFactory] = Registry("moderator", "parley.moderators")
    registry.register("passthrough", lambda settings: PassThroughModerator())
    registry.register("filters", _filters)
    return registry


def _filters(settings: BotSettings) -> Moderator:
    # Imported on use: the filters load a classifier, the seam should not.
    from core.moderation.moderator import FilterModerator

    return FilterModerator(settings)
