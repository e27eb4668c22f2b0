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


class ReplyGuard(Protocol):
    """The output guard of one reply, fed as the reply arrives (see :meth:`Moderator.output_guard`).

    ``feed`` and ``finish`` raise :class:`ReplyWithheld` where :meth:`Moderator.guard`
    would, after the same pieces; :meth:`flush` must be awaited after ``finish()`` or a
    ``ReplyWithheld`` (it sends what the guard decided to the audit log).
    """

    def feed(self, text: str) -> list[str]:
        """Add ``text`` to the reply; the pieces that may be shown now."""
        ...

    def finish(self) -> list[str]:
        """The reply is complete: the rest of it that may be shown."""
        ...

    async def flush(self) -> None:
        """Report what the guard decided (a withheld or masked reply, a failed filter)."""
        ...


class PassThroughGuard:
    """A :class:`ReplyGuard` that shows every piece as it comes."""

    __slots__ = ()

    def feed(self, text: str) -> list[str]:
        """``[text]``."""
        return [text]

    def finish(self) -> list[str]:
        """Nothing: all was shown."""
        return []

    async def flush(self) -> None:
        """Nothing to report."""


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

    def output_guard(self, message: IncomingMessage, *, system: str = "") -> ReplyGuard | None:
        """:meth:`guard` as a synchronous guard of one reply, fed as the reply arrives:
        the same pieces, verdicts and reports; ``None`` when the guard must await a
        filter (an external classifier), where only :meth:`guard` serves.
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

    def output_guard(self, message: IncomingMessage, *, system: str = "") -> ReplyGuard | None:
        """A guard that shows every piece as it comes."""
        return PassThroughGuard()


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
