"""The contract between the engine and a memory backend."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from core import jsoncodec
from core.config import BotSettings
from core.registry import Registry
from core.types import ConversationKey, Turn


@dataclass(frozen=True, slots=True)
class MemorySnapshot:
    """What the engine knows of a conversation when it builds a prompt."""

    turns: tuple[Turn, ...] = ()
    facts: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StoredReply:
    """The answer a message got, kept for its redelivery window and replayed to a
    redelivery (``kind`` is a :class:`~core.types.ReplyKind` value: final or notice)."""

    kind: str
    text: str
    action: str = "allow"
    code: str | None = None

    def dumps(self) -> str:
        """The compact JSON a backend stores."""
        return jsoncodec.dumps([self.kind, self.text, self.action, self.code])

    @classmethod
    def loads(cls, raw: str | bytes) -> StoredReply:
        """Inverse of :meth:`dumps`; raises ``ValueError`` on a malformed record."""
        try:
            kind, text, action, code = jsoncodec.loads(raw)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"malformed stored reply: {exc}") from None
        if not all(isinstance(v, str) for v in (kind, text, action)) or not (
            code is None or isinstance(code, str)
        ):
            raise ValueError("malformed stored reply")
        return cls(kind, text, action, code)


@dataclass(frozen=True, slots=True)
class Begun:
    """What :meth:`MemoryStore.begin` found; exactly one of its cases holds.

    - ``snapshot`` set: the caller holds the conversation (its lease, and the message id
      as pending) and answers the message from this snapshot, then calls ``finish`` or
      ``abort``.
    - ``replay`` set: the message was answered before, within the redelivery window.
    - neither (``waiting``): another holder answers this conversation (or this very
      message) right now; the caller is queued and calls ``begin`` again shortly.
    """

    snapshot: MemorySnapshot | None = None
    replay: StoredReply | None = None

    @property
    def waiting(self) -> bool:
        """Whether the caller must try again shortly."""
        return self.snapshot is None and self.replay is None


WAIT = Begun()


@dataclass(frozen=True, slots=True)
class UserRef:
    """A user as one channel of one bot knows them: per-user data is keyed by all three,
    so an id claimed on one channel never reaches another channel's user."""

    bot: str
    channel: str
    user_id: str


class MemoryStore(Protocol):
    """Keeps conversations (a bounded, expiring window of turns), facts about users and
    the dedupe record of recent messages.

    Every method either does all of its work or raises
    :class:`core.errors.MemoryUnavailable`; nothing is silently dropped. A backend does
    one round trip per call whatever the history length, and ``begin``, ``finish``,
    ``abort`` and ``renew`` are safe to repeat (a backend may retry them on a broken
    connection): each is keyed by the caller's ``token``.
    """

    async def start(self) -> None:
        """Connect; idempotent."""

    async def stop(self) -> None:
        """Disconnect; idempotent."""

    async def begin(
        self, key: ConversationKey, message_id: str, user_id: str, token: str
    ) -> Begun:
        """Claim ``key`` to answer ``message_id``: a lease on the conversation (across
        processes, in arrival order) and the id marked pending, with the snapshot loaded;
        or the stored reply of an id answered before; or :data:`WAIT`. See :class:`Begun`.
        Refreshes the conversation's time to live."""

    async def finish(
        self, key: ConversationKey, message_id: str, user_id: str, token: str,
        turns: Sequence[Turn], reply: StoredReply,
    ) -> None:
        """Append ``turns`` (may be empty), mark ``message_id`` (sent by ``user_id``)
        done with ``reply`` and release the lease, atomically. A repeat after success
        changes nothing."""

    async def abort(self, key: ConversationKey, message_id: str, token: str) -> None:
        """Release what ``begin`` claimed under ``token`` (the pending id, the lease, a
        place in the queue): the message was not answered and a redelivery will be."""

    async def renew(self, key: ConversationKey, message_id: str, token: str) -> bool:
        """Extend the lease and the pending mark held under ``token``; False if lost."""

    async def load(self, key: ConversationKey, user_id: str) -> MemorySnapshot:
        """The newest turns of the conversation (oldest first) and the user's facts
        (``user_id`` on ``key``'s channel). Refreshes the conversation's time to live."""

    async def append(self, key: ConversationKey, turns: Sequence[Turn]) -> None:
        """Add ``turns`` atomically, trimming the conversation to its window."""

    async def reset(self, key: ConversationKey) -> None:
        """Forget the conversation's turns."""

    async def set_fact(self, user: UserRef, name: str, value: str) -> None:
        """Remember a fact about a user (e.g. their name), across their conversations."""

    async def conversations(self, user: UserRef) -> list[ConversationKey]:
        """The conversations ``user`` took part in that are still kept (what
        :meth:`forget_user` deletes), for other stores to forget theirs first."""

    async def forget_user(self, user: UserRef) -> int:
        """Delete everything kept about ``user``: the conversations they took part in
        (with their dedupe records), their facts and indexes; returns how many
        conversations and facts went."""


MemoryFactory = Callable[[BotSettings], MemoryStore]


def memory_backends() -> Registry[MemoryFactory]:
    """A registry of memory backends, filled from the ``parley.memory`` entry points."""
    return Registry("memory backend", "parley.memory")
