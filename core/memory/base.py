"""The contract between the engine and a memory backend."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from core.config import BotSettings
from core.registry import Registry
from core.types import ConversationKey, Turn


@dataclass(frozen=True, slots=True)
class MemorySnapshot:
    """What the engine knows of a conversation when it builds a prompt."""

    turns: tuple[Turn, ...] = ()
    facts: Mapping[str, str] = field(default_factory=dict)


class MemoryStore(Protocol):
    """Keeps conversations (a bounded, expiring window of turns) and facts about users.

    Every method either does all of its work or raises
    :class:`core.errors.MemoryUnavailable`; nothing is silently dropped. A backend does
    one round trip per call whatever the history length.
    """

    async def start(self) -> None:
        """Connect; idempotent."""

    async def stop(self) -> None:
        """Disconnect; idempotent."""

    async def mark_seen(self, key: ConversationKey, message_id: str) -> bool:
        """Record ``message_id`` in ``key``'s conversation; False if it was seen before."""

    async def load(self, key: ConversationKey, user_id: str) -> MemorySnapshot:
        """The newest turns of the conversation (oldest first) and the user's facts.

        Refreshes the conversation's time to live.
        """

    async def load_unseen(
        self, key: ConversationKey, message_id: str, user_id: str
    ) -> MemorySnapshot | None:
        """:meth:`mark_seen` then :meth:`load`, in one round trip; None (nothing loaded)
        if the message was seen before. What the engine calls for each message."""

    async def append(self, key: ConversationKey, turns: Sequence[Turn]) -> None:
        """Add ``turns`` atomically, trimming the conversation to its window."""

    async def reset(self, key: ConversationKey) -> None:
        """Forget the conversation's turns."""

    async def set_fact(self, bot: str, user_id: str, name: str, value: str) -> None:
        """Remember a fact about a user (e.g. their name), across conversations."""

    async def forget_user(self, bot: str, user_id: str) -> int:
        """Delete everything kept about ``user_id`` (conversations they took part in and
        their facts); returns how many records went."""


MemoryFactory = Callable[[BotSettings], MemoryStore]


def memory_backends() -> Registry[MemoryFactory]:
    """A registry of memory backends, filled from the ``parley.memory`` entry points."""
    return Registry("memory backend", "parley.memory")
